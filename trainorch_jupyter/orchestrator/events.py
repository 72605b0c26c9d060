"""The event stream of jobs: :class:`Event` and the subscribe/emit bus.

Stages emit ``state``, ``log``, ``metric`` and ``artifacts`` events on the loop thread; subscribers (the job
panels, ``%train logs -f``, scripts) are called there, in order, and one that raises does not stop the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("trainorch_jupyter")


@dataclass(frozen=True)
class Event:
    job_id: str
    kind: str  # "state" | "log" | "metric" | "artifacts"
    data: Any
    time: float = dataclasses.field(default_factory=time.time)


class EventBus:
    """Mixin: the subscribers of one orchestrator and the ``_emit`` every stage calls."""

    _subscribers: list[tuple[str | None, Callable[[Event], None]]]
    _sub_lock: threading.Lock

    def __init__(self) -> None:
        self._subscribers = []
        self._sub_lock = threading.Lock()

    def subscribe(self, callback: Callable[[Event], None], job_id: str | None = None) -> Callable[[], None]:
        """Call ``callback(event)`` on the loop thread for each event of ``job_id`` (all jobs if None)."""
        entry = (job_id, callback)
        with self._sub_lock:
            self._subscribers.append(entry)

        def unsubscribe() -> None:
            with self._sub_lock, contextlib.suppress(ValueError):
                self._subscribers.remove(entry)

        return unsubscribe

    def _emit(self, job_id: str, kind: str, data: Any) -> None:
        event = Event(job_id, kind, data)
        with self._sub_lock:
            subs = [cb for jid, cb in self._subscribers if jid is None or jid == job_id]
        for cb in subs:
            try:
                cb(event)
            except Exception:
                log.exception("event subscriber failed")
