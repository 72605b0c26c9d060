"""Events for jobs driven by another process (another kernel, the Jupyter server): read from the shared store.

The driving orchestrator emits a job's events itself; an orchestrator that only *shows* a job (a panel after a
kernel restart while the server drives it, a dashboard beside another kernel's jobs) gets the same events from the
store: every second, the log bytes appended since, the new metrics rows, and the record when it changed. A watcher
runs only while someone subscribes to the job (or to all jobs) and the job is live and not driven here; it stops
once the job is driven here (its own events flow then) or has ended (after a last read).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from pathlib import Path

from ..model import Job
from .base import OrchestratorBase

log = logging.getLogger("trainorch_jupyter")

WATCH_S = 1.0
#: At most this many log bytes are read from the store per tick of one watcher (the rest on the next ticks).
WATCH_LOG_BYTES = 1 << 20


class WatchStage(OrchestratorBase):
    """Mixin: follow, through the store, the jobs another process drives."""

    def _watch_elsewhere(self, job_id: str | None) -> None:
        """Called on a new subscription: make sure the jobs it covers that are driven elsewhere are watched."""
        if self._closed or self._closing or self.loop.is_closed():
            return
        self.call_soon(lambda: self._start_watch(job_id))

    def _start_watch(self, job_id: str | None) -> None:
        if job_id is None:
            if self._all_watcher is None or self._all_watcher.done():
                self._all_watcher = asyncio.ensure_future(self._watch_all())
            return
        if job_id in self._tasks or job_id in self._watchers:
            return
        self._watchers[job_id] = asyncio.ensure_future(self._watch_job(job_id))

    def _wanted_all(self) -> bool:
        with self._sub_lock:
            return any(jid is None for jid, _ in self._subscribers)

    def _wanted(self, job_id: str) -> bool:
        with self._sub_lock:
            return any(jid is None or jid == job_id for jid, _ in self._subscribers)

    async def _watch_all(self) -> None:
        """While anyone subscribes to every job: watch each live job that no one here drives."""
        while self._wanted_all():
            try:
                live = await asyncio.to_thread(self.store.live_job_ids)
            except Exception:
                live = []
            for job_id in live:
                self._start_watch(job_id)
            await asyncio.sleep(2 * WATCH_S)

    async def _watch_job(self, job_id: str) -> None:
        try:
            await self._watch_job_inner(job_id)
        except Exception:
            log.debug("watching job %s through the store failed", job_id, exc_info=True)
        finally:
            self._watchers.pop(job_id, None)

    async def _watch_job_inner(self, job_id: str) -> None:
        path = self.store.log_path(job_id)
        job = await asyncio.to_thread(self.store.get, job_id)
        offset = await asyncio.to_thread(_size, path)
        seen = len(await asyncio.to_thread(self.store.metrics, job_id))
        last = job.to_dict()
        while True:
            await asyncio.sleep(WATCH_S)
            if job_id in self._tasks:
                return  # driven here now: the drive emits
            job = await asyncio.to_thread(self.store.get, job_id)
            ending = job.state.is_terminal
            data, offset = await asyncio.to_thread(_read_lines, path, offset)
            if data:
                self._emit(job_id, "log", data.decode("utf-8", errors="replace"))
            metrics = await asyncio.to_thread(functools.partial(self.store.metrics, job_id, since=seen))
            for m in metrics:
                self._emit(job_id, "metric", m)
            seen += len(metrics)
            record = job.to_dict()
            if record != last:
                last = record
                self._emit(job_id, "state", Job.from_dict(record))
                if ending and job.artifacts:
                    self._emit(job_id, "artifacts", list(job.artifacts))
            if ending or not self._wanted(job_id):
                return


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_lines(path: Path, offset: int) -> tuple[bytes, int]:
    """Whole lines appended to ``path`` since ``offset`` (a half-written line waits for its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(WATCH_LOG_BYTES)
    except OSError:
        return b"", offset
    cut = data.rfind(b"\n") + 1
    return data[:cut], offset + cut

