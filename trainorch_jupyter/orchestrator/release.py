"""Release: terminate a job's machine and have its provider confirm it gone, on every way out of a drive.

Tries go on for TERMINATE_GIVE_UP_S; a machine not confirmed gone by then stays on the persisted reap list,
where the reaper (``reaper.py``) keeps trying, across restarts, until it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..model import Job, utcnow
from ..providers import MachineHandle, Provider
from . import settings
from .base import OrchestratorBase

log = logging.getLogger("trainorch_jupyter")


class ReleaseStage(OrchestratorBase):
    """Mixin: give a job's machine back."""

    async def _terminate(self, provider: Provider, handle: MachineHandle, job: Job) -> None:
        """Terminate and confirm, retrying on a schedule for TERMINATE_GIVE_UP_S; a machine not confirmed
        gone by then is handed to the reaper, which keeps trying (across restarts) until it is."""
        started = time.monotonic()
        delay = 1.0
        while True:
            try:
                await provider.terminate(handle)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.mark_reap_due, provider.name, handle.machine_id,
                                            "interrupted while terminating")
                raise
            except Exception as exc:
                if time.monotonic() - started > settings.TERMINATE_GIVE_UP_S:
                    log.error("could not terminate %s machine %s of job %s yet (%s); it stays on the reap list "
                              "and is retried until its provider confirms it gone", provider.name,
                              handle.machine_id, job.id, exc)
                    await asyncio.to_thread(self.store.mark_reap_due, provider.name, handle.machine_id, str(exc)[:500])
                    job.error = ((job.error + "\n") if job.error else "") + (
                        f"WARNING: the {provider.name} machine {handle.machine_id} could not be terminated yet "
                        f"({exc}); trainorch keeps trying (see Orchestrator.reap_list())")
                    return
                await asyncio.sleep(delay)
                delay = min(settings.TERMINATE_RETRY_S, delay * 2)
            else:
                await self._store_write(self.store.reap_done, provider.name, handle.machine_id)
                if job.machine_id == handle.machine_id and job.billing_since is not None:
                    job.billing_until = utcnow()  # confirmed gone: it bills no more
                return
