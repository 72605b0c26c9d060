"""The notebook face's widgets: a live panel per job, a dashboard of the workspace's jobs.

Only this module imports ipywidgets. It builds on the orchestrator's public API (docs/API.md).

How updates reach the browser without hurting the kernel
---------------------------------------------------------
* Orchestrator events (log lines, metrics, state changes) arrive on the orchestrator's loop thread,
  which drives every job. A callback only hands the event over: it appends it to the view's inbox
  (or folds a metric into a per-job summary) under the view's ``_lock``, which nothing ever holds
  for more than such O(1) work, and returns. It never touches a widget, the store, or a lock held
  across I/O, rendering or a comm message (``_model_lock``): a slow store read (SQLite waiting up
  to 30 s on another kernel's write) or a slow comm message cannot stall the jobs.
* The flusher thread drains the inboxes into each view's model and renders, under ``_model_lock``.
  Store reads happen at construction (on the caller's thread) or, for the dashboard, on its own
  worker thread, once per job.
* One flusher thread per process (:class:`_Scheduler`) wakes ~10 times a second and lets each view
  (panel or dashboard) turn its dirty parts into trait values. Every part has a minimum interval
  (a few updates a second per panel), a trait is only set when its value really changed (so only
  changed values are sent), and all views together share ONE token bucket of ~20 comm messages/s
  and ~400 KB/s: far below Jupyter's IOPub limits (1000 msgs/s, 1 MB/s), whatever the number of
  panels or the log rate.
* The log view is a bounded deque of the last N lines rendered into one HTML value on a timer;
  the Output widget's per-call stdout append (which resends the whole output list each time) is never used.
* The loss chart is a light inline SVG in an ``HTML`` widget: one message per redraw, ~10 bytes
  per point (decimated above :data:`CHART_MAX_POINTS` per series), no JS dependency, and it stays
  visible in a saved notebook.

Buttons while another cell runs
-------------------------------
A click is a ``comm_msg`` on the kernel's shell channel. On the main shell it waits until a busy cell
ends (ipywidgets#3468; measured with ipykernel 7.4: a click sent 1 s into a ``time.sleep(6)`` cell
ran 5 s later). ipykernel 7 has kernel subshells (JEP 91), and JupyterLab >= 4.4 sends widget comm
messages over a subshell of its own by default (``commsOverSubshells: perCommTarget``). But
ipykernel 7.4 hands a ``comm_msg`` to the subshell that last sent on that comm (its private
``Comm._reply_subshell_for``): the main shell, for a panel a cell showed. :class:`_SubshellRouter`
overrides that hook on our buttons' comms (checked signature; a log line where it cannot apply): a
message the frontend sent over a live subshell is handled there (the official path); one sent on the
main shell (the classic notebook, ``commsOverSubshells: disabled``) or on a subshell that is gone goes
to a subshell this kernel makes for the panels (a public ``create_subshell_request``). Where none of
that is available (ipykernel 6, other kernels) the buttons still work, after the busy cell.
``TRAINORCH_WIDGET_SUBSHELL``: ``auto`` (default), ``frontend`` (only the frontend's subshell), ``0``.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets

from .model import ArtifactInfo, Job, JobState

log = logging.getLogger(__name__)

__all__ = [
    "Dashboard",
    "JobPanel",
    "display_dashboard",
    "display_job",
    "render_loss_svg",
    "text_summary",
]

# --------------------------------------------------------------------------------------------
# Tunables
# --------------------------------------------------------------------------------------------

#: Comm messages per second for every view of this kernel together (token bucket refill rate).
GLOBAL_MSGS_PER_S = 20.0
#: Bytes per second of widget values for every view together.
GLOBAL_BYTES_PER_S = 400_000.0
#: How often the flusher wakes up.
TICK_S = 0.1
#: Minimum seconds between two updates of one part of a panel.
HEADER_INTERVAL_S = 0.5
LOG_INTERVAL_S = 0.5
CHART_INTERVAL_S = 1.0
DASHBOARD_INTERVAL_S = 1.0
#: Views that were shown and whose every view was closed are refreshed this rarely.
HIDDEN_INTERVAL_S = 5.0
#: Points per chart series above which the chart is decimated (min/max per bucket).
CHART_MAX_POINTS = 2000
#: Longest log line shown in a panel (the whole line stays in the log file).
MAX_LINE_CHARS = 2000
#: Rows shown in the dashboard's table.
DASHBOARD_MAX_ROWS = 100
#: How long a new dashboard waits for its rows' summaries (read off the loop thread) before its first render.
DASHBOARD_FIRST_WAIT_S = 1.0
#: Characters of log events a panel keeps waiting for the flusher before it drops those it could not show.
PENDING_LOG_CHARS = 4 << 20
#: How long the Download button waits for its download before it stops waiting (and can be clicked again).
DOWNLOAD_WAIT_S = 900.0

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
# Formatting helpers
# --------------------------------------------------------------------------------------------


def _fmt_duration(seconds: float | None) -> str:
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


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover


def _fmt_money(value: float | None, *, per_hour: bool = False) -> str:
    if value is None:
        return "-"
    text = f"${value:.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"
    return text + ("/h" if per_hour else "")


def _fmt_loss(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4g}"
    return "-"


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _badge(state: JobState) -> str:
    color = STATE_COLORS.get(state, "#6b7280")
    icon = STATE_ICONS.get(state, "")
    label = f"{icon} {state.value}" if icon else state.value
    return (
        f"<span class='trainorch-badge' data-state='{state.value}' style='background:{color};color:#fff;"
        f"border-radius:9px;padding:1px 8px;font-size:11px;font-weight:600;white-space:nowrap'>{_esc(label)}</span>"
    )


def _state_of(job: Any) -> JobState:
    state = getattr(job, "state", None)
    if isinstance(state, JobState):
        return state
    try:
        return JobState(str(state))
    except ValueError:
        return JobState.PENDING


# --------------------------------------------------------------------------------------------
# Training progress, built from metric objects (PROTOCOL.md §1)
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the metrics say so far: loss curves, step/total, ETA."""

    train: list[tuple[float, float]] = field(default_factory=list)  # (step, loss)
    eval: list[tuple[float, float]] = field(default_factory=list)  # (step, eval loss)
    step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None
    last_eval_loss: float | None = None
    eta_s: float | None = None  # reported by the job
    count: int = 0
    # (wall time, step) of the first and the last metric seen live, for an ETA estimate.
    first_seen: tuple[float, int] | None = None
    last_seen: tuple[float, int] | None = None

    def add(self, metric: Mapping[str, Any], when: float | None = None) -> None:
        if not isinstance(metric, Mapping):
            return
        self.count += 1
        kind = str(metric.get("kind") or "train")
        step_f = _finite(metric.get("step"))
        step = _int(metric.get("step"))
        total = _int(metric.get("total_steps"))
        if total is not None and total > 0:
            self.total_steps = total
        if step is not None and (self.step is None or step >= self.step or kind == "train"):
            self.step = step if self.step is None else max(self.step, step)
        eta = _finite(metric.get("eta_s"))
        if eta is not None:
            self.eta_s = eta
        if kind == "eval":
            value = _finite(metric.get("eval_loss"))
            if value is None:
                value = _finite(metric.get("loss"))
            if value is not None:
                self.eval.append((step_f if step_f is not None else float(self.step or 0), value))
                self.last_eval_loss = value
        elif kind == "summary":
            value = _finite(metric.get("eval_loss"))
            if value is not None:
                self.last_eval_loss = value
        else:
            loss = _finite(metric.get("loss"))
            if loss is not None and step_f is not None:
                self.train.append((step_f, loss))
                self.last_loss = loss
            ev = _finite(metric.get("eval_loss"))
            if ev is not None and step_f is not None:
                self.eval.append((step_f, ev))
                self.last_eval_loss = ev
        if when is not None and step is not None:
            if self.first_seen is None:
                self.first_seen = (when, step)
            self.last_seen = (when, step)

    @property
    def fraction(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return max(0.0, min(1.0, self.step / self.total_steps))

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left: the job's own ``eta_s`` when it gives one, else the live step rate."""
        if self.step is not None and self.total_steps and self.step >= self.total_steps:
            return 0.0
        if self.eta_s is not None:
            return self.eta_s
        if self.first_seen and self.last_seen and self.total_steps and self.step is not None:
            (t0, s0), (t1, s1) = self.first_seen, self.last_seen
            if s1 > s0 and t1 > t0:
                rate = (s1 - s0) / (t1 - t0)
                left = (self.total_steps - self.step) / rate
                if now is not None:
                    left -= max(0.0, now - t1)
                return max(0.0, left)
        return None


# --------------------------------------------------------------------------------------------
# The loss chart: a small inline SVG
# --------------------------------------------------------------------------------------------


def _decimate(points: Sequence[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """At most ~max_points points keeping the first, the last, and each bucket's min and max."""
    n = len(points)
    if n <= max_points:
        return list(points)
    buckets = max(1, (max_points - 2) // 2)
    out = [points[0]]
    inner = points[1:-1]
    size = len(inner) / buckets
    for b in range(buckets):
        chunk = inner[int(b * size): int((b + 1) * size)]
        if not chunk:
            continue
        lo = min(chunk, key=lambda p: p[1])
        hi = max(chunk, key=lambda p: p[1])
        out.extend(sorted({lo, hi}, key=lambda p: p[0]))
    out.append(points[-1])
    return out


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def render_loss_svg(
    train: Sequence[tuple[float, float]],
    eval: Sequence[tuple[float, float]] = (),
    *,
    total_steps: int | None = None,
    width: int = 560,
    height: int = 200,
    max_points: int = CHART_MAX_POINTS,
) -> str:
    """An SVG line chart of train loss (line) and eval loss (line + dots) by step.

    Every point is drawn up to ``max_points`` per series; above that each series is decimated to
    the min and max of equal buckets (the curve's envelope is kept). The root element carries
    ``data-train-points`` / ``data-eval-points`` (points received) and ``data-drawn-train``.
    """
    left, right, top, bottom = 46, 12, 10, 26
    pw, ph = width - left - right, height - top - bottom
    tr = _decimate(train, max_points)
    ev = _decimate(eval, max_points)
    xs = [p[0] for p in tr] + [p[0] for p in ev]
    ys = [p[1] for p in tr] + [p[1] for p in ev]
    attrs = (
        f"data-train-points='{len(train)}' data-eval-points='{len(eval)}' data-drawn-train='{len(tr)}' "
        f"data-drawn-eval='{len(ev)}'"
    )
    head = (
        f"<svg class='trainorch-chart' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {attrs} style='font:10px sans-serif;max-width:100%'>"
    )
    frame = f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#d1d5db'/>"
    if not ys:
        return (head + frame + f"<text x='{left + pw / 2}' y='{top + ph / 2}' text-anchor='middle' fill='#9ca3af'>"
                "no loss reported yet</text></svg>")
    # The x axis ends at the last step seen (the progress bar shows how far to total_steps), so
    # the start of a long run is not squeezed into the left edge.
    x0 = 0.0
    x1 = max(max(xs), 1.0)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [head, frame]
    for t in _nice_ticks(y0, y1, 4):
        yy = sy(t)
        parts.append(f"<line x1='{left}' x2='{left + pw}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#f3f4f6'/>"
                     f"<text x='{left - 4}' y='{yy + 3:.1f}' text-anchor='end' fill='#6b7280'>{t:.3g}</text>")
    for t in _nice_ticks(x0, x1, 5):
        xx = sx(t)
        parts.append(f"<text x='{xx:.1f}' y='{top + ph + 14}' text-anchor='middle' fill='#6b7280'>{t:g}</text>")
    parts.append(f"<text x='{left + pw}' y='{height - 2}' text-anchor='end' fill='#6b7280'>step</text>")
    if tr:
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in tr)
        parts.append(f"<polyline class='train' fill='none' stroke='#2563eb' stroke-width='1.5' points='{pts}'/>")
    if ev:
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ev)
        parts.append(f"<polyline class='eval' fill='none' stroke='#ea580c' stroke-width='1.5' "
                     f"stroke-dasharray='4 2' points='{pts}'/>")
        if len(ev) <= 200:
            parts.extend(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='#ea580c'/>" for x, y in ev)
    lx = left + 8
    parts.append(f"<line x1='{lx}' x2='{lx + 14}' y1='{top + 10}' y2='{top + 10}' stroke='#2563eb' stroke-width='2'/>"
                 f"<text x='{lx + 18}' y='{top + 13}' fill='#374151'>train loss</text>")
    if ev:
        parts.append(f"<line x1='{lx + 80}' x2='{lx + 94}' y1='{top + 10}' y2='{top + 10}' stroke='#ea580c' "
                     f"stroke-width='2' stroke-dasharray='4 2'/><text x='{lx + 98}' y='{top + 13}' fill='#374151'>"
                     "eval loss</text>")
    parts.append("</svg>")
    return "".join(parts)


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
# The flusher: one thread, one message budget for every view
# --------------------------------------------------------------------------------------------


class Budget:
    """Message and byte allowance left for this tick."""

    def __init__(self, msgs: float, nbytes: float, *, bytes_full: bool = False) -> None:
        self.msgs = msgs
        self.bytes = nbytes
        self.bytes_full = bytes_full  # the byte bucket is full: let one large value through
        self.sent_msgs = 0
        self.sent_bytes = 0

    def can_send(self, size: int) -> bool:
        return self.msgs >= 1 and (size <= self.bytes or self.bytes_full)

    def spend(self, size: int) -> None:
        self.msgs -= 1
        self.bytes -= size
        self.bytes_full = False
        self.sent_msgs += 1
        self.sent_bytes += size


class _View:
    """What the scheduler drives: something with dirty parts to flush."""

    def _flush(self, now: float, budget: Budget) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _wants_flush(self, now: float) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    # Set by the widget classes that mix this in.
    _lock: threading.Lock
    _closed: bool
    _unsubscribe: Callable[[], None]
    _scheduler: _Scheduler

    def _detach(self) -> bool:
        """Stop events and flushes for this view; False when it was closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        with contextlib.suppress(Exception):
            self._unsubscribe()
        self._scheduler.unregister(self)
        return True

    def _close_children(self) -> None:
        for child in _walk(self):
            if child is not self:
                with contextlib.suppress(Exception):
                    child.close()


class _Scheduler:
    """Flushes every registered view from one daemon thread, under one global token bucket."""

    def __init__(self, msgs_per_s: float = GLOBAL_MSGS_PER_S, bytes_per_s: float = GLOBAL_BYTES_PER_S,
                 tick_s: float = TICK_S, clock: Callable[[], float] = time.monotonic, *,
                 autostart: bool = True) -> None:
        self.autostart = autostart
        self.msgs_per_s = msgs_per_s
        self.bytes_per_s = bytes_per_s
        self.tick_s = tick_s
        self.clock = clock
        self._views: list[weakref.ref[_View]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._msgs = msgs_per_s
        self._bytes = bytes_per_s
        self._last_refill: float | None = None
        self._rr = 0
        self.sent_msgs = 0
        self.sent_bytes = 0

    def register(self, view: _View, *, start: bool = True) -> None:
        with self._lock:
            self._views.append(weakref.ref(view))
            if start and self.autostart and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="trainorch-widgets", daemon=True)
                self._thread.start()
        self._wake.set()

    def unregister(self, view: _View) -> None:
        with self._lock:
            self._views = [r for r in self._views if r() is not None and r() is not view]

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.tick_s)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # never let the flusher die
                log.exception("widget flush failed")
            time.sleep(self.tick_s)  # ticks never come faster than tick_s, whatever pokes

    def tick(self, now: float | None = None) -> Budget:
        """Refill the buckets and flush the views that want it, round robin, within the budget."""
        now = self.clock() if now is None else now
        if self._last_refill is None:
            self._last_refill = now
        dt = max(0.0, now - self._last_refill)
        self._last_refill = max(now, self._last_refill)
        self._msgs = min(self.msgs_per_s, self._msgs + dt * self.msgs_per_s)
        self._bytes = min(self.bytes_per_s, self._bytes + dt * self.bytes_per_s)
        budget = Budget(self._msgs, self._bytes, bytes_full=self._bytes >= self.bytes_per_s)
        with self._lock:
            views = [v for v in (r() for r in self._views) if v is not None]
            self._views = [weakref.ref(v) for v in views]
        if views:
            start = self._rr % len(views)
            order = views[start:] + views[:start]
            self._rr = start + 1
            for view in order:
                if budget.msgs < 1:
                    break
                if view._wants_flush(now):
                    view._flush(now, budget)
        self._msgs = budget.msgs
        self._bytes = budget.bytes
        self.sent_msgs += budget.sent_msgs
        self.sent_bytes += budget.sent_bytes
        return budget


_scheduler = _Scheduler()


def get_scheduler() -> _Scheduler:
    return _scheduler


# --------------------------------------------------------------------------------------------
# Routing button clicks to a kernel subshell (so they act during a busy cell)
# --------------------------------------------------------------------------------------------


class _SubshellRouter:
    """Where the frontend's messages to our buttons' comms are handled, so that a click acts during a busy cell.

    What happens without it (measured with JupyterLab 4.6.6 and ipykernel 7.4.0): JupyterLab sends every
    widget comm message over a kernel subshell of its own (setting ``commsOverSubshells``, default
    ``perCommTarget``), but ipykernel's shell-channel thread re-routes a ``comm_msg`` to the subshell
    ``Comm._reply_subshell_for(data, default)`` names: the one that last *sent* on that comm. A panel's
    comms were opened by the cell that showed it, on the main shell, so the click is sent back to the
    main shell and waits for the busy cell. With the classic notebook, VS Code or ``commsOverSubshells:
    disabled`` the click comes on the main shell in the first place.

    So each button's comm gets its own ``_reply_subshell_for`` (the fallback on a private hook, guarded):

    * the frontend sent the message over a live subshell (the official path): it is handled there;
    * else (no subshell from the frontend, or a stale one): on this kernel's own subshell, made once per
      kernel with a public ``create_subshell_request`` (mode ``auto``, the default), when it still exists;
    * else on the main shell, as ipykernel would (a click then waits for a busy cell).

    ``TRAINORCH_WIDGET_SUBSHELL``: ``auto`` (default), ``frontend`` (only the frontend's subshell, no
    subshell of our own), ``0``/``off`` (no hook at all: ipykernel's own routing).
    The hook is installed only where ipykernel has subshells and a ``_reply_subshell_for(data, default)``;
    otherwise one log line says why (a warning where the kernel has subshells but the hook changed).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subshell_id: str | None = None
        self._failed = False
        self.reason: str | None = None  # why the buttons cannot act during a busy cell here, if they cannot
        self._said: set[str] = set()
        self.stale: list[str] = []  # subshell ids found gone when a click came (ours or the frontend's)

    @staticmethod
    def mode() -> str:
        value = os.environ.get("TRAINORCH_WIDGET_SUBSHELL", "auto").strip().lower()
        if value in ("0", "false", "no", "off"):
            return "off"
        return "frontend" if value == "frontend" else "auto"

    def _say(self, level: int, text: str) -> None:
        """Log ``text`` once per process."""
        with self._lock:
            if text in self._said:
                return
            self._said.add(text)
        log.log(level, "%s", text)

    def subshell_id(self) -> str | None:
        """This kernel's own subshell for the buttons (made on first use); None where there is none."""
        if self.mode() != "auto":
            return None
        with self._lock:
            if self._subshell_id is None and not self._failed:
                try:
                    self._subshell_id = _create_subshell()
                    if self._subshell_id is None:
                        self._failed = True
                except Exception as exc:  # any failure: the buttons still work through the main shell
                    self._failed = True
                    self.reason = f"no kernel subshell could be made: {type(exc).__name__}: {exc}"
                    log.debug("no kernel subshell for widget clicks: %s", self.reason)
            return self._subshell_id

    def route(self, widget: ipywidgets.Widget) -> bool:
        """Install the hook on ``widget``'s comm. False where it cannot apply (the reason is logged once)."""
        if self.mode() == "off":
            return False
        comm = getattr(widget, "comm", None)
        if comm is None:
            return False
        problem, level = _hook_problem(comm)
        if problem is not None:
            self.reason = problem
            self._say(level, f"trainorch panels: {problem}; a click on a panel's button waits while another "
                             "cell runs")
            return False
        own = self.mode() == "auto"
        if own:
            self.subshell_id()

        def hook(data: Any, default: str | None) -> str | None:
            return self._route(data, default, own=own)

        try:
            comm._reply_subshell_for = hook
        except Exception as exc:
            self.reason = f"cannot set Comm._reply_subshell_for: {exc}"
            self._say(logging.WARNING, f"trainorch panels: {self.reason}")
            return False
        return True

    def _route(self, data: Any, default: str | None, *, own: bool = True) -> str | None:
        """ipykernel's question, asked on its shell-channel thread for each message to a routed comm: which
        subshell handles it (None: the main shell). ``default`` is the subshell the frontend addressed;
        ``own``: this kernel's subshell may serve the messages the frontend sent elsewhere."""
        live = _live_subshells()
        if default is not None and (live is None or default in live):
            return default  # the frontend's own subshell (JupyterLab's commsOverSubshells)
        mine = self._subshell_id if own else None
        if mine is not None and live is not None and mine not in live:
            with self._lock:
                if self._subshell_id == mine:
                    self._subshell_id = None  # the next panel makes a new one
            self._gone(mine, "this kernel's own", None)
            mine = None
        if default is not None:
            self._gone(default, "the frontend's", mine)
        return mine

    def _gone(self, subshell_id: str, whose: str, instead: str | None) -> None:
        self.stale.append(subshell_id)
        del self.stale[:-20]
        where = ("the main shell (a click waits while another cell runs)" if instead is None
                 else "this kernel's own subshell")
        self._say(logging.WARNING, f"trainorch panels: {whose} subshell {subshell_id} is gone (deleted, or from "
                                   f"before a kernel restart); the panels' clicks go to {where}")


def _hook_problem(comm: Any) -> tuple[str | None, int]:
    """Why the click hook cannot apply to ``comm`` (and the log level to say it at), or (None, 0)."""
    try:
        import ipykernel
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return "not in an IPython kernel", logging.DEBUG
    if not Kernel.initialized():
        return "not in an IPython kernel", logging.DEBUG
    version = getattr(ipykernel, "__version__", "?")
    if not getattr(Kernel.instance(), "_supports_kernel_subshells", False):
        return f"ipykernel {version} has no kernel subshells", logging.INFO
    hook = getattr(comm, "_reply_subshell_for", None)
    if hook is None:
        return (f"ipykernel {version}: its Comm has no _reply_subshell_for(data, default) to route clicks "
                "to a subshell"), logging.WARNING
    try:
        params = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if [p.name for p in params] != ["data", "default"] or any(p.kind not in positional for p in params):
        return (f"ipykernel {version}: Comm._reply_subshell_for{inspect.signature(hook) if params else '(?)'} "
                "is not the (data, default) this hook was written for"), logging.WARNING
    return None, 0


def _kernel_subshell_manager() -> Any:
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return None
    if not Kernel.initialized():
        return None
    thread = getattr(Kernel.instance(), "shell_channel_thread", None)
    return getattr(thread, "manager", None)


def _live_subshells() -> set[str] | None:
    """The kernel's subshell ids now; None when they cannot be read."""
    manager = _kernel_subshell_manager()
    try:
        return set(manager.list_subshell()) if manager is not None else None
    except Exception:
        return None


def _click_context() -> dict[str, Any]:
    """Where the running click handler runs: thread, subshell (None: main shell), the subshell the frontend addressed."""
    info: dict[str, Any] = {"thread": threading.current_thread().name, "subshell": None, "addressed": None}
    manager = _kernel_subshell_manager()
    with contextlib.suppress(Exception):
        info["subshell"] = manager.subshell_id_from_thread_id(threading.get_ident()) if manager else None
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        parent = kernel.get_parent() if kernel is not None else None
        info["addressed"] = ((parent or {}).get("header") or {}).get("subshell_id")
    return info


def _create_subshell() -> str | None:
    """Ask our own kernel, on its control channel, for a subshell (JEP 91). None if unsupported."""
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return None
    if not Kernel.initialized():
        return None
    kernel = Kernel.instance()
    if not getattr(kernel, "_supports_kernel_subshells", False):
        return None
    import ipykernel
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=ipykernel.get_connection_file())
    client.load_connection_file()
    client.start_channels(shell=False, iopub=False, stdin=False, hb=False, control=True)
    try:
        msg = client.session.msg("create_subshell_request", {})
        client.control_channel.send(msg)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            reply = client.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                content = reply["content"]
                if content.get("status") == "ok" and content.get("subshell_id"):
                    return str(content["subshell_id"])
                return None
        return None
    finally:
        client.stop_channels()


_router = _SubshellRouter()


# --------------------------------------------------------------------------------------------
# A part of a view: one widget trait refreshed at most every `interval` seconds
# --------------------------------------------------------------------------------------------


class _Part:
    """One widget trait fed from a render function, with a dirty flag and a minimum interval."""

    def __init__(self, widget: ipywidgets.Widget, render: Callable[[float], str], interval: float,
                 trait: str = "value") -> None:
        self.widget = widget
        self.render = render
        self.interval = interval
        self.trait = trait
        self.dirty = True
        self.last = -math.inf
        self.updates = 0

    def due(self, now: float, interval: float | None = None) -> bool:
        return self.dirty and now - self.last >= (self.interval if interval is None else interval)

    def flush(self, now: float, budget: Budget, interval: float | None = None) -> None:
        if not self.due(now, interval) or budget.msgs < 1:
            return
        value = self.render(now)
        if value == getattr(self.widget, self.trait):
            self.dirty = False
            self.last = now
            return
        size = len(value.encode("utf-8", "replace")) + 120  # + the message envelope
        if not budget.can_send(size):
            return
        setattr(self.widget, self.trait, value)
        budget.spend(size)
        self.dirty = False
        self.last = now
        self.updates += 1


def _hide(widget: ipywidgets.DOMWidget, hidden: bool) -> None:
    want = "none" if hidden else None
    if widget.layout.display != want:
        widget.layout.display = want


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
            ("cost", _fmt_money(job.cost_so_far)),
        ]
        fact_html = " &middot; ".join(f"<span title='{k}'>{k} <b>{v}</b></span>" for k, v in facts)
        frac = prog.fraction
        if state is JobState.COMPLETED and frac is None and prog.step is not None:
            frac = 1.0
        pct = 0.0 if frac is None else frac * 100
        color = STATE_COLORS.get(state, "#2563eb")
        steps = f"step {prog.step if prog.step is not None else '-'}/{prog.total_steps if prog.total_steps else '?'}"
        eta = prog.eta(time.time()) if state.is_live else None
        bits = [steps, f"{pct:.0f}%" if frac is not None else ""]
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
        return text_summary(self._job, progress=self._progress)


@dataclass
class _PanelEvent:
    """An event a panel makes for itself (a download's end), drained like the orchestrator's."""

    job_id: str
    kind: str
    data: Any
    time: float = field(default_factory=time.time)


def _walk(widget: ipywidgets.Widget) -> Iterable[ipywidgets.Widget]:
    for child in getattr(widget, "children", ()):
        yield from _walk(child)
    yield widget


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


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------


@dataclass
class _Summary:
    """What the dashboard shows of a job's metrics: the last step, the total, the last train loss.

    Built from the store once per job (off the loop thread), then kept up to date from metric
    events, O(1) each: a board of many long runs never holds or re-reads whole metric histories.
    """

    step: int | None = None
    total_steps: int | None = None
    last_loss: float | None = None

    def add(self, metric: Any) -> None:
        """The same reading of a metric as :meth:`Progress.add`, without keeping the curves."""
        if not isinstance(metric, Mapping):
            return
        kind = str(metric.get("kind") or "train")
        step = _int(metric.get("step"))
        total = _int(metric.get("total_steps"))
        if total is not None and total > 0:
            self.total_steps = total
        if step is not None:
            self.step = step if self.step is None else max(self.step, step)
        if kind not in ("eval", "summary"):
            loss = _finite(metric.get("loss"))
            if loss is not None and _finite(metric.get("step")) is not None:
                self.last_loss = loss

    def then(self, newer: _Summary) -> _Summary:
        """This summary followed by ``newer`` (the metrics that came after it)."""
        steps = [s for s in (self.step, newer.step) if s is not None]
        return _Summary(
            step=max(steps) if steps else None,
            total_steps=newer.total_steps if newer.total_steps is not None else self.total_steps,
            last_loss=newer.last_loss if newer.last_loss is not None else self.last_loss,
        )

    @property
    def fraction(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return max(0.0, min(1.0, self.step / self.total_steps))


@dataclass
class _Row:
    job: Job


class Dashboard(ipywidgets.VBox, _View):
    """Every job of the workspace in one live table, with filters, and a job's panel on demand.

    Locks: ``_lock`` guards only the inbox (state events and per-job metric summaries handed over
    by the orchestrator's loop thread) and is held for O(1) work. ``_model_lock`` guards the rows,
    summaries and widgets and may be held while rendering and sending; callbacks never take it.
    The store is read by a worker thread (each shown job's metrics, once), never under a lock a
    callback needs.
    """

    def __init__(self, orchestrator: Any, *, state: str | None = None, provider: str | None = None,
                 scheduler: _Scheduler | None = None, route_clicks: bool = True) -> None:
        self._orch = orchestrator
        self._scheduler = scheduler or _scheduler
        self._lock = threading.Lock()  # the inbox: O(1) work only, taken by the loop thread's callbacks
        self._model_lock = threading.RLock()  # rows, summaries, widgets: never taken by a callback
        self._summary_ready = threading.Condition(self._model_lock)
        self._closed = False
        # The inbox (under _lock): what the events said since the flusher last drained it.
        self._in_states: list[tuple[float, Job]] = []
        self._in_metrics: dict[str, _Summary] = {}
        # The model (under _model_lock).
        self._rows: dict[str, _Row] = {}
        self._base: dict[str, _Summary] = {}  # read from the store, once per job, by the worker
        self._live: dict[str, _Summary] = {}  # from the metric events since this board subscribed
        self._to_read: deque[str] = deque()  # jobs whose metrics the worker is to read
        self._requested: set[str] = set()
        self._worker: threading.Thread | None = None
        self._selector_dirty = True
        self._notices: deque[tuple[float, str, JobState]] = deque(maxlen=5)
        self.panel: JobPanel | None = None
        self._parts: dict[str, _Part] = {}
        # Subscribe before the store is read: a job created meanwhile comes with its first event.
        self._unsubscribe = orchestrator.subscribe(self._on_event, job_id=None)

        try:
            jobs = list(orchestrator.jobs())
        except BaseException:
            self._closed = True
            self._unsubscribe()
            raise
        # Installed providers, those of the workspace's jobs (one may be uninstalled since) and the one
        # asked for: a filter is never silently dropped for lack of an option.
        providers = sorted(set(getattr(orchestrator, "provider_names", []) or []) | {"local"}
                           | {j.provider for j in jobs} | ({provider} if provider else set()))
        self.state_filter = ipywidgets.Dropdown(options=[("all states", "")] + [(s.value, s.value) for s in JobState],
                                                value=(state.upper() if state else ""), description="state",
                                                layout=ipywidgets.Layout(width="220px"))
        self.provider_filter = ipywidgets.Dropdown(options=[("all providers", "")] + [(p, p) for p in providers],
                                                   value=provider if provider in providers else "",
                                                   description="provider", layout=ipywidgets.Layout(width="240px"))
        self.table = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%"))
        self.notice = ipywidgets.HTML()
        self.selector = ipywidgets.Select(options=[], rows=5, description="open", layout=ipywidgets.Layout(width="60%"))
        self.open_button = ipywidgets.Button(description="Open panel", icon="external-link",
                                             layout=ipywidgets.Layout(width="auto"))
        self.detail = ipywidgets.VBox()
        self.state_filter.observe(self._on_filter, "value")
        self.provider_filter.observe(self._on_filter, "value")
        self.open_button.on_click(self._on_open)
        self.selector.observe(self._on_select, "value")
        if route_clicks:
            for w in (self.open_button, self.selector, self.state_filter, self.provider_filter):
                _router.route(w)
        self._parts = {
            "table": _Part(self.table, self._render_table, DASHBOARD_INTERVAL_S),
            "notice": _Part(self.notice, self._render_notice, 0.0),
        }
        self._last_tick = -math.inf
        super().__init__([ipywidgets.HTML(_PANEL_CSS), ipywidgets.HBox([self.state_filter, self.provider_filter]),
                          self.notice, self.table, ipywidgets.HBox([self.selector, self.open_button]), self.detail])
        self.add_class("trainorch-dashboard")
        self._install(jobs)
        # The first render: the worker reads the shown jobs' metrics; wait a little for them, so the
        # table is complete when shown unless the store is slow (then the rows fill in as they come).
        with self._model_lock:
            ids = [r.job.id for r in self._visible_rows()]
            self._want_summaries(ids)
            self._summary_ready.wait_for(lambda: all(i in self._base for i in ids), timeout=DASHBOARD_FIRST_WAIT_S)
        self._flush_all(self._scheduler.clock())
        self._scheduler.register(self)

    # -- events (the orchestrator's loop thread): O(1), never blocked ---------------------------

    def _on_event(self, event: Any) -> None:
        kind = event.kind
        if self._closed or kind not in ("state", "metric"):
            return  # logs and artifacts are not shown here
        data = event.data
        with self._lock:
            if kind == "state":
                if isinstance(data, Job):
                    self._in_states.append((time.time(), data))
            else:
                summary = self._in_metrics.get(event.job_id)
                if summary is None:
                    summary = self._in_metrics[event.job_id] = _Summary()
                summary.add(data)
        self._scheduler.poke()

    # -- the model (under _model_lock) ------------------------------------------------------------

    def _drain(self) -> None:
        """Apply what the events said since the last drain."""
        with self._lock:
            if not self._in_states and not self._in_metrics:
                return
            states, self._in_states = self._in_states, []
            metrics, self._in_metrics = self._in_metrics, {}
        for when, job in states:
            row = self._rows.get(job.id)
            if row is None:  # a new job: its record came with the event
                self._rows[job.id] = _Row(job)
            elif job.updated_at >= row.job.updated_at:
                before = row.job.state
                row.job = job
                if job.state.is_terminal and before is not job.state:
                    self._notices.append((when, job.id, job.state))
                    self._mark("notice")
            self._selector_dirty = True  # a row may have come, or moved in or out of the filter
            self._mark("table")
        for job_id, summary in metrics.items():
            live = self._live.get(job_id)
            self._live[job_id] = summary if live is None else live.then(summary)
        if metrics:
            self._mark("table")

    def _install(self, jobs: Iterable[Job]) -> None:
        """Rows for the store's records (a record older than the one an event brought is ignored)."""
        with self._model_lock:
            for job in jobs:
                row = self._rows.get(job.id)
                if row is None:
                    self._rows[job.id] = _Row(job)
                elif job.updated_at > row.job.updated_at:
                    row.job = job
            self._selector_dirty = True
            self._mark("table")

    def _summary(self, job_id: str) -> tuple[_Summary, bool]:
        """The job's summary: the store's (once read) followed by the events'; and whether the store's is in."""
        base, live = self._base.get(job_id), self._live.get(job_id)
        if base is None:
            return (live or _Summary()), False
        return (base if live is None else base.then(live)), True

    def _want_summaries(self, job_ids: Iterable[str]) -> None:
        """Have the worker read these jobs' metrics (each job once)."""
        with self._model_lock:
            if self._closed:
                return
            for job_id in job_ids:
                if job_id not in self._base and job_id not in self._requested:
                    self._requested.add(job_id)
                    self._to_read.append(job_id)
            if self._to_read and self._worker is None:
                self._worker = threading.Thread(target=self._read_summaries, name="trainorch-dashboard-store",
                                                daemon=True)
                self._worker.start()

    def _read_summaries(self) -> None:
        """The worker: read the requested jobs' metrics from the store, then exit (it comes back on demand)."""
        while True:
            with self._model_lock:
                if self._closed or not self._to_read:
                    self._worker = None
                    return
                job_id = self._to_read.popleft()
            summary = _Summary()
            try:
                for m in self._orch.store.metrics(job_id):  # may wait on SQLite: no lock held here
                    summary.add(m)
            except Exception:
                log.debug("could not read the metrics of %s", job_id, exc_info=True)
            with self._model_lock:
                self._base[job_id] = summary
                self._mark("table")
                self._summary_ready.notify_all()
            self._scheduler.poke()

    def _mark(self, *names: str) -> None:
        for name in names:
            part = self._parts.get(name)
            if part is not None:
                part.dirty = True

    def _visible_rows(self) -> list[_Row]:
        state, provider = self.state_filter.value, self.provider_filter.value
        rows = [r for r in self._rows.values()
                if (not state or r.job.state.value == state) and (not provider or r.job.provider == provider)]
        rows.sort(key=lambda r: r.job.created_at, reverse=True)
        return rows[:DASHBOARD_MAX_ROWS]

    def _update_selector(self) -> bool:
        """Offer the shown jobs in the selector; True if its options changed."""
        with self._model_lock:
            self._drain()
            self._selector_dirty = False
            ids = [r.job.id for r in self._visible_rows()]
        # Outside the model lock: setting the value may open a panel (which reads the store).
        options = [(f"{i}", i) for i in ids]
        if list(self.selector.options) == options:
            return False
        current = self.selector.value
        with self.selector.hold_trait_notifications():
            self.selector.options = options
            self.selector.value = current if current in ids else None
        return True

    # -- flushing (the scheduler's thread) --------------------------------------------------------

    def _wants_flush(self, now: float) -> bool:
        if self._closed:
            return False
        with self._model_lock:
            self._drain()
            if now - self._last_tick >= 5.0 and any(r.job.state.is_live for r in self._rows.values()):
                self._last_tick = now
                self._mark("table")  # ages and costs move
            return self._selector_dirty or any(p.dirty for p in self._parts.values())

    def _flush(self, now: float, budget: Budget) -> None:
        if self._selector_dirty and budget.msgs >= 2 and self._update_selector():
            budget.spend(200)
        with self._model_lock:
            for name in ("notice", "table"):
                self._parts[name].flush(now, budget)

    def _flush_all(self, now: float) -> None:
        if self._selector_dirty:
            self._update_selector()
        budget = Budget(math.inf, math.inf)
        with self._model_lock:
            self._drain()
            for part in self._parts.values():
                part.flush(now, budget, 0.0)

    def flush_now(self) -> None:
        self._flush_all(self._scheduler.clock())

    # -- rendering (under _model_lock; in-memory only) ----------------------------------------------

    def _render_table(self, now: float) -> str:
        with self._model_lock:
            rows = self._visible_rows()
            total = len(self._rows)
            self._want_summaries(r.job.id for r in rows)
            wall = time.time()
            body = []
            for r in rows:
                job = r.job
                prog, loaded = self._summary(job.id)
                frac = prog.fraction
                if frac is None and job.state is JobState.COMPLETED and prog.step is not None:
                    frac = 1.0
                pct = ("" if loaded else "\u2026") if frac is None else f"{frac * 100:.0f}%"
                bar = ("" if frac is None else
                       f"<div style='display:inline-block;width:60px;height:6px;background:#e5e7eb;border-radius:3px;"
                       f"vertical-align:middle;margin-right:4px'><div style='width:{frac * 100:.0f}%;height:100%;"
                       f"background:{STATE_COLORS[job.state]};border-radius:3px'></div></div>")
                loss = _fmt_loss(prog.last_loss) if loaded or prog.last_loss is not None else "\u2026"
                age = wall - job.created_at.timestamp()
                body.append(
                    f"<tr class='trainorch-row' data-job-id='{_esc(job.id)}' data-state='{job.state.value}'>"
                    f"<td><code>{_esc(job.id)}</code></td><td>{_esc(job.spec.name)}</td><td>{_esc(job.provider)}</td>"
                    f"<td>{_badge(job.state)}</td><td style='white-space:nowrap'>{bar}{pct}</td>"
                    f"<td>{loss}</td><td>{_fmt_money(job.cost_so_far)}</td>"
                    f"<td>{_fmt_duration(age)}</td></tr>"
                )
        if not body:
            return f"<div style='font-size:12px;color:#6b7280'>no jobs match ({total} in the workspace)</div>"
        return ("<table class='trainorch-table trainorch-jobs'><tr><th>job</th><th>name</th><th>provider</th>"
                "<th>state</th><th>progress</th><th>last loss</th><th>cost</th><th>age</th></tr>"
                + "".join(body) + "</table>"
                + f"<div style='font-size:11px;color:#6b7280'>{len(body)} of {total} jobs</div>")

    def _render_notice(self, now: float) -> str:
        if not self._notices:
            return ""
        items = []
        for when, job_id, state in reversed(self._notices):
            color = STATE_COLORS[state]
            stamp = time.strftime("%H:%M:%S", time.localtime(when))
            items.append(f"<div class='trainorch-notice' data-state='{state.value}' style='border-left:4px solid {color};"
                         f"background:{color}1a;padding:2px 8px;margin:2px 0;font-size:12px'>"
                         f"{STATE_ICONS.get(state, '')} <code>{_esc(job_id)}</code> {state.value.lower()} at {stamp}</div>")
        return "".join(items)

    # -- interaction --------------------------------------------------------------------------

    def _on_filter(self, _change: Any = None) -> None:
        self._update_selector()
        with self._model_lock:
            self._mark("table")
        self._flush_all(self._scheduler.clock())

    def _on_select(self, change: Any) -> None:
        if change.get("new"):
            self.open_job(change["new"])

    def _on_open(self, _button: Any = None) -> None:
        if self.selector.value:
            self.open_job(self.selector.value)

    def open_job(self, job_id: str) -> JobPanel:
        """Show ``job_id``'s panel below the table (closing the previous one)."""
        if self.panel is not None and self.panel.job_id == job_id and not self.panel._closed:
            return self.panel
        old = self.panel
        self.panel = JobPanel(self._orch, job_id, scheduler=self._scheduler)
        self.detail.children = (self.panel,)
        if old is not None:
            old.close()
        return self.panel

    def close(self) -> None:
        if not self._detach():
            return
        with self._model_lock:
            self._to_read.clear()  # the worker ends after the read it may be in
            self._summary_ready.notify_all()
        if self.panel is not None:
            self.panel.close()
        self._close_children()
        super().close()

    def __repr__(self) -> str:
        with self._model_lock:
            rows = self._visible_rows()
        return "\n".join(text_summary(r.job) for r in rows) or "no jobs"


# --------------------------------------------------------------------------------------------
# Display entry points (called by magics) and the terminal fallback
# --------------------------------------------------------------------------------------------


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
