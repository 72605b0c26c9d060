"""The orchestrator's own asyncio loop, run in one daemon thread, and the bridges into it.

The notebook's thread never runs job work itself: it hands a coroutine to this loop (``_submit``), waits for
one (``_call``, never from the loop thread), or awaits one from another loop (``_bridge``: IPython's
top-level ``await``). Nothing here knows about jobs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopOwner:
    """Mixin: owns an event loop running in a daemon thread (started by :meth:`_start_loop`)."""

    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _ready: threading.Event
    _closed: bool  # set by the owner once closed: nothing more is accepted

    def _start_loop(self, name: str) -> None:
        """Make the loop, start its thread and return once the loop runs."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=name, daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    def _stop_loop(self, timeout: float) -> None:
        """Stop the loop and wait (up to ``timeout``) for its thread to end."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise RuntimeError("this orchestrator is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it (never from the loop thread itself)."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a blocking orchestrator call was made from its own loop thread; use the async method")
        return self._submit(coro).result(timeout)

    async def _bridge(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the orchestrator's loop from any other loop (IPython's top-level await)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return await coro
        return await asyncio.wrap_future(self._submit(coro))

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the loop thread."""
        if self._loop.is_closed():
            return  # the orchestrator was closed: nothing runs on its loop any more
        self._loop.call_soon_threadsafe(fn)
