"""Telling others that a job ended: its ``on_done`` callbacks (run in a worker thread) and the webhook.

Only the orchestrator that drove a job posts its webhook; callbacks registered for a job driven elsewhere are
run when the store shows it ended (``_watch_store_until_done``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from ..model import Job
from .base import OrchestratorBase

log = logging.getLogger("trainorch_jupyter")


class Notifier(OrchestratorBase):
    """Mixin: done callbacks and the webhook."""

    def _run_done_callbacks(self, job: Job) -> None:
        """Set the job's done event and hand its ``on_done`` callbacks to a worker thread: a slow callback
        stalls no job, and one that calls ``wait()`` or the sync API works."""
        ev = self._done_events.get(job.id)
        if ev is not None:
            ev.set()
        with self._done_lock:
            callbacks = self._done_callbacks.pop(job.id, [])
        for fn in callbacks:
            try:
                self._callbacks.submit(_run_callback, fn, job)
            except RuntimeError:  # closing: run it here rather than lose it
                _run_callback(fn, job)

    async def _watch_store_until_done(self, job_id: str) -> None:
        while True:
            job = await asyncio.to_thread(self.store.get, job_id)
            if job.state.is_terminal:
                self._run_done_callbacks(job)
                return
            await asyncio.sleep(1.0)

    async def _post_webhook(self, job: Job) -> None:
        text = f"trainorch: job {job.id} {job.state.value}"
        if job.elapsed_s is not None:
            text += f" after {job.elapsed_s:.0f}s"
        if job.artifacts:
            text += f", {len(job.artifacts)} verified files"
        if job.error:
            text += f": {job.error.splitlines()[0]}"
        try:
            await self._http.post(str(self.webhook_url), json={"text": text, "job_id": job.id, "state": job.state.value},
                                  timeout=10.0)
        except httpx.HTTPError as exc:
            log.warning("webhook post failed: %s", type(exc).__name__)


def _run_callback(fn: Callable[[Job], None], job: Job) -> None:
    try:
        fn(job)
    except Exception:
        log.exception("on_done callback failed")
