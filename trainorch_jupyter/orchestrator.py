"""The in-kernel orchestrator: its own asyncio loop in a daemon thread, the job lifecycle, events.

One orchestrator per process (``get_orchestrator()``). The notebook's thread only ever hands work to
the orchestrator's loop and returns: ``submit`` validates and persists the job, schedules it and gives
back a :class:`JobHandle` at once. Public methods come in pairs: ``async def a<name>`` for IPython's
top-level ``await`` and a sync wrapper. Nothing here imports IPython or ipywidgets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from . import artifacts as artifacts_mod
from .model import (
    ArtifactInfo,
    Job,
    JobSpec,
    JobState,
    ProviderError,
    RunnerError,
    SpecError,
    TrainorchError,
    default_workspace,
    new_job_id,
    utcnow,
)
from .providers import Bootstrap, MachineHandle, MachineStatus, Provider, available_providers
from .runner_client import RunnerClient, RunnerHTTPError
from .store import Store, process_owner_id

log = logging.getLogger("trainorch_jupyter")
T = TypeVar("T")

LEASE_S = 30.0
TERMINATE_RETRY_S = 30.0
TERMINATE_GIVE_UP_S = 15 * 60.0
#: How long the runner may stay unreachable (network blips, a proxy cutting requests) before a job fails.
UNREACHABLE_TIMEOUT_S = 180.0
#: How often (at most) a job's provider is asked whether its machine still exists while the runner is unreachable.
MACHINE_CHECK_S = 5.0
#: The orchestrator ends a job this long past its max runtime if the runner has not (it should, first).
RUNTIME_SLACK_S = 120.0


@dataclass(frozen=True)
class Event:
    job_id: str
    kind: str  # "state" | "log" | "metric" | "artifacts"
    data: Any
    time: float = dataclasses.field(default_factory=time.time)


@dataclass(frozen=True)
class Outcome:
    state: JobState
    error: str | None = None
    timed_out: bool = False


class DeadlineExceeded(TrainorchError):
    """The orchestrator's own deadline on a job's run passed."""


class JobCancelled(TrainorchError):
    """Raised inside a job's driver when the user cancelled it."""


class Download(concurrent.futures.Future[list[ArtifactInfo]]):
    """What ``job.download()`` returns: ``await`` it in a notebook, or call ``.result(timeout)``."""

    def __await__(self) -> Generator[Any, None, list[ArtifactInfo]]:
        return asyncio.wrap_future(self).__await__()


def _chain(src: concurrent.futures.Future[T], dst: concurrent.futures.Future[T]) -> None:
    def done(f: concurrent.futures.Future[T]) -> None:
        if f.cancelled():
            dst.cancel()
        elif (exc := f.exception()) is not None:
            dst.set_exception(exc)
        else:
            dst.set_result(f.result())

    src.add_done_callback(done)


class Orchestrator:
    """Runs jobs of one workspace. Thread-safe; all job work happens on its own loop thread."""

    def __init__(self, workspace: Path | str | None = None, *, provider_config: Mapping[str, Mapping[str, Any]] | None = None,
                 reattach: bool = True, webhook_url: str | None = None,
                 providers: Mapping[str, type[Provider]] | None = None) -> None:
        self.workspace = Path(workspace).resolve() if workspace is not None else default_workspace()
        self.store = Store(self.workspace)
        self.artifacts_dir = self.workspace / "artifacts"
        self.owner = process_owner_id()
        # A URL (e.g. a Slack incoming webhook) posted a short summary when a job ends. It is a secret of
        # sorts: it is never logged or stored.
        self.webhook_url = webhook_url or os.environ.get("TRAINORCH_WEBHOOK_URL") or None
        self.unreachable_timeout_s = UNREACHABLE_TIMEOUT_S
        # Providers come from the entry-point group; ``providers`` adds or replaces some (tests, embedding).
        self._provider_classes = {**available_providers(), **dict(providers or {})}
        self._provider_config = {k: dict(v) for k, v in (provider_config or {}).items()}
        self._providers: dict[str, Provider] = {}
        self._providers_lock = threading.Lock()
        self._subscribers: list[tuple[str | None, Callable[[Event], None]]] = []
        self._sub_lock = threading.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._downloading: dict[str, asyncio.Task[list[ArtifactInfo]]] = {}
        self._machines: dict[str, tuple[Provider, MachineHandle]] = {}  # jobs driven here, once launched
        self.runtime_slack_s = RUNTIME_SLACK_S
        self._cancel_requested: set[str] = set()
        self._done_events: dict[str, threading.Event] = {}
        self._done_callbacks: dict[str, list[Callable[[Job], None]]] = {}
        self._jobs: dict[str, Job] = {}  # the live record of jobs this orchestrator drives
        self._done_lock = threading.Lock()  # guards _done_callbacks (appended off the loop, run on it)
        self._download_locks: dict[str, asyncio.Lock] = {}  # one on-demand download of a job at a time
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="trainorch-orchestrator", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()
        self._http: httpx.AsyncClient = self._call(self._make_http())
        self._lease_task = self._call(self._start_lease_renewal())
        if reattach:
            self.reattach()

    # -- loop plumbing ----------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

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
        self._loop.call_soon_threadsafe(fn)

    async def _make_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))

    async def _start_lease_renewal(self) -> asyncio.Task[None]:
        async def renew() -> None:
            while True:
                await asyncio.sleep(LEASE_S / 3)
                try:
                    await asyncio.to_thread(self.store.renew, self.owner, LEASE_S)
                except Exception:  # a locked db for a moment must not end the renewals
                    log.exception("lease renewal failed")

        return asyncio.create_task(renew())

    def close(self, timeout: float = 10.0) -> None:
        """Stop following jobs (they keep running and are re-attached by the next orchestrator)."""
        if self._closed:
            return

        async def shutdown() -> None:
            self._lease_task.cancel()
            followed = dict(self._tasks)
            for t in followed.values():
                t.cancel()
            await asyncio.gather(*followed.values(), self._lease_task, return_exceptions=True)
            if self._background:  # a cancel (or webhook) still on its way: give it a moment
                await asyncio.wait(set(self._background), timeout=min(5.0, timeout / 2))
            for job_id in followed:
                await asyncio.to_thread(self.store.release, job_id, self.owner)
            for p in self._providers.values():
                with contextlib.suppress(Exception):
                    await p.aclose()
            await self._http.aclose()

        with contextlib.suppress(Exception):
            self._call(shutdown(), timeout)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self.store.close()

    # -- events -----------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None], job_id: str | None = None) -> Callable[[], None]:
        """Call ``callback(event)`` on the loop thread for each event of ``job_id`` (all jobs if None)."""
        entry = (job_id, callback)
        with self._sub_lock:
            self._subscribers.append(entry)

        def unsubscribe() -> None:
            with self._sub_lock, contextlib.suppress(ValueError):
                self._subscribers.remove(entry)

        return unsubscribe

    def _emit(self, job_id: str, kind: str, data: Any) -> None:
        event = Event(job_id, kind, data)
        with self._sub_lock:
            subs = [cb for jid, cb in self._subscribers if jid is None or jid == job_id]
        for cb in subs:
            try:
                cb(event)
            except Exception:
                log.exception("event subscriber failed")

    # -- providers --------------------------------------------------------------------------

    def provider(self, name: str) -> Provider:
        """The provider instance of ``name`` (one per orchestrator; made on first use, from any thread)."""
        with self._providers_lock:
            if name not in self._providers:
                cls = self._provider_classes.get(name)
                if cls is None:
                    raise SpecError("provider", f"unknown provider {name!r}; available: {', '.join(sorted(self._provider_classes))}")
                self._providers[name] = cls(workspace=self.workspace, http=self._http, **self._provider_config.get(name, {}))
            return self._providers[name]

    @property
    def provider_names(self) -> list[str]:
        return sorted(self._provider_classes)

    # -- public API ---------------------------------------------------------------------------

    def validate(self, spec: JobSpec | Mapping[str, Any]) -> JobSpec:
        """The spec as a JobSpec, checked; raises SpecError naming the field. Touches nothing."""
        if not isinstance(spec, JobSpec):
            spec = JobSpec.from_dict(spec)
        spec.validate(known_providers=set(self._provider_classes))
        self.provider(spec.provider).validate(spec)
        return spec

    def submit(self, spec: JobSpec | Mapping[str, Any]) -> JobHandle:
        """Validate, persist and schedule a job; returns its handle at once."""
        spec = self.validate(spec)
        job = Job(id=new_job_id(spec.name), spec=spec, provider=spec.provider)
        self.store.create(job, owner=self.owner, lease_s=LEASE_S)
        self._done_events[job.id] = threading.Event()
        self._jobs[job.id] = job
        self._call(self._schedule(job.id, resume=False))
        return JobHandle(self, job.id)

    async def asubmit(self, spec: JobSpec | Mapping[str, Any]) -> JobHandle:
        return await asyncio.to_thread(self.submit, spec)

    def job(self, ref: str | None = None) -> JobHandle:
        """A handle by id, unique id prefix, or None for the most recent job."""
        return JobHandle(self, self.store.resolve(ref))

    def jobs(self, *, state: JobState | str | None = None, provider: str | None = None) -> list[Job]:
        return self.store.list_jobs(state=state, provider=provider)

    def get(self, job_id: str) -> Job:
        """The freshest record: the live one for jobs driven here, the store's otherwise."""
        live = self._jobs.get(job_id)
        if live is not None:
            return Job.from_dict(live.to_dict())
        return self.store.get(job_id)

    async def _aget(self, job_id: str) -> Job:
        """:meth:`get` for code on the loop: a store read goes to a worker thread."""
        live = self._jobs.get(job_id)
        if live is not None:
            return Job.from_dict(live.to_dict())
        return await asyncio.to_thread(self.store.get, job_id)

    def cancel(self, job_id: str) -> None:
        self._call(self._cancel(job_id), timeout=60)

    async def acancel(self, job_id: str) -> None:
        await self._bridge(self._cancel(job_id))

    async def _cancel(self, job_id: str) -> None:
        """Record the request and tell the runner in the background: the caller (often the kernel's
        main thread) never waits on the network, and an unreachable runner gets the cancel once it
        answers again instead of the request being dropped."""
        job = await self._aget(job_id)
        if job.state.is_terminal:
            return
        self._cancel_requested.add(job_id)
        if job.runner_url and job.state in (JobState.RUNNING, JobState.PROVISIONING):
            token = await asyncio.to_thread(self.store.runner_token, job_id)
            if token:
                client = RunnerClient(job.runner_url, token, http=self._http)
                sender = asyncio.create_task(self._send_cancel(job_id, client))
                self._background.add(sender)
                sender.add_done_callback(self._background.discard)
        download = self._downloading.get(job_id)
        if download is not None:  # stop the download: the machine is terminated right after
            download.cancel()
        task = self._tasks.get(job_id)
        if (task is None and job.state is JobState.PENDING
                and await asyncio.to_thread(self.store.claim, job_id, self.owner, LEASE_S)):
            # Nobody drives it (it never started): end it here.
            await self._finish(job, JobState.CANCELLED, error=None)

    async def _send_cancel(self, job_id: str, client: RunnerClient) -> None:
        async def once() -> dict[str, Any]:
            if (await self._aget(job_id)).state.is_terminal:  # it ended meanwhile (its machine may be gone)
                return {}
            return await client.cancel()

        try:
            await self._persist(f"cancelling job {job_id}", once)
        except Exception as exc:  # the runner said no, or stayed unreachable: the driver's follow decides
            log.warning("could not send the cancel of job %s to its machine: %s", job_id, exc)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal; TimeoutError if still live after ``timeout`` seconds."""
        if self.in_loop_thread():
            raise RuntimeError("wait() would block the orchestrator's loop")
        deadline = None if timeout is None else time.monotonic() + timeout
        ev = self._done_events.get(job_id)
        while True:
            job = self.get(job_id)
            if job.state.is_terminal:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {job_id} is still {job.state.value} after {timeout}s")
            step = 0.5 if left is None else min(0.5, left)
            if ev is not None:
                ev.wait(step)
            else:
                time.sleep(step)

    async def await_job(self, job_id: str, timeout: float | None = None) -> Job:
        """``wait`` for async code (``await job``): polls from the awaiting loop, holds no thread, and an
        interrupted await leaves nothing behind."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            live = self._jobs.get(job_id)
            job = Job.from_dict(live.to_dict()) if live is not None else await asyncio.to_thread(self.store.get, job_id)
            if job.state.is_terminal:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.state.value} after {timeout}s")
            await asyncio.sleep(0.25)

    def on_done(self, job_id: str, fn: Callable[[Job], None]) -> None:
        # Register first, then look: a job that ends in between has either already run its callbacks
        # (then we see it terminal and run what is left) or runs ours itself. Never lost, never twice.
        with self._done_lock:
            self._done_callbacks.setdefault(job_id, []).append(fn)
        job = self.get(job_id)
        if job.state.is_terminal:
            self.call_soon(lambda: self._run_done_callbacks(job))
            return
        if job_id not in self._tasks:  # followed elsewhere: watch the store
            self._submit(self._watch_store_until_done(job_id))

    async def _watch_store_until_done(self, job_id: str) -> None:
        while True:
            job = await asyncio.to_thread(self.store.get, job_id)
            if job.state.is_terminal:
                self._run_done_callbacks(job)
                return
            await asyncio.sleep(1.0)

    def logs(self, job_id: str, tail: int | None = None) -> str:
        return self.store.read_log(job_id, tail=tail)

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self.store.metrics(job_id)

    def download(self, job_id: str, to: Path | str | None = None) -> Download:
        fut = Download()
        _chain(self._submit(self._download(job_id, Path(to) if to is not None else None)), fut)
        return fut

    async def adownload(self, job_id: str, to: Path | str | None = None) -> list[ArtifactInfo]:
        return await self.download(job_id, to)

    # -- re-attach ----------------------------------------------------------------------------

    def reattach(self) -> list[str]:
        """Follow again every unfinished job of the workspace that no live orchestrator follows."""
        taken: list[str] = []
        for job_id in self.store.live_job_ids():
            if job_id in self._tasks:
                continue
            if self.store.claim(job_id, self.owner, LEASE_S):
                self._done_events.setdefault(job_id, threading.Event())
                self._jobs[job_id] = self.store.get(job_id)
                self._call(self._schedule(job_id, resume=True))
                taken.append(job_id)
        return taken

    async def _schedule(self, job_id: str, *, resume: bool) -> None:
        task = asyncio.create_task(self._drive(job_id, resume=resume), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))

    # -- the lifecycle ----------------------------------------------------------------------

    async def _save(self, job: Job, note: str | None = None) -> None:
        job.updated_at = utcnow()
        await asyncio.to_thread(self.store.save, job, note=note)

    async def _set_state(self, job: Job, state: JobState, note: str | None = None) -> None:
        job.transition(state)
        await self._save(job, note)
        self._emit(job.id, "state", Job.from_dict(job.to_dict()))
        if state.is_terminal:
            self._run_done_callbacks(Job.from_dict(job.to_dict()))
            if self.webhook_url:  # only the orchestrator that drove the job posts
                task = asyncio.create_task(self._post_webhook(Job.from_dict(job.to_dict())))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _check_cancel(self, job: Job) -> None:
        if job.id in self._cancel_requested:
            raise JobCancelled(job.id)

    async def _drive(self, job_id: str, *, resume: bool) -> None:
        """Provision, run, follow, download; then terminate the machine and only then end the job,
        so a job seen as finished never has a machine left behind."""
        cached = self._jobs.get(job_id)
        job = cached if cached is not None else await asyncio.to_thread(self.store.get, job_id)
        self._jobs[job_id] = job
        provider: Provider | None = None
        handle: MachineHandle | None = None
        outcome: Outcome | None = None
        detached = False
        try:
            provider = self.provider(job.provider)
            if resume:
                handle = await self._resume_handle(job, provider)
            if handle is None:
                handle = await self._provision(job, provider)
            self._machines[job.id] = (provider, handle)
            token = await asyncio.to_thread(self.store.runner_token, job.id)
            assert token is not None
            client = RunnerClient(str(job.runner_url), token, http=self._http)
            if job.state is JobState.PROVISIONING:
                await self._start_command(job, client)
            if job.state is JobState.RUNNING:
                await self._follow(job, client)
                outcome = await self._conclude(job, client)
            if job.state is JobState.DOWNLOADING:
                await self._auto_download(job, client)
                outcome = Outcome(JobState.COMPLETED)
        except asyncio.CancelledError:
            # The orchestrator is closing: leave the machine to the next orchestrator (re-attach).
            detached = True
            raise
        except JobCancelled:
            outcome = Outcome(JobState.CANCELLED)
        except DeadlineExceeded as exc:
            outcome = Outcome(JobState.FAILED, str(exc), timed_out=True)
        except Exception as exc:
            log.debug("job %s failed", job.id, exc_info=True)
            outcome = Outcome(JobState.FAILED, _describe(exc))
        finally:
            self._machines.pop(job.id, None)
            if not detached:
                if provider is not None and handle is not None:
                    await self._terminate(provider, handle, job)
                if outcome is None:  # nothing concluded (should not happen): never leave a job live
                    outcome = Outcome(JobState.FAILED, "the job ended without an outcome")
                await self._finish(job, outcome.state, error=outcome.error, timed_out=outcome.timed_out)
                self._jobs.pop(job.id, None)
                await asyncio.to_thread(self.store.release, job.id, self.owner)

    async def _auto_download(self, job: Job, client: RunnerClient) -> None:
        """The DOWNLOADING phase; a cancel stops it (JobCancelled) so the machine goes at once."""
        self._check_cancel(job)
        dest = self.artifacts_dir / job.id
        download = asyncio.create_task(self._persist("downloading artifacts",
                                                     lambda: self._download_from(job, client, dest), job.id))
        self._downloading[job.id] = download
        try:
            await download
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if job.id in self._cancel_requested and (current is None or not current.cancelling()):
                for part in dest.glob(".*.part"):  # half-downloaded files are of no use now
                    part.unlink(missing_ok=True)
                raise JobCancelled(job.id) from None
            download.cancel()
            raise
        finally:
            self._downloading.pop(job.id, None)

    async def _provision(self, job: Job, provider: Provider) -> MachineHandle:
        if job.state is JobState.PENDING:
            await self._set_state(job, JobState.PROVISIONING)
        elif job.machine_id is None:
            # Interrupted between persisting the intent and recording the machine: find what exists.
            for orphan in await provider.reconcile(job):
                await self._terminate(provider, orphan, job)
        self._check_cancel(job)
        token = secrets.token_urlsafe(32)
        await asyncio.to_thread(self.store.set_runner_token, job.id, token)
        bootstrap = Bootstrap(job_id=job.id, token=token, runner_source=_runner_source(),
                              idle_timeout_s=max(600.0, job.spec.max_runtime + 600.0),
                              packages=["trainorch-jupyter[train]"] if job.spec.train is not None else [])
        try:
            handle = await asyncio.wait_for(provider.launch(job, bootstrap), provider.provision_timeout_s)
        except BaseException:
            # A create that failed or timed out may still have made a machine: reconcile by tag.
            with contextlib.suppress(Exception):
                for orphan in await provider.reconcile(job):
                    await self._terminate(provider, orphan, job)
            raise
        job.machine_id = handle.machine_id
        job.machine = dict(handle.data)
        job.price_per_hour = handle.price_per_hour
        job.gpu = handle.gpu
        job.runner_url = handle.runner_url
        await self._save(job)
        try:
            await self._wait_machine(job, provider, handle)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._terminate(provider, handle, job)
            raise
        return handle

    async def _wait_machine(self, job: Job, provider: Provider, handle: MachineHandle) -> None:
        deadline = time.monotonic() + provider.provision_timeout_s
        while True:
            self._check_cancel(job)
            result = await provider.poll(handle)
            if result.status is MachineStatus.READY and result.runner_url:
                handle.runner_url = job.runner_url = result.runner_url
                break
            if result.status in (MachineStatus.FAILED, MachineStatus.GONE):
                raise ProviderError(job.provider, f"the machine {handle.machine_id} is {result.status.value}: {result.detail}")
            if time.monotonic() > deadline:
                raise ProviderError(job.provider, f"the machine was not ready within {provider.provision_timeout_s:.0f}s")
            await asyncio.sleep(2.0)
        await self._save(job)
        token = await asyncio.to_thread(self.store.runner_token, job.id)
        assert token is not None
        client = RunnerClient(str(job.runner_url), token, http=self._http)
        await client.wait_ready(timeout=max(5.0, deadline - time.monotonic()))

    async def _start_command(self, job: Job, client: RunnerClient) -> None:
        spec = job.spec
        for name, path in spec.all_inputs():
            self._check_cancel(job)
            await self._persist(f"uploading {name}", functools.partial(client.upload_input, name, path), job.id)
        self._check_cancel(job)

        async def start_once() -> None:
            # Safe to repeat: a start whose answer was lost shows as a runner that is no longer idle.
            status = await client.status()
            if status.get("state") != "idle":
                return
            try:
                await client.start(build_command(spec, job.provider), env=dict(spec.env),
                                   max_runtime_s=spec.max_runtime, grace_s=10.0)
            except RunnerHTTPError as exc:
                if exc.status != 409:
                    raise

        await self._persist("starting the command", start_once, job.id)
        await self._set_state(job, JobState.RUNNING)

    async def _resume_handle(self, job: Job, provider: Provider) -> MachineHandle | None:
        if job.state is JobState.PENDING or job.machine_id is None:
            return None
        handle = MachineHandle(provider=job.provider, machine_id=job.machine_id, runner_url=job.runner_url,
                               data=dict(job.machine), price_per_hour=job.price_per_hour, gpu=job.gpu)
        result = await provider.poll(handle)
        if result.status is MachineStatus.READY:
            return handle
        if result.status is MachineStatus.PROVISIONING and job.state is JobState.PROVISIONING:
            await self._wait_machine(job, provider, handle)
            return handle
        raise ProviderError(job.provider, f"the machine {job.machine_id} was lost while the orchestrator was away ({result.detail or result.status.value})")

    async def _persist(self, what: str, fn: Callable[[], Coroutine[Any, Any, T]], job_id: str | None = None) -> T:
        """Call ``fn`` until it succeeds, riding out a runner that is unreachable for a while.

        A 4xx answer is final; transport errors and 5xx are retried up to UNREACHABLE_TIMEOUT_S. With
        ``job_id``, the job's provider is asked (at most every MACHINE_CHECK_S) whether the machine
        still exists, so a machine that is gone fails the job at once instead of after the timeout."""
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
            if machine is not None and now - checked >= MACHINE_CHECK_S:
                checked = now
                provider, handle = machine
                result = await provider.poll(handle)
                if result.status in (MachineStatus.GONE, MachineStatus.FAILED):
                    raise ProviderError(provider.name, f"{what}: the machine {handle.machine_id} is "
                                        f"{result.status.value} ({result.detail or 'no detail'})")
            log.debug("%s: %s; retrying in %.2fs", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _follow(self, job: Job, client: RunnerClient) -> None:
        """Copy logs and metrics from the runner into the store until the command exited."""
        log_offset = await asyncio.to_thread(self.store.prepare_log, job.id)
        metrics_offset = await asyncio.to_thread(self.store.metrics_offset, job.id)

        async def follow_logs() -> None:
            offset = log_offset
            while True:
                chunk = await self._persist("reading logs", functools.partial(client.read_logs, offset, wait=20.0), job.id)
                if chunk.data or chunk.next_offset != offset:
                    await asyncio.to_thread(self.store.append_log, job.id, chunk.data, chunk.next_offset)
                    offset = chunk.next_offset
                    if chunk.data:
                        self._emit(job.id, "log", chunk.data.decode("utf-8", errors="replace"))
                if chunk.complete:
                    return

        async def follow_metrics() -> None:
            offset = metrics_offset
            while True:
                chunk = await self._persist("reading metrics", functools.partial(client.read_metrics, offset, wait=20.0),
                                            job.id)
                if chunk.metrics or chunk.next_offset != offset:
                    await asyncio.to_thread(self.store.append_metrics, job.id, chunk.metrics, chunk.next_offset)
                    offset = chunk.next_offset
                    for m in chunk.metrics:
                        self._emit(job.id, "metric", m)
                if chunk.complete:
                    return

        # The runner enforces max_runtime itself; this deadline is the orchestrator's own, for a runner
        # that cannot (hung, or its clock wrong): a wait with no end would leave a paid machine running.
        started = job.started_at or utcnow()
        left = job.spec.max_runtime + self.runtime_slack_s - (utcnow() - started).total_seconds()
        try:
            # At least a few seconds: a job re-attached late may have ended in time and only needs draining.
            await asyncio.wait_for(asyncio.gather(follow_logs(), follow_metrics()), timeout=max(5.0, left))
        except TimeoutError:
            with contextlib.suppress(RunnerError, httpx.HTTPError):
                await client.cancel(grace_s=5.0)
            raise DeadlineExceeded(
                f"stopped by the orchestrator {self.runtime_slack_s:.0f}s past the max runtime of "
                f"{job.spec.max_runtime:.0f}s (the runner did not end the job)") from None

    async def _conclude(self, job: Job, client: RunnerClient) -> Outcome | None:
        """The outcome of a command that exited, or None when its files are to be downloaded."""
        status = await self._persist("reading the status", client.status, job.id)
        exit_code = status.get("exit_code")
        job.exit_code = exit_code if isinstance(exit_code, int) else None
        if status.get("cancelled") and not status.get("timed_out"):
            await self._salvage(job, client)
            return Outcome(JobState.CANCELLED)
        if status.get("timed_out"):
            await self._salvage(job, client)
            return Outcome(JobState.FAILED, f"stopped after the max runtime of {job.spec.max_runtime:.0f}s",
                           timed_out=True)
        if job.exit_code != 0:
            last = (await asyncio.to_thread(self.store.read_log, job.id, tail=5)).strip()
            msg = f"the command exited with code {job.exit_code}"
            if status.get("error"):
                msg += f" ({status['error']})"
            if last:
                msg += "; last lines:\n" + last
            return Outcome(JobState.FAILED, msg)
        if job.spec.auto_download:
            await self._set_state(job, JobState.DOWNLOADING)
            return None
        return Outcome(JobState.COMPLETED)

    async def _salvage(self, job: Job, client: RunnerClient) -> None:
        """Keep what a stopped command saved (the trainer saves a partial adapter on SIGTERM) before the
        machine goes away. Best effort: a failure here does not change how the job ends."""
        if not job.spec.auto_download:
            return
        try:
            manifest = await client.manifest()
            if manifest and manifest.get("files"):
                await self._download_from(job, client, self.artifacts_dir / job.id)
        except Exception as exc:
            log.warning("could not keep the files of stopped job %s: %s", job.id, exc)

    async def _finish(self, job: Job, state: JobState, *, error: str | None, timed_out: bool = False) -> None:
        if job.state.is_terminal:
            return
        job.error = error
        if state is JobState.FAILED:
            try:
                from .diagnose import diagnose

                tail = await asyncio.to_thread(self.store.read_log, job.id, tail=80)
                job.diagnosis = diagnose(exit_code=job.exit_code, log_tail=tail, error=error, timed_out=timed_out)
            except Exception:  # a diagnosis is a help; its failure must not keep the job live
                log.exception("diagnosis of job %s failed", job.id)
        await self._set_state(job, state, note=error)

    async def _terminate(self, provider: Provider, handle: MachineHandle, job: Job) -> None:
        """Terminate and confirm; keep retrying on a schedule (a machine must never be left billing)."""
        started = time.monotonic()
        delay = 1.0
        while True:
            try:
                await provider.terminate(handle)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started > TERMINATE_GIVE_UP_S:
                    log.error("could not terminate %s machine %s of job %s: %s -- terminate it by hand",
                              provider.name, handle.machine_id, job.id, exc)
                    job.error = (job.error or "") + f"\nWARNING: the {provider.name} machine {handle.machine_id} could not be terminated: {exc}"
                    await self._save(job)
                    return
                await asyncio.sleep(delay)
                delay = min(TERMINATE_RETRY_S, delay * 2)

    # -- artifacts ----------------------------------------------------------------------------

    async def _download_from(self, job: Job, client: RunnerClient, dest: Path) -> list[ArtifactInfo]:
        manifest = await client.manifest()
        if manifest is None:
            raise RunnerError("the runner has no manifest yet (the command is still running)")
        metadata = {
            "provider": job.provider,
            "provider_job_id": job.machine_id,
            "model": job.spec.train.model if job.spec.train else None,
            "command": list(job.spec.command) if job.spec.command else None,
            "job_name": job.spec.name,
            "created_at": job.created_at.isoformat(),
        }
        infos = await artifacts_mod.download_manifest(self._http, client.base_url, headers=client.auth_headers(),
                                                      manifest=manifest, dest_dir=dest, job_id=job.id, metadata=metadata)
        if dest == self.artifacts_dir / job.id:
            job.artifacts = infos
            await asyncio.to_thread(self.store.save_artifacts, job.id, infos)
            await self._save(job)
        self._emit(job.id, "artifacts", infos)
        return infos

    async def _download(self, job_id: str, to: Path | None) -> list[ArtifactInfo]:
        """On-demand download: verified files into ``to`` (default artifacts/<job_id>/).

        One at a time per job: two at once would serve the finished job's files from two runners on
        one state dir (the second refuses to start) and write the same destination twice."""
        lock = self._download_locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            return await self._download_locked(job_id, to)

    async def _download_locked(self, job_id: str, to: Path | None) -> list[ArtifactInfo]:
        job = await self._aget(job_id)
        dest = (to or self.artifacts_dir / job_id).resolve()
        have = await asyncio.to_thread(self.store.artifacts, job_id)
        if have:
            try:
                local = await asyncio.to_thread(artifacts_mod.verify_local, self.artifacts_dir / job_id)
            except (TrainorchError, OSError):
                local = []
            if local:
                if dest != (self.artifacts_dir / job_id).resolve():
                    return await asyncio.to_thread(_copy_verified, local, dest)
                return local
        if job.state.is_live:
            # A live job's files are not final: wait for its end (its own download, when it has one).
            await self._wait_terminal(job_id)
            return await self._download_locked(job_id, to)
        if job.exit_code not in (0, None) and job.state is JobState.FAILED and job.runner_url is None:
            raise TrainorchError(f"job {job_id} failed before it produced files")
        token = await asyncio.to_thread(self.store.runner_token, job_id)
        if token is None:
            raise TrainorchError(f"job {job_id} never started a runner, so it has no files")
        provider = self.provider(job.provider)
        handle: MachineHandle | None = None
        if job.runner_url:
            client = RunnerClient(job.runner_url, token, http=self._http)
            try:
                await client.health()
                return await self._download_from(job, client, dest)
            except (RunnerError, httpx.HTTPError):
                pass
        serve_again = getattr(provider, "serve_again", None)
        if serve_again is not None:
            handle = await serve_again(job, token)
        if handle is None or handle.runner_url is None:
            raise TrainorchError(f"the machine of job {job_id} is gone and its files were not downloaded before; they cannot be fetched now")
        try:
            client = RunnerClient(handle.runner_url, token, http=self._http)
            await client.wait_ready(timeout=30.0)
            return await self._download_from(job, client, dest)
        finally:
            await self._terminate(provider, handle, job)

    async def _wait_terminal(self, job_id: str) -> None:
        while not (await self._aget(job_id)).state.is_terminal:
            await asyncio.sleep(0.2)

    # -- done callbacks, webhook ------------------------------------------------------------

    def _run_done_callbacks(self, job: Job) -> None:
        ev = self._done_events.get(job.id)
        if ev is not None:
            ev.set()
        with self._done_lock:
            callbacks = self._done_callbacks.pop(job.id, [])
        for fn in callbacks:
            try:
                fn(job)
            except Exception:
                log.exception("on_done callback failed")

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


def build_command(spec: JobSpec, provider: str) -> list[str]:
    """The argv the runner starts for ``spec``."""
    if spec.command is not None:
        return list(spec.command)
    assert spec.train is not None
    python = sys.executable if provider == "local" else "python3"
    data = "${TRAINORCH_INPUT_DIR}/" + spec.train.data_input_name
    return [python, "-m", "trainorch_jupyter.trainer", *spec.train.cli_args(data, "${TRAINORCH_OUTPUT_DIR}")]


def _runner_source() -> str:
    return (Path(__file__).resolve().parent / "runner.py").read_text()


def _copy_verified(infos: list[ArtifactInfo], dest: Path) -> list[ArtifactInfo]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for info in infos:
        target = dest / info.name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(info.path, tmp)
        tmp.replace(target)
        out.append(dataclasses.replace(info, path=target))
    src_meta = infos[0].path.parent / "trainorch-artifact.json" if infos else None
    if src_meta is not None and src_meta.exists():
        data = json.loads(src_meta.read_text())
        data["files"] = [i.to_dict() for i in out]
        (dest / "trainorch-artifact.json").write_text(json.dumps(data, indent=2))
    out = artifacts_mod.verify_local(dest)
    return out


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TrainorchError):
        return str(exc)
    if isinstance(exc, httpx.HTTPError):
        return f"network error talking to the machine: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


class JobHandle:
    """A live view of one job. Cheap to make; every property reads the freshest record."""

    def __init__(self, orchestrator: Orchestrator, job_id: str) -> None:
        self.orchestrator = orchestrator
        self.id = job_id

    @property
    def record(self) -> Job:
        return self.orchestrator.get(self.id)

    @property
    def status(self) -> JobState:
        return self.record.state

    state = status

    @property
    def log_path(self) -> Path:
        return self.orchestrator.store.log_path(self.id)

    @property
    def artifacts(self) -> list[ArtifactInfo]:
        return self.orchestrator.store.artifacts(self.id)

    def wait(self, timeout: float | None = None) -> Job:
        return self.orchestrator.wait(self.id, timeout)

    def cancel(self) -> None:
        self.orchestrator.cancel(self.id)

    def logs(self, tail: int | None = None) -> str:
        return self.orchestrator.logs(self.id, tail)

    def metrics(self) -> list[dict[str, Any]]:
        return self.orchestrator.metrics(self.id)

    def download(self, to: Path | str | None = None) -> Download:
        return self.orchestrator.download(self.id, to)

    def on_done(self, fn: Callable[[Job], None]) -> None:
        self.orchestrator.on_done(self.id, fn)

    def __await__(self) -> Generator[Any, None, Job]:
        return self.orchestrator.await_job(self.id).__await__()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.id == self.id and other.orchestrator is self.orchestrator

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        job = self.record
        return f"<Job {job.id} {job.provider} {job.state.value}>"

    def _repr_html_(self) -> str:
        import html

        job = self.record
        rows = [("job", job.id), ("provider", job.provider), ("state", job.state.value)]
        if job.exit_code is not None:
            rows.append(("exit code", str(job.exit_code)))
        if job.error:
            rows.append(("error", job.error.splitlines()[0]))
        if job.artifacts:
            rows.append(("artifacts", ", ".join(a.name for a in job.artifacts)))
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<table class='trainorch-job'>{body}</table>"


_orchestrator: Orchestrator | None = None
_orch_lock = threading.Lock()


def get_orchestrator(workspace: Path | str | None = None, **kwargs: Any) -> Orchestrator:
    """The process's orchestrator. The first call (or one with another workspace) makes it."""
    global _orchestrator
    with _orch_lock:
        wanted = Path(workspace).resolve() if workspace is not None else None
        if _orchestrator is not None and not _orchestrator._closed and (wanted is None or wanted == _orchestrator.workspace):
            return _orchestrator
        if _orchestrator is not None:
            _orchestrator.close()
        _orchestrator = Orchestrator(wanted, **kwargs)
        return _orchestrator


def reset_orchestrator() -> None:
    """Close the process's orchestrator (its jobs keep running and are re-attached later)."""
    global _orchestrator
    with _orch_lock:
        if _orchestrator is not None:
            _orchestrator.close()
        _orchestrator = None

