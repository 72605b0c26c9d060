"""Housekeeping: the one task for what outlives single jobs.

Every CANCEL_POLL_S it reads the store for cancel requests (any process may make one) and honours those of
jobs driven here; every RENEW_S it renews the leases of those jobs (a job whose lease another orchestrator
took is let go at once); every REAP_POLL_S it runs the reaper.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import settings
from .base import OrchestratorBase

log = logging.getLogger("trainorch_jupyter")


class Housekeeping(OrchestratorBase):
    """Mixin: lease renewal, cancel requests from the store, and the reaper's schedule."""

    async def _start_housekeeping(self) -> asyncio.Task[None]:
        """One task for what outlives single jobs: lease renewal (and noticing a lease taken over), cancel
        requests from the store (any process may make one), and the reap list."""

        async def housekeeping() -> None:
            last_renew = last_reap = 0.0
            while True:
                now = time.monotonic()
                try:
                    if now - last_renew >= settings.RENEW_S:
                        last_renew = now
                        await self._renew_leases()
                    await self._poll_cancel_requests()
                    if now - last_reap >= settings.REAP_POLL_S:
                        last_reap = now
                        await self.areap()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a locked db for a moment must not end the housekeeping
                    log.exception("orchestrator housekeeping failed")
                await asyncio.sleep(settings.CANCEL_POLL_S)

        return asyncio.create_task(housekeeping(), name="trainorch-housekeeping")

    async def _renew_leases(self) -> None:
        held = await asyncio.to_thread(self.store.renew, self.owner, settings.LEASE_S)
        for job_id, task in list(self._tasks.items()):
            if job_id not in held and job_id in self._fences and not task.done():
                log.warning("job %s was taken over by another orchestrator: this one stops driving it", job_id)
                self._lost.add(job_id)
                task.cancel()

    async def _poll_cancel_requests(self) -> None:
        driven = [j for j in self._tasks if j not in self._cancel_requested]
        if not driven:
            return
        wanted = await asyncio.to_thread(self.store.cancel_requests, driven)
        for job_id in wanted:
            self._honour_cancel(job_id)
