"""Connect: every request to a job's runner goes through ``_persist``, which rides out a runner that is
unreachable for a while (network blips, a proxy cutting requests) and follows a machine its provider now
reaches at another address (``_moved``).

A machine its provider reports gone fails the job at once instead of after ``unreachable_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx

from ..model import ProviderError, RunnerError
from ..providers import MachineHandle, MachineStatus
from ..runner_client import RunnerHTTPError
from . import settings
from .base import OrchestratorBase, _transient

log = logging.getLogger("trainorch_jupyter")
T = TypeVar("T")


class ConnectStage(OrchestratorBase):
    """Mixin: reach a job's runner, and keep reaching it."""

    async def _persist(self, what: str, fn: Callable[[], Coroutine[Any, Any, T]], job_id: str | None = None) -> T:
        """Call ``fn`` until it succeeds, riding out a runner that is unreachable for a while.

        A 4xx answer is final; transport errors and 5xx are retried up to ``unreachable_timeout_s``. With
        ``job_id``, the job's provider is asked (at most every MACHINE_CHECK_S) whether the machine still
        exists -- a machine that is gone fails the job at once instead of after the timeout, and a machine
        now reached at another address is followed there. A provider API that errs meanwhile is no verdict."""
        since: float | None = None
        checked = 0.0
        delay = 0.25
        while True:
            try:
                return await fn()
            except RunnerHTTPError as exc:
                if exc.status < 500:
                    raise
                error: Exception = exc
            except (RunnerError, httpx.TransportError) as exc:
                error = exc
            now = time.monotonic()
            since = since or now
            if now - since > self.unreachable_timeout_s:
                raise RunnerError(f"{what}: the runner was unreachable for {now - since:.0f}s ({error})")
            machine = self._machines.get(job_id) if job_id else None
            if machine is not None and now - checked >= settings.MACHINE_CHECK_S:
                checked = now
                provider, handle = machine
                try:
                    result = await provider.poll(handle)
                except Exception as exc:
                    if not _transient(exc):
                        raise
                    log.info("%s: the provider could not be asked about the machine (%s)", what, exc)
                else:
                    if result.status in (MachineStatus.GONE, MachineStatus.FAILED):
                        raise ProviderError(provider.name, f"{what}: the machine {handle.machine_id} is "
                                            f"{result.status.value} ({result.detail or 'no detail'})")
                    if result.status is MachineStatus.READY and result.runner_url and job_id is not None:
                        await self._moved(job_id, handle, result.runner_url)
            log.debug("%s: %s; retrying in %.2fs", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _moved(self, job_id: str, handle: MachineHandle, url: str) -> None:
        """The provider reaches the machine at ``url`` now (a new IP or port mapping): follow it there."""
        client = self._clients.get(job_id)
        if client is None or client.base_url == url.rstrip("/"):
            return
        log.info("job %s: its runner is now reached at a new address", job_id)
        client.base_url = url.rstrip("/")
        handle.runner_url = url
        job = self._jobs.get(job_id)
        if job is not None:
            job.runner_url = url
            await self._save(job)
