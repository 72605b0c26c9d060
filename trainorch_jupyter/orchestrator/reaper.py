"""The reaper: destroy every machine on the workspace's persisted reap list that no live job owns.

The list holds machines a driver could not confirm gone, and "reconcile" entries for creates whose result is
not known (found by the job's tag). The housekeeping runs ``areap`` every REAP_POLL_S; a failing entry is
retried with a backoff (up to REAP_MAX_BACKOFF_S) for as long as it takes, across restarts.
"""

from __future__ import annotations

import asyncio
import logging

from ..model import SpecError
from ..providers import MachineHandle
from ..store import ReapEntry
from . import settings
from .base import OrchestratorBase

log = logging.getLogger("trainorch_jupyter")


class Reaper(OrchestratorBase):
    """Mixin: the reap list and its reaping."""

    def reap_list(self) -> list[ReapEntry]:
        """Machines this workspace still has to destroy (or to look for, after a create that failed)."""
        return self.store.reap_entries()

    def reap(self) -> int:
        """Try now to destroy every machine on the reap list that no live job owns; how many are gone."""
        return self._call(self.areap())

    async def areap(self) -> int:
        entries = await asyncio.to_thread(self.store.reap_entries, due_only=True)
        gone = 0
        for entry in entries:
            key = (entry.provider, entry.machine_id)
            if key in self._reaping or (entry.job_id in self._tasks and not entry.due):
                continue
            self._reaping.add(key)
            try:
                gone += await self._reap_one(entry)
            finally:
                self._reaping.discard(key)
        return gone

    async def _reap_one(self, entry: ReapEntry) -> int:
        try:
            provider = self.provider(entry.provider)
        except SpecError:
            log.error("the reap list has a %s machine %s, but no such provider is installed", entry.provider,
                      entry.machine_id)
            await asyncio.to_thread(self.store.reap_failed, entry.provider, entry.machine_id,
                                    "provider not installed", settings.REAP_MAX_BACKOFF_S)
            return 0
        try:
            if entry.kind == "reconcile":
                job = await asyncio.to_thread(self.store.get, str(entry.job_id))
                for orphan in await provider.reconcile(job):
                    await provider.terminate(orphan)
            else:
                await provider.terminate(MachineHandle(provider=entry.provider, machine_id=entry.machine_id,
                                                       **entry.handle))
        except Exception as exc:
            retry = min(settings.REAP_MAX_BACKOFF_S, settings.REAP_POLL_S * 2 ** min(entry.attempts, 10))
            log.warning("reaping %s machine %s failed (%s); next try in %.0fs", entry.provider, entry.machine_id,
                        exc, retry)
            await asyncio.to_thread(self.store.reap_failed, entry.provider, entry.machine_id, str(exc)[:500], retry)
            return 0
        await asyncio.to_thread(self.store.reap_done, entry.provider, entry.machine_id)
        log.info("reaped %s machine %s (job %s)", entry.provider, entry.machine_id, entry.job_id)
        return 1
