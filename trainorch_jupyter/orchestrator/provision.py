"""Provision: get a machine whose runner answers, for a new job or for one picked up again.

Money safety starts here: the intent to create is persisted (a "reconcile" entry on the reap list) before the
provider's create call, the machine goes on the reap list before anything else is written about it, and a
create that failed or timed out is reconciled by the job's tag (what it made anyway is destroyed). A job
re-attached after a restart gets its machine back (``_resume_handle``), followed to a new address or served
again by the provider from its saved state when the runner ended its life on schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from ..model import Job, JobSpec, JobState, ProviderError, utcnow
from ..providers import Bootstrap, MachineHandle, MachineStatus, PollResult, Provider
from ..store import LeaseLost
from . import settings
from .base import OrchestratorBase, _transient

log = logging.getLogger("trainorch_jupyter")


class ProvisionStage(OrchestratorBase):
    """Mixin: create (or find again) a job's machine and wait until its runner answers."""

    async def _provision(self, job: Job, provider: Provider, *, launch_spec: JobSpec | None = None,
                         timeout_s: float | None = None) -> MachineHandle:
        """Create the job's machine and wait until its runner answers.

        Money safety: the intent is persisted (a "reconcile" entry on the reap list) before the create
        call; the machine is on the reap list before anything else is written about it; any error after
        the create destroys it (or leaves it to the reaper, which retries until its provider confirms)."""
        if job.state is JobState.PENDING:
            await self._set_state(job, JobState.PROVISIONING)
        elif job.machine_id is None:
            # Interrupted between persisting the intent and recording the machine: find what exists.
            await self._reconcile(job, provider)
        self._check_cancel(job)
        token = secrets.token_urlsafe(32)
        await self._store_write(self.store.set_runner_token, job.id, token, fence=self._fence(job.id))
        bootstrap = self._bootstrap(job, token, provider)
        intent = _intent_id(job.id)
        await self._store_write(self.store.add_reap, provider.name, intent, {}, job_id=job.id, kind="reconcile")
        timeout = provider.provision_timeout_s if timeout_s is None else timeout_s
        # ``launch_spec``: what this provider is asked for (``--provider auto`` turns an offer into a spec); the
        # job's record keeps the user's own spec.
        launching = job if launch_spec is None else dataclasses.replace(job, spec=launch_spec)
        try:
            handle = await asyncio.wait_for(provider.launch(launching, bootstrap), timeout)
        except BaseException:
            # A create that failed, timed out or was interrupted may still have made a machine: find it by
            # its tag and destroy it; if even that fails, the reaper tries again later (and after a restart).
            await self._reconcile(job, provider)
            raise
        try:
            await self._store_write(self.store.add_reap, provider.name, handle.machine_id, _handle_dict(handle),
                                    job_id=job.id)
            await self._store_write(self.store.reap_done, provider.name, intent)
            job.machine_id = handle.machine_id
            job.machine = dict(handle.data)
            if bootstrap.channel is not None:  # the certificate is public: the client pins it (its key stays out)
                job.machine["tls_cert"] = bootstrap.channel.cert_pem
            job.billing_since = utcnow()
            job.billing_until = None
            job.price_per_hour = handle.price_per_hour
            job.gpu = handle.gpu
            job.runner_url = handle.runner_url
            await self._save(job)
            await self._wait_machine(job, provider, handle, timeout)
        except LeaseLost:
            raise  # the new driver owns the machine now
        except BaseException:
            await self._terminate(provider, handle, job)
            raise
        return handle

    def _bootstrap(self, job: Job, token: str, provider: Provider) -> Bootstrap:
        """What the machine needs to run the runner for ``job``; the runner's life is bounded in every state
        (idle before the start, the max runtime while running, a retention time after the command exits).
        A remote machine also gets the job's own TLS key material and the runner's hash (for its stage-0), and
        the provider's dead-man hook: the machine destroys itself when the runner's life ends."""
        source = _runner_source()
        bootstrap = Bootstrap(job_id=job.id, token=token, runner_source=source,
                              idle_timeout_s=settings.RUNNER_IDLE_S, retention_s=settings.RUNNER_RETENTION_S,
                              packages=remote_packages(job.spec) if provider.remote else [])
        if provider.remote:
            from ..remote import new_channel_keys

            bootstrap.channel = new_channel_keys()
            bootstrap.runner_sha256 = hashlib.sha256(source.encode()).hexdigest()
            bootstrap.on_exit = provider.on_exit_hook()
        return bootstrap

    async def _reconcile(self, job: Job, provider: Provider) -> None:
        """Destroy whatever machine a create for ``job`` may have made; on failure leave it to the reaper."""
        intent = _intent_id(job.id)
        try:
            for _ in range(3):
                try:
                    found = await asyncio.wait_for(provider.reconcile(job), 60.0)
                    break
                except Exception as exc:
                    if not _transient(exc):
                        raise
                    await asyncio.sleep(2.0)
            else:
                found = await asyncio.wait_for(provider.reconcile(job), 60.0)
            for orphan in found:
                await self._store_write(self.store.add_reap, provider.name, orphan.machine_id, _handle_dict(orphan),
                                        job_id=job.id)
                await self._terminate(provider, orphan, job)
            await self._store_write(self.store.reap_done, provider.name, intent)
        except Exception as exc:
            log.warning("job %s: could not look for machines left by its create (%s); the reaper will", job.id, exc)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.mark_reap_due, provider.name, intent, str(exc)[:500])

    async def _wait_machine(self, job: Job, provider: Provider, handle: MachineHandle,
                            timeout_s: float | None = None) -> None:
        """Until the machine is up and its runner answers, within the provider's deadline. Provider API
        errors that may pass (429, 5xx, the network) are ridden out inside the deadline."""
        timeout = provider.provision_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while True:
            self._check_cancel(job)
            try:
                result = await provider.poll(handle)
            except Exception as exc:
                if not _transient(exc) or time.monotonic() > deadline:
                    raise
                log.info("job %s: polling its machine failed (%s); retrying", job.id, exc)
                await asyncio.sleep(2.0)
                continue
            if result.status is MachineStatus.READY and result.runner_url:
                handle.runner_url = job.runner_url = result.runner_url
                break
            if result.status in (MachineStatus.FAILED, MachineStatus.GONE):
                raise ProviderError(job.provider, f"the machine {handle.machine_id} is {result.status.value}: {result.detail}")
            if time.monotonic() > deadline:
                raise ProviderError(job.provider, f"the machine was not ready within {timeout:.0f}s")
            await asyncio.sleep(2.0)
        await self._save(job)
        await self._ensure_runner(job, provider, deadline)

    async def _resume_handle(self, job: Job, provider: Provider) -> MachineHandle | None:
        if job.state is JobState.PENDING or job.machine_id is None:
            return None
        handle = MachineHandle(provider=job.provider, machine_id=job.machine_id, runner_url=job.runner_url,
                               data=dict(job.machine), price_per_hour=job.price_per_hour, gpu=job.gpu)
        result = await self._poll(provider, handle)
        if result.status is MachineStatus.READY and result.runner_url:
            if result.runner_url != job.runner_url:  # the machine is reached elsewhere now
                handle.runner_url = job.runner_url = result.runner_url
                await self._save(job)
            if job.state is JobState.PROVISIONING:  # the kernel may have gone before the runner was pushed
                await self._ensure_runner(job, provider, time.monotonic() + provider.provision_timeout_s)
            return handle
        if result.status in (MachineStatus.PROVISIONING, MachineStatus.READY):
            await self._wait_machine(job, provider, handle)
            return handle
        # The machine is gone. A runner that ended its life on schedule (its retention after the command
        # exited) left its state behind where the provider can serve it again (local: the state dir).
        serve_again = getattr(provider, "serve_again", None)
        token = await asyncio.to_thread(self.store.runner_token, job.id)
        if serve_again is not None and token:
            again = await serve_again(job, token)
            if again is not None:
                await self._store_write(self.store.add_reap, provider.name, again.machine_id, _handle_dict(again),
                                        job_id=job.id)
                job.machine_id, job.machine, job.runner_url = again.machine_id, dict(again.data), again.runner_url
                await self._save(job)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.reap_done, provider.name, handle.machine_id)
                return again
        raise ProviderError(job.provider, f"the machine {job.machine_id} was lost while the orchestrator was away ({result.detail or result.status.value})")

    async def _poll(self, provider: Provider, handle: MachineHandle) -> PollResult:
        """``provider.poll`` with transient API errors (429, 5xx, the network) retried for POLL_RETRY_S."""
        deadline = time.monotonic() + settings.POLL_RETRY_S
        delay = 1.0
        while True:
            try:
                return await provider.poll(handle)
            except Exception as exc:
                if not _transient(exc) or time.monotonic() > deadline:
                    raise
                log.info("polling %s machine %s failed (%s); retrying", provider.name, handle.machine_id, exc)
                await asyncio.sleep(delay)
                delay = min(15.0, delay * 2)


def _runner_source() -> str:
    """The runner's source (``trainorch_jupyter/runner.py``), shipped to the machine as it is."""
    return (Path(__file__).resolve().parent.parent / "runner.py").read_text()


def _intent_id(job_id: str) -> str:
    """The reap-list key of a create whose result is not known yet (found by the job's tag)."""
    return f"create:{job_id}"


def _handle_dict(handle: MachineHandle) -> dict[str, Any]:
    return {"runner_url": handle.runner_url, "data": dict(handle.data), "price_per_hour": handle.price_per_hour,
            "gpu": handle.gpu}


def remote_packages(spec: JobSpec) -> list[str]:
    """What a remote machine must pip-install before a trainer job: the requirements of this package's
    ``train`` extra and its own (this package itself travels as a wheel input, built from the running code)."""
    if spec.train is None:
        return []
    import importlib.metadata
    import re

    try:
        reqs = importlib.metadata.requires("trainorch-jupyter") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    out = []
    for req in reqs:
        name, _, marker = req.partition(";")
        marker = marker.strip()
        if not marker or re.fullmatch(r"""extra\s*==\s*["']train["']""", marker):
            if not re.match(r"(ipython|ipywidgets|httpx|tenacity|cryptography|trainorch)", name.strip(), re.I):
                out.append(name.strip())
    return out or ["torch>=2.2", "transformers>=4.45", "peft>=0.13", "safetensors>=0.4", "tokenizers>=0.19",
                   "PyYAML>=6.0"]
