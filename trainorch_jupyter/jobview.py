"""How a job is shown, in one place for every face: the notebook's panels and dashboard, and the Jupyter
server's API (which the JupyterLab sidebar and status bar draw).

* :class:`MetricSummary`: what a job's metrics say in brief (last step, total steps, last train loss), built
  in O(1) per metric, so neither a dashboard nor the server ever keeps a whole metric history for a summary.
* :func:`job_summary`: the ``JobSummary`` object of the server API (``docs/server-api.yaml``), with a
  ``display`` block of the very texts the panel shows (state label and colour, progress, loss, cost), so the
  sidebar and the panel say the same thing.
* The formatters (durations, bytes, money, loss) and the state badge colours and icons.

Plain data only: nothing here imports ipywidgets, IPython or jupyter_server.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from .model import Job, JobState

__all__ = [
    "STATE_COLORS",
    "STATE_ICONS",
    "MetricSummary",
    "badge_html",
    "cost_text",
    "fmt_bytes",
    "fmt_duration",
    "fmt_loss",
    "fmt_money",
    "job_summary",
    "progress_fraction",
    "progress_text",
    "state_label",
    "status_text",
    "summarize_metrics",
]

STATE_COLORS: dict[JobState, str] = {
    JobState.PENDING: "#6b7280",
    JobState.PROVISIONING: "#7c3aed",
    JobState.RUNNING: "#2563eb",
    JobState.DOWNLOADING: "#0891b2",
    JobState.COMPLETED: "#16a34a",
    JobState.FAILED: "#dc2626",
    JobState.CANCELLED: "#d97706",
}
STATE_ICONS: dict[JobState, str] = {
    JobState.COMPLETED: "\u2714",  # check mark
    JobState.FAILED: "\u2716",  # heavy x
    JobState.CANCELLED: "\u25a0",  # square
}


# --------------------------------------------------------------------------------------------
# Formatters
# --------------------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover


def fmt_money(value: float | None, *, per_hour: bool = False) -> str:
    if value is None:
        return "-"
    text = f"${value:.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"
    return text + ("/h" if per_hour else "")


def fmt_loss(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4g}"
    return "-"


def finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML (and its attributes)."""
    return html.escape(str(value), quote=True)


def state_of(job: Any) -> JobState:
    """The state of a Job record (or anything with a ``state``); PENDING for what is not a state."""
    state = getattr(job, "state", None)
    if isinstance(state, JobState):
        return state
    try:
        return JobState(str(state))
    except ValueError:
        return JobState.PENDING


def state_label(state: JobState) -> str:
    """The badge's text: the state, with an icon once it ended (``✔ COMPLETED``)."""
    icon = STATE_ICONS.get(state, "")
    return f"{icon} {state.value}" if icon else state.value


def badge_html(state: JobState) -> str:
    color = STATE_COLORS.get(state, "#6b7280")
    return (
        f"<span class='trainorch-badge' data-state='{state.value}' style='background:{color};color:#fff;"
        f"border-radius:9px;padding:1px 8px;font-size:11px;font-weight:600;white-space:nowrap'>"
        f"{esc(state_label(state))}</span>"
    )


# --------------------------------------------------------------------------------------------
# Metrics in brief
# --------------------------------------------------------------------------------------------


@dataclass
class MetricSummary:
    """What a job's metrics say in brief: the last step, the total, the last train loss.

    Reads metric objects (PROTOCOL.md §1) the same way the panel's progress does, without keeping the curves:
    O(1) per metric, so a board of many long runs never holds or re-reads whole metric histories.
    """

    step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    count: int = 0

    def add(self, metric: Any) -> None:
        if not isinstance(metric, Mapping):
            return
        self.count += 1
        kind = str(metric.get("kind") or "train")
        step = as_int(metric.get("step"))
        total = as_int(metric.get("total_steps"))
        if total is not None and total > 0:
            self.total_steps = total
        if step is not None:
            self.step = step if self.step is None else max(self.step, step)
        if kind not in ("eval", "summary"):
            loss = finite(metric.get("loss"))
            if loss is not None and finite(metric.get("step")) is not None:
                self.last_loss = loss

    def then(self, newer: MetricSummary) -> MetricSummary:
        """This summary followed by ``newer`` (the metrics that came after it)."""
        steps = [s for s in (self.step, newer.step) if s is not None]
        return MetricSummary(
            step=max(steps) if steps else None,
            total_steps=newer.total_steps if newer.total_steps is not None else self.total_steps,
            last_loss=newer.last_loss if newer.last_loss is not None else self.last_loss,
            count=self.count + newer.count,
        )

    @property
    def fraction(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return max(0.0, min(1.0, self.step / self.total_steps))


def summarize_metrics(metrics: Iterable[Any]) -> MetricSummary:
    summary = MetricSummary()
    for m in metrics:
        summary.add(m)
    return summary


class Steps(Protocol):
    """What progress is read from: a :class:`MetricSummary`, or the panel's fuller ``Progress``."""

    step: int | None
    total_steps: int | None

    @property
    def fraction(self) -> float | None: ...


def progress_fraction(state: JobState, summary: Steps | None) -> float | None:
    """0..1, or None when the job says nothing of its total; a completed job that reported steps is done."""
    if summary is None:
        return 1.0 if state is JobState.COMPLETED else None
    frac = summary.fraction
    if frac is None and state is JobState.COMPLETED and summary.step is not None:
        return 1.0
    return frac


def progress_text(state: JobState, summary: Steps | None) -> str:
    """``step 30/100 · 30%`` (or ``step 30/?``, or ``-`` before the first step)."""
    if summary is None or summary.step is None:
        return "-"
    frac = progress_fraction(state, summary)
    text = f"step {summary.step}/{summary.total_steps if summary.total_steps else '?'}"
    return text + (f" \u00b7 {frac * 100:.0f}%" if frac is not None else "")


def cost_text(job: Job) -> str:
    """What the job's machine has cost so far (``-`` where there is no price: the local provider)."""
    return fmt_money(job.cost_so_far)


def status_text(running: int, cost_usd: float) -> str:
    """The status bar's words: ``2 running · $1.23``."""
    return f"{running} running \u00b7 {fmt_money(cost_usd)}"


# --------------------------------------------------------------------------------------------
# The server API's JobSummary
# --------------------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _first_line(text: str | None) -> str | None:
    if not text or not text.strip():
        return None
    return text.strip().splitlines()[0]


def artifacts_dir_of(job: Job, workspace: Path, root_dir: Path | None) -> str | None:
    """The folder of the job's verified files, relative to ``root_dir`` (the Jupyter server's, which the file
    browser shows, ``/`` separated); None when it has none yet or it lies outside ``root_dir``."""
    folder = Path(job.artifacts[0].path).parent if job.artifacts else workspace / "artifacts" / job.id
    if not job.artifacts and not folder.is_dir():
        return None
    if root_dir is None:
        return None
    try:
        rel = folder.resolve().relative_to(root_dir.resolve())
    except ValueError:
        return None
    return rel.as_posix() if rel.parts else ""


def job_summary(job: Job, metrics: MetricSummary | None, *, workspace: Path, root_dir: Path | None,
                artifacts_dir: str | bool | None = True) -> dict[str, Any]:
    """The server API's ``JobSummary`` of ``job`` (``docs/server-api.yaml``).

    ``artifacts_dir``: True to work it out (a file-system look), else the value to use."""
    state = job.state
    frac = progress_fraction(state, metrics)
    loss = metrics.last_loss if metrics is not None else None
    rel = artifacts_dir_of(job, workspace, root_dir) if artifacts_dir is True else artifacts_dir
    cost = job.cost_so_far
    return {
        "id": job.id,
        "name": job.spec.name,
        "provider": job.provider,
        "state": state.value,
        "live": state.is_live,
        "progress": frac,
        "step": metrics.step if metrics is not None else None,
        "total_steps": metrics.total_steps if metrics is not None else None,
        "last_loss": loss,
        "cost_usd": None if cost is None else round(cost, 6),
        "price_per_hour": job.price_per_hour,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
        "error": _first_line(job.error),
        "artifacts_dir": rel if isinstance(rel, str) else None,
        "gpu": job.gpu,
        "display": {
            "state_label": state_label(state),
            "state_color": STATE_COLORS.get(state, "#6b7280"),
            "progress_text": progress_text(state, metrics),
            "loss_text": fmt_loss(loss),
            "cost_text": fmt_money(cost),
        },
    }
