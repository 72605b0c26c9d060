"""The flusher: one thread, one message budget for every view of this kernel, and the parts it refreshes.

Orchestrator events only hand data to a view (O(1), on the orchestrator's loop thread); the one flusher thread
(:class:`_Scheduler`) wakes ~10 times a second and lets each registered view turn its dirty parts
(:class:`_Part`: one widget trait, a minimum interval, sent only when its value changed) into comm messages, all
views together within ONE token bucket of ~20 messages/s and ~400 KB/s, far below Jupyter's IOPub limits
(1000 msgs/s, 1 MB/s), whatever the number of panels or the log rate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable

import ipywidgets

log = logging.getLogger("trainorch_jupyter.widgets")  # one logger for the whole package, as before the split

#: Comm messages per second for every view of this kernel together (token bucket refill rate).
GLOBAL_MSGS_PER_S = 20.0
#: Bytes per second of widget values for every view together.
GLOBAL_BYTES_PER_S = 400_000.0
#: How often the flusher wakes up.
TICK_S = 0.1
#: Views that were shown and whose every view was closed are refreshed this rarely.
HIDDEN_INTERVAL_S = 5.0




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


def _walk(widget: ipywidgets.Widget) -> Iterable[ipywidgets.Widget]:
    for child in getattr(widget, "children", ()):
        yield from _walk(child)
    yield widget


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

