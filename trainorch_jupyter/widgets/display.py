"""Display entry points (called by the magics), the views each cell showed, and the terminal fallback."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipywidgets

from ..jobview import STATE_ICONS
from ..jobview import fmt_bytes as _fmt_bytes
from ..jobview import fmt_duration as _fmt_duration
from ..jobview import fmt_loss as _fmt_loss
from ..jobview import fmt_money as _fmt_money
from ..jobview import state_of as _state_of
from ..model import Job, JobState
from .chart import Progress
from .dashboard import Dashboard
from .panel import JobPanel


def _has_widget_frontend() -> bool:
    """True in a Jupyter kernel (whose frontend can show widgets); False in plain IPython/scripts."""
    if os.environ.get("TRAINORCH_WIDGETS", "1").lower() in ("0", "false", "no", "off"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


# Views shown by each notebook cell (by the frontend's cellId). When a cell runs again the frontend
# clears its output; its old views would stay subscribed to every event of their job(s) and keep
# being flushed, so they are closed then (IPython's pre_run_cell hook, registered on %load_ext).
_cell_views: dict[str, list[weakref.ref[ipywidgets.Widget]]] = {}
_cell_lock = threading.Lock()


def _current_cell_id() -> str | None:
    try:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        parent = kernel.get_parent() if kernel is not None else None
        cell_id = (parent or {}).get("metadata", {}).get("cellId")
    except Exception:
        return None
    return str(cell_id) if cell_id else None


def track_cell_view(view: ipywidgets.Widget) -> None:
    """Remember that the running cell shows ``view`` (closed when that cell runs again)."""
    cell_id = _current_cell_id()
    if cell_id is None:
        return
    with _cell_lock:
        refs = [r for r in _cell_views.get(cell_id, []) if r() is not None]
        refs.append(weakref.ref(view))
        _cell_views[cell_id] = refs


def close_cell_views(info: Any) -> None:
    """IPython ``pre_run_cell`` hook: close the views an earlier run of this cell showed."""
    cell_id = getattr(info, "cell_id", None)
    if not cell_id:
        return
    with _cell_lock:
        refs = _cell_views.pop(str(cell_id), [])
    for ref in refs:
        view = ref()
        if view is not None:
            with contextlib.suppress(Exception):
                view.close()


def display_job(handle: Any) -> None:
    """Show a job: a live :class:`JobPanel` when a widget frontend is there, a text summary otherwise."""
    if _has_widget_frontend():
        from IPython.display import display

        panel = JobPanel(handle.orchestrator, handle.id)
        track_cell_view(panel)
        display(panel)
    else:
        print(text_summary(handle))


def display_dashboard(orchestrator: Any, **filters: Any) -> None:
    """Show the workspace's jobs: a live :class:`Dashboard`, or a text table without widgets."""
    if _has_widget_frontend():
        from IPython.display import display

        board = Dashboard(orchestrator, state=filters.get("state"), provider=filters.get("provider"))
        track_cell_view(board)
        display(board)
        return
    jobs = orchestrator.jobs()
    state, provider = filters.get("state"), filters.get("provider")
    jobs = [j for j in jobs if (not state or j.state.value == str(state).upper()) and (not provider or j.provider == provider)]
    if not jobs:
        print("no jobs")
    for j in jobs:
        print(text_summary(j))


def text_summary(job: Any, *, progress: Progress | None = None) -> str:
    """A compact plain-text summary of a job (a Job record or a JobHandle) for terminals."""
    record: Job = job.record if not isinstance(job, Job) and hasattr(job, "record") else job
    if progress is None and not isinstance(job, Job) and hasattr(job, "metrics"):
        progress = Progress()
        try:
            for m in job.metrics():
                progress.add(m)
        except Exception:
            progress = None
    state = _state_of(record)
    icon = STATE_ICONS.get(state, "")
    lines = [f"{record.id}  [{(icon + ' ') if icon else ''}{state.value}]  {record.provider}"
             + (f" · {record.gpu}" if record.gpu else "")
             + (f" · {_fmt_money(record.price_per_hour, per_hour=True)}" if record.price_per_hour is not None else "")]
    bits = []
    if progress is not None and progress.step is not None:
        frac = progress.fraction
        bits.append(f"step {progress.step}/{progress.total_steps or '?'}" + (f" ({frac * 100:.0f}%)" if frac is not None else ""))
        if progress.last_loss is not None:
            bits.append(f"loss {_fmt_loss(progress.last_loss)}")
        if progress.last_eval_loss is not None:
            bits.append(f"eval {_fmt_loss(progress.last_eval_loss)}")
    if record.elapsed_s is not None:
        bits.append(f"elapsed {_fmt_duration(record.elapsed_s)}")
    if record.cost_so_far is not None:
        bits.append(f"cost {_fmt_money(record.cost_so_far)}")
    if record.exit_code is not None:
        bits.append(f"exit {record.exit_code}")
    if bits:
        lines.append("  " + " · ".join(bits))
    if record.artifacts:
        total = sum(a.size_bytes for a in record.artifacts)
        lines.append(f"  artifacts: {len(record.artifacts)} files ({_fmt_bytes(total)}) in {Path(record.artifacts[0].path).parent}")
    if state is JobState.FAILED:
        d = record.diagnosis if isinstance(record.diagnosis, Mapping) else {}
        cause = d.get("cause")
        summary = str(d.get("summary") or "")
        if not summary and record.error and record.error.strip():
            summary = record.error.strip().splitlines()[0]
        lines.append("  failed" + (f": {cause}" if cause else "") + (f" — {summary}" if summary else ""))
        suggestions = d.get("suggestions") or []
        if isinstance(suggestions, str):
            suggestions = [suggestions]
        lines.extend(f"    try: {s}" for s in suggestions[:3])
    return "\n".join(lines)
