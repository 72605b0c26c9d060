"""Training progress from metric objects (PROTOCOL.md §1), and the loss chart: a small inline SVG.

The chart is an ``HTML`` widget's value: one message per redraw, ~10 bytes per point (decimated above
:data:`CHART_MAX_POINTS` per series), no JS dependency, and it stays visible in a saved notebook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..jobview import as_int as _int
from ..jobview import finite as _finite

#: Points per chart series above which the chart is decimated (min/max per bucket).
CHART_MAX_POINTS = 2000




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

