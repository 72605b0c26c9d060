"""JobPanel: a live view of one job (header, progress, loss chart, log tail, controls, artifacts).

The log view is a bounded deque of the last N lines (:class:`LogBuffer`) rendered into one HTML value on a
timer; the Output widget's per-call stdout append (which resends the whole output list each time) is never used.

Cancel while a cell is busy: the click is a comm message the kernel handles on a subshell where it can
(``routing.py``). What the kernel does with it does not depend on the kernel being free: ``Orchestrator.cancel``
records the request in the workspace's store, and whichever process drives the job (this kernel's loop thread,
another kernel, or the Jupyter server's driver) honours it within a second. Where the trainorch Jupyter server
extension and its JupyterLab extension are installed, the browser can cancel without the kernel at all: the
Cancel and Confirm buttons carry the classes ``trainorch-cancel`` / ``trainorch-cancel-confirm``, and the panel's
header carries ``data-job-id``, so the lab extension can answer a click itself through
``POST /api/training/jobs/{id}/cancel``.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets

from ..jobview import STATE_COLORS, STATE_ICONS, cost_text, progress_fraction, progress_text
from ..jobview import badge_html as _badge
from ..jobview import esc as _esc
from ..jobview import fmt_bytes as _fmt_bytes
from ..jobview import fmt_duration as _fmt_duration
from ..jobview import fmt_loss as _fmt_loss
from ..jobview import fmt_money as _fmt_money
from ..model import ArtifactInfo, Job, JobState
from .chart import Progress, render_loss_svg
from .routing import _click_context, _router
from .throttle import HIDDEN_INTERVAL_S, Budget, _hide, _Part, _Scheduler, _scheduler, _View

#: Minimum seconds between two updates of one part of a panel.
HEADER_INTERVAL_S = 0.5
LOG_INTERVAL_S = 0.5
CHART_INTERVAL_S = 1.0
#: Longest log line shown in a panel (the whole line stays in the log file).
MAX_LINE_CHARS = 2000
#: Characters of log events a panel keeps waiting for the flusher before it drops those it could not show.
PENDING_LOG_CHARS = 4 << 20
#: How long the Download button waits for its download before it stops waiting (and can be clicked again).
DOWNLOAD_WAIT_S = 900.0


# --------------------------------------------------------------------------------------------
# The bounded log buffer
# --------------------------------------------------------------------------------------------



class LogBuffer:
    """The last ``maxlen`` lines of a log, fed with chunks of text of whole or partial lines."""

    def __init__(self, maxlen: int = 200, max_line_chars: int = MAX_LINE_CHARS) -> None:
        self.lines: deque[str] = deque(maxlen=max(1, maxlen))
        self.max_line_chars = max_line_chars
        self._partial = ""
        self.total_lines = 0

    def feed(self, text: str) -> None:
        if not text:
            return
        text = self._partial + text
        parts = text.split("\n")
        self._partial = parts.pop()
        if len(self._partial) > 64 * 1024:  # a runaway line without newline: show what we have
            parts.append(self._partial)
            self._partial = ""
        # Only the last maxlen lines can survive: do not touch the others.
        skip = max(0, len(parts) - (self.lines.maxlen or len(parts)))
        self.total_lines += len(parts)
        for line in parts[skip:]:
            self.lines.append(self._clean(line))

    def _clean(self, line: str) -> str:
        if "\r" in line:  # progress bars redraw with \r: keep what the terminal would show
            line = line.rstrip("\r").rsplit("\r", 1)[-1]
        if len(line) > self.max_line_chars:
            line = line[: self.max_line_chars] + " \u2026"
        return line

    def tail_lines(self) -> list[str]:
        out = list(self.lines)
        if self._partial:
            out.append(self._clean(self._partial))
            return out[-(self.lines.maxlen or len(out)):]
        return out

    def text(self) -> str:
        return "\n".join(self.tail_lines())


def _log_overlap(tail: str, chunks: Sequence[str], *, cut: bool) -> int:
    """How many of ``chunks`` (log events, in order) the log file's ``tail`` text already holds.

    The orchestrator appends a chunk to the log file before it emits it, so the chunks that arrived
    before the file was read are a prefix of ``chunks`` and end the file, byte for byte (``\\r``
    included). Compared as text at chunk boundaries: splitting the two sides into lines differently
    (``splitlines()`` also splits at ``\\r``) doubled progress-bar lines. ``cut``: the tail is only the end
    of a longer file, so a prefix longer than the tail matches when it ends with the whole tail.
    Ambiguous repeats (the same text twice in a row) resolve to the largest overlap.
    """
    if not tail or not chunks:
        return 0
    ends = list(itertools.accumulate(len(c) for c in chunks))
    joined = "".join(chunks)
    for k in range(len(chunks), 0, -1):
        n = ends[k - 1]
        if n <= len(tail):
            if tail[len(tail) - n:] == joined[:n]:
                return k
        elif cut and joined[n - len(tail):n] == tail:
            return k
    return 0


# --------------------------------------------------------------------------------------------
# JobPanel
# --------------------------------------------------------------------------------------------


_PANEL_CSS = (
    "<style>.trainorch-panel{border:1px solid #e5e7eb;border-radius:6px;padding:6px 8px}"
    ".trainorch-log{display:flex;flex-direction:column-reverse;max-height:260px;overflow:auto;"
    "background:#111827;color:#e5e7eb;border-radius:4px;padding:4px 6px}"
    ".trainorch-log pre{margin:0;flex-shrink:0;overflow:visible;font:11px/1.35 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;"
    "word-break:break-all;color:inherit;background:none}"
    ".trainorch-table{border-collapse:collapse;font-size:12px}.trainorch-table th,.trainorch-table td"
    "{padding:2px 8px;border-bottom:1px solid #e5e7eb;text-align:left}</style>"
)


class JobPanel(ipywidgets.VBox, _View):
    """A live view of one job: header, state, progress, loss chart, log tail, controls, artifacts.

    Its history (metrics, the log's tail, artifacts, state) is read from the store when it is made,
    so a panel of a finished job (or one made after a kernel restart) shows the whole run.

    Locks: ``_lock`` guards only the inbox ``_pending`` (events handed over by the orchestrator's loop
    thread) and is held for O(1) work; ``_model_lock`` guards everything else (progress, log buffer,
    job record, controls, widgets) and may be held while rendering and sending; callbacks never take it.
    """

    # The inbox's bound (see _compact_pending); instance values once set.
    _pending_log_chars = 0
    _pending_log_limit = PENDING_LOG_CHARS

    def __init__(self, orchestrator: Any, job_id: str, *, log_lines: int = 200,
                 scheduler: _Scheduler | None = None, route_clicks: bool = True) -> None:
        self._orch = orchestrator
        self.job_id = job_id
        self.log_lines = log_lines
        self._lock = threading.Lock()  # the inbox: O(1) work only, taken by the loop thread's callbacks
        self._model_lock = threading.RLock()  # the model and the widgets: never taken by a callback
        self._scheduler = scheduler or _scheduler
        self._closed = False
        self._loaded = False
        self._pending: list[Any] = []  # the inbox: events not yet applied
        self._progress = Progress()
        self._logbuf = LogBuffer(log_lines)
        self._job: Job = orchestrator.get(job_id) if hasattr(orchestrator, "get") else orchestrator.store.get(job_id)
        self._artifacts: list[ArtifactInfo] = []
        self._action: str = ""  # the controls' status line
        self._confirming = False
        self._cancel_sent = False  # Cancel stays disabled once confirmed (the job ends shortly)
        self._downloading = False  # Download stays disabled while one runs
        self._download_fut: Any = None  # the download the button waits for (a concurrent Future)
        self._download_deadline = math.inf  # on the scheduler's clock
        self.download_wait_s = DOWNLOAD_WAIT_S
        #: Where the last clicks were handled (thread, subshell, the subshell the frontend addressed).
        self.clicks: deque[dict[str, Any]] = deque(maxlen=20)
        self._notified_terminal = False
        self._seen_views = False

        self.header = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%"))
        self.chart = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%"))
        self.log_view = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%"))
        self.log_link = ipywidgets.HTML()
        self.artifact_table = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%"))
        self.diagnosis_view = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%"))
        self.cancel_button = ipywidgets.Button(description="Cancel", icon="stop", tooltip="Cancel this job",
                                               layout=ipywidgets.Layout(width="auto"))
        self.confirm_button = ipywidgets.Button(description="Confirm cancel", button_style="danger",
                                                tooltip="Stop the job now (the machine is terminated)",
                                                layout=ipywidgets.Layout(width="auto", display="none"))
        self.keep_button = ipywidgets.Button(description="Keep running", layout=ipywidgets.Layout(width="auto", display="none"))
        self.download_button = ipywidgets.Button(description="Download", icon="download",
                                                 tooltip="Download and verify the job's files",
                                                 layout=ipywidgets.Layout(width="auto"))
        self.action_label = ipywidgets.HTML()
        # Hooks for the JupyterLab extension, which can cancel through the Jupyter server without the kernel.
        self.cancel_button.add_class("trainorch-cancel")
        self.confirm_button.add_class("trainorch-cancel-confirm")
        self.cancel_button.on_click(self._on_cancel)
        self.confirm_button.on_click(self._on_confirm)
        self.keep_button.on_click(self._on_keep)
        self.download_button.on_click(self._on_download)
        controls = ipywidgets.HBox([self.cancel_button, self.confirm_button, self.keep_button, self.download_button,
                                    self.action_label], layout=ipywidgets.Layout(align_items="center", flex_flow="row wrap"))
        self.routed_clicks = False
        if route_clicks:
            self.routed_clicks = all(
                [_router.route(b) for b in (self.cancel_button, self.confirm_button, self.keep_button, self.download_button)]
            )

        self._parts: dict[str, _Part] = {
            "header": _Part(self.header, self._render_header, HEADER_INTERVAL_S),
            "chart": _Part(self.chart, self._render_chart, CHART_INTERVAL_S),
            "log": _Part(self.log_view, self._render_log, LOG_INTERVAL_S),
            "artifacts": _Part(self.artifact_table, self._render_artifacts, 0.0),
            "diagnosis": _Part(self.diagnosis_view, self._render_diagnosis, 0.0),
            "action": _Part(self.action_label, lambda now: self._action, 0.0),
        }
        super().__init__(
            [ipywidgets.HTML(_PANEL_CSS), self.header, self.chart, controls, self.log_view, self.log_link,
             self.diagnosis_view, self.artifact_table],
            layout=ipywidgets.Layout(width="100%"),
            _view_count=0,  # let the frontend tell how many views are shown (0 after shown -> hidden)
        )
        self.add_class("trainorch-panel")
        self.observe(self._on_view_count, "_view_count")

        self._unsubscribe = orchestrator.subscribe(self._on_event, job_id=job_id)
        self._load_history()
        # The first render happens here, synchronously: the panel is complete when displayed.
        self._flush_all(self._scheduler.clock())
        self._scheduler.register(self)

    # -- history and events (the event callbacks run on the orchestrator's loop thread) --------

    def _load_history(self) -> None:
        orch = self._orch
        store = orch.store
        try:
            metrics = store.metrics(self.job_id)
        except Exception:
            metrics = []
        try:
            tail, cut = self._read_log_tail()
        except Exception:
            tail, cut = "", False
        try:
            artifacts = list(store.artifacts(self.job_id))
        except Exception:
            artifacts = []
        with self._model_lock:
            for m in metrics:
                self._progress.add(m)
            self._logbuf.feed(tail)  # the file's own bytes: partial last line and \r redraws as they are
            self._artifacts = artifacts or list(self._job.artifacts)
            seen_metrics = [dict(m) for m in metrics[-50:]]
            pending = self._take_pending()
            self._loaded = True  # later events are drained by the flusher (under _model_lock, held here)
            chunks: list[str] = []
            for event in pending:
                # Events that came while the history was read may already be in it: skip those.
                if event.kind == "metric" and event.data in seen_metrics:
                    seen_metrics.remove(event.data)
                elif event.kind == "log":
                    chunks.append(str(event.data))
                else:
                    self._apply(event.kind, event.data, event.time)
            for chunk in chunks[_log_overlap(tail, chunks, cut=cut):]:
                self._apply("log", chunk, None)
        self._mark("header", "chart", "log", "artifacts", "diagnosis")

    def _read_log_tail(self) -> tuple[str, bool]:
        """The end of the log file as text from a line start, and whether it is only the end (the file is longer)."""
        path = Path(self._orch.store.log_path(self.job_id))
        if not path.exists():
            return "", False
        size = path.stat().st_size
        budget = max(64 * 1024, self.log_lines * 400)
        with path.open("rb") as fh:
            fh.seek(max(0, size - budget))
            data = fh.read()
        cut = size > budget
        if cut:
            data = data[data.find(b"\n") + 1:] if b"\n" in data else b""  # the first line is cut
        return data.decode("utf-8", "replace"), cut

    def _on_event(self, event: Any) -> None:
        """Runs on the orchestrator's loop thread: hand the event over and return (O(1), never blocks)."""
        with self._lock:
            if self._closed:
                return
            self._pending.append(event)
            if event.kind == "log" and isinstance(event.data, str):
                self._pending_log_chars += len(event.data)
                if self._pending_log_chars > self._pending_log_limit:
                    self._compact_pending()
        if event.kind == "state":
            self._scheduler.poke()

    def _compact_pending(self) -> None:
        """Drop the pending log text the panel could not show anyway (only the last ``log_lines`` lines
        are shown). Runs with ``_lock`` held when the flusher fell PENDING_LOG_CHARS behind; the next
        limit doubles with what is kept, so this is O(1) per character over time."""
        keep = self.log_lines + 1  # whole lines after the first kept chunk's (maybe cut) first line
        kept: list[Any] = []
        lines = chars = 0
        for event in reversed(self._pending):
            if event.kind == "log":
                if lines >= keep:
                    continue
                text = str(event.data)
                lines += text.count("\n")
                chars += len(text)
            kept.append(event)
        kept.reverse()
        self._pending = kept
        self._pending_log_chars = chars
        self._pending_log_limit = max(PENDING_LOG_CHARS, 2 * chars)

    def _take_pending(self) -> list[Any]:
        with self._lock:
            pending, self._pending = self._pending, []
            self._pending_log_chars = 0
            self._pending_log_limit = PENDING_LOG_CHARS
        return pending

    def _drain(self) -> None:
        """Apply the inbox's events to the model (call with ``_model_lock`` held)."""
        if not self._loaded or not self._pending:
            return
        for event in self._take_pending():
            self._apply(event.kind, event.data, event.time)

    def _apply(self, kind: str, data: Any, when: float | None) -> None:
        if kind == "log":
            self._logbuf.feed(str(data))
            self._mark("log")
        elif kind == "metric":
            self._progress.add(data, when)
            self._mark("header", "chart")
        elif kind == "state" and isinstance(data, Job):
            self._job = data
            if data.artifacts and not self._artifacts:
                self._artifacts = list(data.artifacts)
            self._mark("header", "artifacts", "diagnosis")
            if data.state.is_terminal:
                self._mark("log", "chart")
        elif kind == "artifacts":
            self._artifacts = list(data or [])
            self._mark("artifacts", "header")
        elif kind == "download":
            self._download_done(data)

    def _mark(self, *names: str) -> None:
        for name in names:
            part = self._parts.get(name) if hasattr(self, "_parts") else None
            if part is not None:
                part.dirty = True

    # -- flushing (the scheduler's thread) ------------------------------------------------------

    def _on_view_count(self, change: Mapping[str, Any]) -> None:
        if change.get("new"):
            self._seen_views = True

    @property
    def _hidden(self) -> bool:
        """Shown once, and every view of it is gone (its output was cleared, its cell ran again)."""
        return self._seen_views and self._view_count == 0

    def _wants_flush(self, now: float) -> bool:
        if self._closed:
            return False
        with self._model_lock:
            self._drain()
            if self._download_fut is not None and now >= self._download_deadline:
                self._stop_waiting_for_download()
            live = self._job.state.is_live
            if live and now - self._parts["header"].last >= 1.0:
                self._parts["header"].dirty = True  # elapsed time and cost tick
            return any(p.dirty for p in self._parts.values())

    def _flush(self, now: float, budget: Budget) -> None:
        with self._model_lock:
            self._drain()
            slow = HIDDEN_INTERVAL_S if self._hidden and self._job.state.is_live else None
            self._sync_controls()
            for name in ("header", "action", "diagnosis", "artifacts", "log", "chart"):
                part = self._parts[name]
                part.flush(now, budget, None if slow is None or name in ("action",) else max(slow, part.interval))

    def _flush_all(self, now: float) -> None:
        budget = Budget(math.inf, math.inf)
        with self._model_lock:
            self._drain()
            self._sync_controls()
            for part in self._parts.values():
                part.flush(now, budget, 0.0)
            path = self._log_path()
            self.log_link.value = (
                f"<span style='font-size:11px;color:#6b7280'>full log: <code style='user-select:all'>{_esc(path)}</code>"
                f"</span>" if path else ""
            )

    def _sync_controls(self) -> None:
        state = self._job.state
        terminal = state.is_terminal
        no_cancel = terminal or self._cancel_sent
        with self.cancel_button.hold_sync():
            if self.cancel_button.disabled != no_cancel:
                self.cancel_button.disabled = no_cancel
        _hide(self.cancel_button, self._confirming and not terminal)
        _hide(self.confirm_button, not self._confirming or terminal)
        _hide(self.keep_button, not self._confirming or terminal)
        can_download = (bool(self._artifacts) or state is JobState.COMPLETED) and not self._downloading
        if self.download_button.disabled == can_download:
            self.download_button.disabled = not can_download

    # -- rendering --------------------------------------------------------------------------

    def _log_path(self) -> str:
        try:
            return str(self._orch.store.log_path(self.job_id))
        except Exception:
            return ""

    def _render_header(self, now: float) -> str:
        job, prog = self._job, self._progress
        state = job.state
        facts = [
            ("provider", _esc(job.provider)),
            ("GPU", _esc(job.gpu or ("-" if job.provider != "local" else "local"))),
            ("price", _fmt_money(job.price_per_hour, per_hour=True)),
            ("elapsed", _fmt_duration(job.elapsed_s)),
            ("cost", cost_text(job)),
        ]
        fact_html = " &middot; ".join(f"<span title='{k}'>{k} <b>{v}</b></span>" for k, v in facts)
        frac = progress_fraction(state, prog)
        pct = 0.0 if frac is None else frac * 100
        color = STATE_COLORS.get(state, "#2563eb")
        eta = prog.eta(time.time()) if state.is_live else None
        bits = [_esc(progress_text(state, prog))]  # the words the sidebar shows for this job (jobview)
        if eta is not None:
            bits.append(f"ETA {_fmt_duration(eta)}")
        if prog.last_loss is not None:
            bits.append(f"loss {_fmt_loss(prog.last_loss)}")
        if prog.last_eval_loss is not None:
            bits.append(f"eval {_fmt_loss(prog.last_eval_loss)}")
        prog_text = " &middot; ".join(b for b in bits if b)
        bar = (
            f"<div class='trainorch-progress' data-progress='{pct:.1f}' data-step='{prog.step if prog.step is not None else ''}'"
            f" data-total='{prog.total_steps or ''}' style='display:flex;align-items:center;gap:8px;margin:4px 0'>"
            f"<div style='flex:1;height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden'>"
            f"<div style='width:{pct:.1f}%;height:100%;background:{color}'></div></div>"
            f"<span style='font-size:12px;white-space:nowrap'>{prog_text}</span></div>"
        )
        return (
            f"<div class='trainorch-header' data-job-id='{_esc(job.id)}' data-state='{state.value}'>"
            f"<div style='display:flex;align-items:center;gap:8px;flex-wrap:wrap'>"
            f"<b style='font-size:13px'>{_esc(job.id)}</b>{_badge(state)}"
            f"<span style='font-size:12px;color:#374151'>{fact_html}</span></div>{bar}"
            f"{self._render_notice()}</div>"
        )

    def _render_notice(self) -> str:
        job = self._job
        state = job.state
        if not state.is_terminal:
            return ""
        color = STATE_COLORS[state]
        if state is JobState.COMPLETED:
            n = len(self._artifacts)
            files = f" &middot; {n} file{'s' if n != 1 else ''} verified" if n else ""
            text = f"{STATE_ICONS[state]} Job completed in {_fmt_duration(job.elapsed_s)}{files}"
        elif state is JobState.FAILED:
            summary = ""
            if isinstance(job.diagnosis, Mapping):
                summary = str(job.diagnosis.get("summary") or job.diagnosis.get("cause") or "")
            if not summary and job.error:
                summary = job.error.strip().splitlines()[0] if job.error.strip() else ""
            code = f" (exit code {job.exit_code})" if job.exit_code is not None else ""
            text = f"{STATE_ICONS[state]} Job failed{code}" + (f": {_esc(summary)}" if summary else "")
        else:
            text = f"{STATE_ICONS[state]} Job cancelled after {_fmt_duration(job.elapsed_s)}"
        return (f"<div class='trainorch-notice' role='status' style='margin-top:4px;padding:4px 8px;border-radius:4px;"
                f"border-left:4px solid {color};background:{color}1a;font-size:12px'>{text}</div>")

    def _render_chart(self, now: float) -> str:
        prog = self._progress
        return render_loss_svg(prog.train, prog.eval, total_steps=prog.total_steps)

    def _render_log(self, now: float) -> str:
        lines = self._logbuf.tail_lines()
        body = _esc("\n".join(lines)) if lines else "<span style='color:#9ca3af'>(no output yet)</span>"
        return (f"<div class='trainorch-log' data-lines='{len(lines)}'><pre>{body}</pre></div>")

    def _render_artifacts(self, now: float) -> str:
        arts = self._artifacts
        if not arts:
            return ""
        rows = []
        for a in arts:
            ok, why = _verified(a)
            mark = (f"<span title='{_esc(why)}' style='color:#16a34a'>\u2714 verified</span>" if ok
                    else f"<span title='{_esc(why)}' style='color:#dc2626'>\u2716 {_esc(why)}</span>")
            rows.append(
                f"<tr class='trainorch-artifact'><td><code title='{_esc(a.path)}'>{_esc(a.name)}</code></td>"
                f"<td>{_fmt_bytes(a.size_bytes)}</td>"
                f"<td><code title='{_esc(a.hash_sha256)}' style='user-select:all'>{_esc(a.hash_sha256[:16])}\u2026</code></td>"
                f"<td>{mark}</td></tr>"
            )
        folder = _esc(Path(arts[0].path).parent)
        return (f"<div style='font-size:12px;margin-top:4px'><b>Artifacts</b> in <code>{folder}</code>"
                f"<table class='trainorch-table'><tr><th>file</th><th>size</th><th>SHA-256</th><th></th></tr>"
                f"{''.join(rows)}</table></div>")

    def _render_diagnosis(self, now: float) -> str:
        job = self._job
        if job.state is not JobState.FAILED:
            return ""
        d = job.diagnosis if isinstance(job.diagnosis, Mapping) else {}
        cause = d.get("cause") or "failed"
        summary = d.get("summary") or job.error or ""
        suggestions = d.get("suggestions") or []
        evidence = d.get("evidence") or []
        if isinstance(suggestions, str):
            suggestions = [suggestions]
        if isinstance(evidence, str):
            evidence = [evidence]
        out = [f"<div class='trainorch-diagnosis' data-cause='{_esc(cause)}' style='margin-top:4px;padding:6px 8px;"
               f"border:1px solid #fecaca;background:#fef2f2;border-radius:4px;font-size:12px'>"
               f"<b>Diagnosis: {_esc(cause)}</b>"]
        if summary:
            out.append(f"<div>{_esc(summary)}</div>")
        if suggestions:
            out.append("<div style='margin-top:4px'>Try:</div><ul style='margin:0 0 0 18px;padding:0'>"
                       + "".join(f"<li>{_esc(s)}</li>" for s in suggestions) + "</ul>")
        if evidence:
            out.append("<details><summary>evidence</summary><pre style='white-space:pre-wrap;margin:0'>"
                       + _esc("\n".join(str(e) for e in evidence)) + "</pre></details>")
        out.append("</div>")
        return "".join(out)

    # -- controls (run on the subshell's thread when routed, else the main thread) -------------

    def _set_action(self, text: str) -> None:
        with self._model_lock:
            self._action = text
            self._mark("action")
        self._scheduler.poke()

    def _note_click(self, button: str) -> None:
        self.clicks.append({"button": button, "at": time.time(), **_click_context()})

    def _on_cancel(self, _button: Any = None) -> None:
        self._note_click("cancel")
        if self._job.state.is_terminal or self._cancel_sent:
            return
        with self._model_lock:
            self._confirming = True
            self._sync_controls()
        self._set_action("<span style='font-size:12px'>Stop this job? Its machine is terminated.</span>")

    def _on_keep(self, _button: Any = None) -> None:
        self._note_click("keep")
        with self._model_lock:
            self._confirming = False
            self._sync_controls()
        self._set_action("")

    def _on_confirm(self, _button: Any = None) -> None:
        self._note_click("confirm")
        with self._model_lock:
            if self._cancel_sent:
                return
            self._confirming = False
            self._cancel_sent = True
            self._sync_controls()
        self._set_action("<span style='font-size:12px'>cancelling\u2026</span>")

        def work() -> None:
            try:
                self._orch.cancel(self.job_id)
                self._set_action("<span style='font-size:12px'>cancel requested</span>")
            except Exception as exc:
                with self._model_lock:
                    self._cancel_sent = False  # let the user try again
                self._set_action(f"<span style='color:#dc2626;font-size:12px'>cancel failed: {_esc(exc)}</span>")

        threading.Thread(target=work, name=f"trainorch-cancel-{self.job_id}", daemon=True).start()

    def _on_download(self, _button: Any = None) -> None:
        """Start a download into the job's default folder and return: nothing waits on it. Its end comes back
        through the inbox (a done-callback, O(1), on whichever thread ends it) and the flusher shows it; past
        ``download_wait_s`` the panel stops waiting (the button works again, a late end still shows)."""
        self._note_click("download")
        with self._model_lock:
            if self._downloading:
                return
            self._downloading = True
            self._sync_controls()
        self._set_action("<span style='font-size:12px'>downloading\u2026</span>")
        try:
            fut = self._orch.download(self.job_id)
        except Exception as exc:
            with self._model_lock:
                self._downloading = False
                self._sync_controls()
            self._set_action(f"<span style='color:#dc2626;font-size:12px'>download failed: {_esc(exc)}</span>")
            return
        with self._model_lock:
            self._download_fut = fut
            self._download_deadline = self._scheduler.clock() + self.download_wait_s
        fut.add_done_callback(self._on_download_end)

    def _on_download_end(self, fut: Any) -> None:
        """The download's done-callback: hand it to the flusher (never touches a widget or ``_model_lock``)."""
        self._on_event(_PanelEvent(self.job_id, "download", fut))
        self._scheduler.poke()

    def _download_done(self, fut: Any) -> None:
        """Show a download's end (under ``_model_lock``)."""
        current = fut is self._download_fut
        if not current and (self._downloading or fut.cancelled()):
            return  # one the panel stopped waiting for, while another runs
        if current:
            self._download_fut = None
            self._download_deadline = math.inf
            self._downloading = False
        if fut.cancelled():
            text = "<span style='color:#dc2626;font-size:12px'>download cancelled</span>"
        elif (exc := fut.exception()) is not None:
            text = f"<span style='color:#dc2626;font-size:12px'>download failed: {_esc(exc)}</span>"
        else:
            infos = list(fut.result())
            self._artifacts = infos
            self._mark("artifacts", "header")
            folder = Path(infos[0].path).parent if infos else ""
            text = (f"<span style='font-size:12px;color:#16a34a'>\u2714 {len(infos)} file(s) verified in "
                    f"<code>{_esc(folder)}</code></span>")
        self._action = text
        self._mark("action")

    def _stop_waiting_for_download(self) -> None:
        """Past the deadline (under ``_model_lock``): free the button; the download may still end (and show)."""
        self._download_fut = None
        self._download_deadline = math.inf
        self._downloading = False
        self._action = (f"<span style='color:#d97706;font-size:12px'>no answer from the download after "
                        f"{_fmt_duration(self.download_wait_s)}; it may still be running (its files show here "
                        "when it ends): click Download again or run %train download</span>")
        self._mark("action")

    # -- for tests and callers ------------------------------------------------------------------

    def _synced(self) -> None:
        with self._model_lock:
            self._drain()

    @property
    def state(self) -> JobState:
        self._synced()
        return self._job.state

    @property
    def progress(self) -> Progress:
        self._synced()
        return self._progress

    @property
    def log_text(self) -> str:
        with self._model_lock:
            self._drain()
            return self._logbuf.text()

    @property
    def artifacts(self) -> list[ArtifactInfo]:
        self._synced()
        return list(self._artifacts)

    def flush_now(self) -> None:
        """Render every part at once, outside the budget (for tests and a final refresh)."""
        self._flush_all(self._scheduler.clock())

    def close(self) -> None:
        if not self._detach():
            return
        self._close_children()
        super().close()

    def __repr__(self) -> str:  # what a frontend without widgets shows
        from .display import text_summary

        return text_summary(self._job, progress=self._progress)


@dataclass
class _PanelEvent:
    """An event a panel makes for itself (a download's end), drained like the orchestrator's."""

    job_id: str
    kind: str
    data: Any
    time: float = field(default_factory=time.time)


def _verified(a: ArtifactInfo) -> tuple[bool, str]:
    """Is the file where the store says, with the size that was verified against the manifest?"""
    if a.metadata.get("verified") is False:
        return False, "not verified"
    try:
        size = Path(a.path).stat().st_size
    except OSError:
        return False, "missing"
    if size != a.size_bytes:
        return False, f"size changed ({size} B)"
    return True, f"SHA-256 matched the manifest written where the job ran ({a.hash_sha256})"

