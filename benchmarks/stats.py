"""How every benchmark measures: a warm-up, then alternated rounds, each ratio reported as median with min-max.

A ratio is formed per round (ours / baseline within the same round), so a slow moment of a shared machine moves
both sides of that round together; the median of the rounds is the figure, min-max says how much to trust it.
The order inside a round alternates (baseline first in even rounds, ours first in odd rounds), so neither side
always runs on the caches, page cache or CPU boost the other one warmed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

ROUNDS = 5


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """``{"median", "min", "max", "n"}`` of ``values``."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternated(sides: dict[str, Callable[[], float]], rounds: int = ROUNDS, warmup: int = 1) -> dict[str, list[float]]:
    """Run every side ``warmup`` times (discarded), then ``rounds`` rounds of each side once, the order of the
    sides rotated each round. Each callable returns its own measurement (seconds, or a rate). Returns the
    measurements per side, round by round."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(sides[name]())
    return out


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios ``num[i] / den[i]``."""
    return [a / b for a, b in zip(num, den, strict=True)]


def line(label: str, s: dict[str, Any], unit: str = "") -> str:
    return f"{label}: {s['median']}{unit} (min {s['min']}, max {s['max']}, {s['n']} rounds)"
