"""The reaper: destroy every machine on the workspace's persisted reap list that no live job owns; and
``cleanup``: every machine this tool tagged on the providers' accounts that no live job owns.

The list holds machines a driver could not confirm gone, and "reconcile" entries for creates whose result is
not known (found by the job's tag). The housekeeping runs ``areap`` every REAP_POLL_S; a failing entry is
retried with a backoff (up to REAP_MAX_BACKOFF_S) for as long as it takes, across restarts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..model import SpecError
from ..providers import MachineHandle, Provider
from ..store import ReapEntry
from . import settings
from .base import OrchestratorBase

log = logging.getLogger("trainorch_jupyter")


class Reaper(OrchestratorBase):
    """Mixin: the reap list and its reaping."""

    def cleanup(self, yes: bool = False, *, all_workspaces: bool = False) -> list[dict[str, Any]]:
        """Every machine tagged by this tool that no live job of this workspace owns, with its $/h, from each
        provider that can list its machines (and has a key). With ``yes``, destroy those of this workspace
        (and of every workspace with ``all_workspaces``); each row says what happened."""
        return self._call(self.acleanup(yes, all_workspaces=all_workspaces), timeout=900)

    async def acleanup(self, yes: bool = False, *, all_workspaces: bool = False) -> list[dict[str, Any]]:
        jobs = await asyncio.to_thread(self.store.list_jobs)
        live = {(j.provider, j.machine_id): j.id for j in jobs if j.state.is_live and j.machine_id}
        workspace_id = await asyncio.to_thread(self.store.workspace_id)
        rows: list[dict[str, Any]] = []
        for name in sorted(self._provider_classes):
            cls = self._provider_classes[name]
            if cls.list_machines is Provider.list_machines:
                continue  # this provider cannot list what it made (local: nothing bills)
            try:
                provider = self.provider(name)
                machines = await provider.list_machines()
            except Exception as exc:  # no key, or the API refused: say so and go on with the others
                rows.append({"provider": name, "machine_id": None, "error": str(exc).splitlines()[0]})
                continue
            for handle in machines:
                job_id = handle.data.get("job_id")
                ours = handle.data.get("workspace_id") == workspace_id
                row: dict[str, Any] = {
                    "provider": name, "machine_id": handle.machine_id, "name": handle.data.get("name"),
                    "job_id": job_id, "workspace": "this" if ours else "other",
                    "price_per_hour": handle.price_per_hour, "state": handle.data.get("status"),
                    "destroyed": False,
                }
                if (name, handle.machine_id) in live:
                    continue  # a live job's machine: its driver releases it
                if not ours and not all_workspaces:
                    continue  # another workspace's (its own jobs may be live): see all_workspaces
                if yes and (ours or all_workspaces):
                    await asyncio.to_thread(self.store.add_reap, name, handle.machine_id,
                                            {"runner_url": None, "data": dict(handle.data),
                                             "price_per_hour": handle.price_per_hour, "gpu": handle.gpu},
                                            job_id=job_id if ours else None, due=True)
                    try:
                        await provider.terminate(handle)
                    except Exception as exc:
                        row["error"] = f"not destroyed yet ({exc}); it stays on the reap list"
                    else:
                        await asyncio.to_thread(self.store.reap_done, name, handle.machine_id)
                        row["destroyed"] = True
                rows.append(row)
        return rows

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
