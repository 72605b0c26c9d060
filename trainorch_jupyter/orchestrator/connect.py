"""Connect: every request to a job's runner goes through ``_persist``, which rides out a runner that is
unreachable for a while (network blips, a proxy cutting requests) and follows a machine its provider now
reaches at another address (``_moved``).

A machine its provider reports gone fails the job at once instead of after ``unreachable_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx

from ..model import Job, ProviderError, RunnerError
from ..providers import MachineHandle, MachineStatus, Provider
from ..runner_client import RunnerClient, RunnerHTTPError
from . import settings
from .base import OrchestratorBase, _transient
from .provision import _runner_source

log = logging.getLogger("trainorch_jupyter")
T = TypeVar("T")


class ConnectStage(OrchestratorBase):
    """Mixin: reach a job's runner, and keep reaching it."""

    def _runner_http(self, job: Job) -> httpx.AsyncClient:
        """The HTTP client for ``job``'s runner: for a remote machine one of its own, whose only trust anchor is
        the job's own certificate (a man in the middle presenting any other is refused before a byte of the
        request, token included, is sent); for the local runner on loopback the shared one."""
        cert = job.machine.get("tls_cert")
        if not cert:
            return self._http
        http = self._runner_https.get(job.id)
        if http is None:
            from ..remote import runner_http_client

            http = self._runner_https[job.id] = runner_http_client(str(cert))
        return http

    async def _close_runner_http(self, job_id: str) -> None:
        http = self._runner_https.pop(job_id, None)
        if http is not None:
            with contextlib.suppress(Exception):
                await http.aclose()

    async def _ensure_runner(self, job: Job, provider: Provider, deadline: float) -> None:
        """A remote machine starts with stage-0: push it the runner (stage-0 accepts only the bytes whose hash
        its start command carries) unless the full runner already answers, then wait until it does."""
        token = await asyncio.to_thread(self.store.runner_token, job.id)
        assert token is not None
        http = self._runner_http(job)
        if job.machine.get("tls_cert"):
            from ..remote import push_runner

            await push_runner(http, str(job.runner_url), token, _runner_source().encode(),
                              timeout=max(10.0, deadline - time.monotonic()))
        client = RunnerClient(str(job.runner_url), token, http=http)
        await client.wait_ready(timeout=max(5.0, deadline - time.monotonic()))

    async def _persist(self, what: str, fn: Callable[[], Coroutine[Any, Any, T]], job_id: str | None = None, *,
                       bounded: bool = True) -> T:
        """Call ``fn`` until it succeeds, riding out a runner that is unreachable for a while.

        A 4xx answer is final; transport errors and 5xx are retried until ``unreachable_timeout_s`` has passed
        since the runner last answered the job (not since the first error: a frozen runner that accepts
        connections and never answers makes each call hang until the client's own retries give up). Each call
        is cut at that deadline too, though never shorter than a long poll (``bounded=False`` for an upload or a
        download, which may rightly take longer and time out on their own when no byte moves). With ``job_id``,
        the job's provider is asked (at most every MACHINE_CHECK_S) whether the machine still exists -- a machine
        that is gone fails the job at once instead of after the timeout, and a machine now reached at another
        address is followed there. A provider API that errs meanwhile is no verdict."""
        start = time.monotonic()
        since: float | None = None
        checked = 0.0
        delay = 0.25
        while True:
            last_ok = max(start, self._last_ok.get(job_id, start)) if job_id else start
            try:
                if bounded:
                    left = last_ok + self.unreachable_timeout_s - time.monotonic()
                    result = await asyncio.wait_for(fn(), max(settings.MIN_CALL_S, left))
                else:
                    result = await fn()
            except RunnerHTTPError as exc:
                if exc.status < 500:
                    raise
                error: Exception = exc
            except (RunnerError, httpx.TransportError, TimeoutError) as exc:
                error = exc
            else:
                if job_id:
                    self._last_ok[job_id] = time.monotonic()
                return result
            now = time.monotonic()
            since = since or now
            silent = now - (last_ok if bounded else since)
            if silent > self.unreachable_timeout_s:
                detail = str(error) or type(error).__name__
                raise RunnerError(f"{what}: the runner was unreachable for {silent:.0f}s ({detail})")
            machine = self._machines.get(job_id) if job_id else None
            if machine is not None and now - checked >= settings.MACHINE_CHECK_S:
                checked = now
                provider, handle = machine
                try:
                    polled = await provider.poll(handle)
                except Exception as exc:
                    if not _transient(exc):
                        raise
                    log.info("%s: the provider could not be asked about the machine (%s)", what, exc)
                else:
                    if polled.status in (MachineStatus.GONE, MachineStatus.FAILED):
                        raise ProviderError(provider.name, f"{what}: the machine {handle.machine_id} is "
                                            f"{polled.status.value} ({polled.detail or 'no detail'})")
                    if polled.status is MachineStatus.READY and polled.runner_url and job_id is not None:
                        await self._moved(job_id, handle, polled.runner_url)
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
