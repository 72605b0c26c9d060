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
import logging
import os
import secrets
import sqlite3
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
from .providers import Bootstrap, MachineHandle, MachineStatus, PollResult, Provider, available_providers
from .runner_client import RunnerClient, RunnerHTTPError
from .store import Fence, LeaseLost, ReapEntry, Store, process_owner_id

log = logging.getLogger("trainorch_jupyter")
T = TypeVar("T")

LEASE_S = 30.0
#: How often the lease is renewed, and how often the store is read for cancel requests.
RENEW_S = LEASE_S / 3
CANCEL_POLL_S = 1.0
#: How often the reap list is looked at, and the longest wait between two tries on one machine.
REAP_POLL_S = 5.0
REAP_MAX_BACKOFF_S = 300.0
TERMINATE_RETRY_S = 30.0
#: How long a job's driver tries to terminate its machine before it hands it to the reaper (which never
#: gives up: the machine stays on the persisted reap list until its provider confirms it gone).
TERMINATE_GIVE_UP_S = 120.0
#: How long a failing store write (a locked or full disk) is retried before the job gives up on it.
STORE_RETRY_S = 30.0
#: How long provider API errors that may pass (429, 5xx, network) are ridden out while polling a machine.
POLL_RETRY_S = 120.0
#: How long the runner may stay unreachable (network blips, a proxy cutting requests) before a job fails.
UNREACHABLE_TIMEOUT_S = 180.0
#: How often (at most) a job's provider is asked whether its machine still exists while the runner is unreachable.
MACHINE_CHECK_S = 5.0
#: The orchestrator ends a job this long past its max runtime if the runner has not (it should, first).
RUNTIME_SLACK_S = 120.0
#: The runner's life (its dead-man switch): it exits when nobody asked it to start a command within
#: RUNNER_IDLE_S, and RUNNER_RETENTION_S after the last request once the command has exited.
RUNNER_IDLE_S = 900.0
RUNNER_RETENTION_S = 1800.0


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


#: The message a job's drive task is cancelled with when the user cancels it during provisioning (so it is
#: told apart from the orchestrator closing, which leaves the machine to the next orchestrator).
_USER_CANCEL = "trainorch: cancelled by the user"


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
        self._fences: dict[str, Fence] = {}  # the lease each driven job is held under
        self._lost: set[str] = set()  # driven jobs whose lease another orchestrator took: stop, touch nothing
        self._interruptible: set[str] = set()  # jobs whose drive may be cancelled outright (before the start)
        self._user_cancelled: set[str] = set()  # drive tasks cancelled for a user's cancel
        self._clients: dict[str, RunnerClient] = {}  # the runner client of each driven job (its URL may move)
        self._reaping: set[tuple[str, str]] = set()
        self._unsaved: dict[str, Job] = {}  # ended jobs whose final record could not be written yet
        self._callbacks = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="trainorch-on-done")
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
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="trainorch-orchestrator", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()
        self._http: httpx.AsyncClient = self._call(self._make_http())
        self._lease_task = self._call(self._start_housekeeping())
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

    async def _start_housekeeping(self) -> asyncio.Task[None]:
        """One task for what outlives single jobs: lease renewal (and noticing a lease taken over), cancel
        requests from the store (any process may make one), and the reap list."""

        async def housekeeping() -> None:
            last_renew = last_reap = 0.0
            while True:
                now = time.monotonic()
                try:
                    if now - last_renew >= RENEW_S:
                        last_renew = now
                        await self._renew_leases()
                    await self._poll_cancel_requests()
                    if now - last_reap >= REAP_POLL_S:
                        last_reap = now
                        await self.areap()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a locked db for a moment must not end the housekeeping
                    log.exception("orchestrator housekeeping failed")
                await asyncio.sleep(CANCEL_POLL_S)

        return asyncio.create_task(housekeeping(), name="trainorch-housekeeping")

    async def _renew_leases(self) -> None:
        held = await asyncio.to_thread(self.store.renew, self.owner, LEASE_S)
        for job_id, task in list(self._tasks.items()):
            if job_id not in held and job_id in self._fences and not task.done():
                log.warning("job %s was taken over by another orchestrator: this one stops driving it", job_id)
                self._lost.add(job_id)
                task.cancel()

    async def _poll_cancel_requests(self) -> None:
        driven = [j for j in self._tasks if j not in self._cancel_requested]
        if not driven:
            return
        wanted = await asyncio.to_thread(lambda: [j for j in driven if self.store.cancel_requested(j)])
        for job_id in wanted:
            self._honour_cancel(job_id)

    def close(self, timeout: float = 10.0) -> None:
        """Stop following jobs (they keep running and are re-attached by the next orchestrator)."""
        if self._closed:
            return
        self._closing = True

        async def shutdown() -> None:
            self._lease_task.cancel()
            followed = dict(self._tasks)
            for t in followed.values():
                t.cancel()
            await asyncio.gather(*followed.values(), self._lease_task, return_exceptions=True)
            for job_id, job in list(self._unsaved.items()):  # a last try at records that could not be written
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.save, job)
                    self._unsaved.pop(job_id, None)
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
        self._callbacks.shutdown(wait=False)
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
        fence = self.store.claim(job.id, self.owner, LEASE_S)
        assert fence is not None  # made just now, by us
        self._fences[job.id] = fence
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
        """Record the request in the store and return: whichever orchestrator drives the job (this one, or
        another kernel's, which reads the store every second) honours it, in any state. The caller (often
        the kernel's main thread) never waits on the network; a request outlives a kernel restart."""
        job = await self._aget(job_id)
        if job.state.is_terminal:
            return
        if not await asyncio.to_thread(self.store.request_cancel, job_id):
            return  # it ended meanwhile
        if job_id in self._tasks:
            self._honour_cancel(job_id)
            return
        fence = await asyncio.to_thread(self.store.claim, job_id, self.owner, LEASE_S)
        if fence is not None:
            # Nobody alive drives it: adopt it; the drive sees the request and ends it (its machine too).
            self._fences[job_id] = fence
            self._done_events.setdefault(job_id, threading.Event())
            await self._schedule(job_id, resume=True)

    def _honour_cancel(self, job_id: str) -> None:
        """On the loop: stop a job driven here, by the quickest path its stage allows."""
        if job_id in self._cancel_requested:
            return
        self._cancel_requested.add(job_id)
        task = self._tasks.get(job_id)
        if job_id in self._interruptible and task is not None and not task.done():
            # Before the command starts (creating the machine, waiting for it, uploading): stop at once.
            self._user_cancelled.add(job_id)
            task.cancel(_USER_CANCEL)
            return
        download = self._downloading.get(job_id)
        if download is not None:  # stop the download: the machine is terminated right after
            download.cancel()
            return
        client = self._clients.get(job_id)
        if client is not None:
            sender = asyncio.create_task(self._send_cancel(job_id, client))
            self._background.add(sender)
            sender.add_done_callback(self._background.discard)

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

    def download(self, job_id: str, to: Path | str | None = None, *, overwrite: bool = False) -> Download:
        """The job's files, each verified by SHA-256, in ``to`` (default: the job's own ``artifacts/<job_id>/``).

        A live job's files come when it ends. A download never replaces a file it did not place: a file already
        in ``to`` with other bytes stops it before anything is written
        (:class:`~trainorch_jupyter.artifacts.DestinationConflict`, listing every such file) unless ``overwrite``;
        identical files are kept. In ``artifacts/<job_id>/`` only the files named in the job's manifest are
        replaced. The free disk space is checked first too. Cancelling the returned future stops the download
        (the ``.part`` files stay for a later resume)."""
        fut = Download()
        src = self._submit(self._download(job_id, Path(to) if to is not None else None, overwrite=overwrite))

        def forward(f: concurrent.futures.Future[list[ArtifactInfo]]) -> None:
            if fut.done():
                return
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                if f.cancelled():
                    fut.cancel()
                elif (exc := f.exception()) is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(f.result())

        def cancel_source(f: concurrent.futures.Future[list[ArtifactInfo]]) -> None:
            if f.cancelled():
                src.cancel()  # stops the download task on the loop

        src.add_done_callback(forward)
        fut.add_done_callback(cancel_source)
        return fut

    async def adownload(self, job_id: str, to: Path | str | None = None, *,
                        overwrite: bool = False) -> list[ArtifactInfo]:
        return await self.download(job_id, to, overwrite=overwrite)

    # -- re-attach ----------------------------------------------------------------------------

    def reattach(self) -> list[str]:
        """Follow again every unfinished job of the workspace that no live orchestrator follows."""
        taken: list[str] = []
        for job_id in self.store.live_job_ids():
            if job_id in self._tasks:
                continue
            fence = self.store.claim(job_id, self.owner, LEASE_S)
            if fence is not None:
                self._fences[job_id] = fence
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

    async def _store_write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store write from a job's driver, in a worker thread: a locked database or a full disk for a
        moment is retried (up to STORE_RETRY_S) instead of failing a healthy job; a lost lease is final."""
        delay = 0.1
        deadline = time.monotonic() + STORE_RETRY_S
        while True:
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except (LeaseLost, TrainorchError):
                raise
            except (sqlite3.Error, OSError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("store write failed (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    def _fence(self, job_id: str) -> Fence | None:
        return self._fences.get(job_id)

    async def _save(self, job: Job, note: str | None = None) -> None:
        job.updated_at = utcnow()
        await self._store_write(self.store.save, job, note=note, fence=self._fence(job.id))

    async def _set_state(self, job: Job, state: JobState, note: str | None = None) -> None:
        job.transition(state)
        if state.is_terminal:
            try:
                await self._save(job, note)
            except LeaseLost:
                raise
            except Exception as exc:
                # The job has ended whatever the disk says: keep the record here (``get`` serves it) and
                # write it later, rather than leave the job "live" for ever.
                log.error("could not save the end of job %s (%s); retrying in the background", job.id, exc)
                self._unsaved[job.id] = job
                self._spawn(self._save_later(job, note))
        else:
            await self._save(job, note)
        self._emit(job.id, "state", Job.from_dict(job.to_dict()))
        if state.is_terminal:
            self._run_done_callbacks(Job.from_dict(job.to_dict()))
            if self.webhook_url:  # only the orchestrator that drove the job posts
                self._spawn(self._post_webhook(Job.from_dict(job.to_dict())))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _save_later(self, job: Job, note: str | None) -> None:
        delay = 1.0
        while job.id in self._unsaved:
            await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(self.store.save, job, note=note)
            except Exception as exc:
                log.warning("still cannot save the end of job %s: %s", job.id, exc)
                delay = min(30.0, delay * 2)
            else:
                self._unsaved.pop(job.id, None)

    def _check_cancel(self, job: Job) -> None:
        if job.id in self._cancel_requested:
            raise JobCancelled(job.id)

    async def _drive(self, job_id: str, *, resume: bool) -> None:
        """Provision, run, follow, download; then terminate the machine and only then end the job,
        so a job seen as finished never has a machine left behind.

        Three ways out that do not end the job: the orchestrator closing (the next one re-attaches), and a
        lease taken over by another orchestrator (task cancelled by the housekeeping, or a fenced store
        write refused): the machine is left to whoever drives the job now."""
        cached = self._jobs.get(job_id)
        job = cached if cached is not None else await asyncio.to_thread(self.store.get, job_id)
        self._jobs[job_id] = job
        provider: Provider | None = None
        handle: MachineHandle | None = None
        outcome: Outcome | None = None
        detached = False
        if await asyncio.to_thread(self.store.cancel_requested, job_id):
            self._cancel_requested.add(job_id)  # asked before this drive began (another kernel, a restart)
        try:
            provider = self.provider(job.provider)
            self._interruptible.add(job.id)
            if resume:
                handle = await self._resume_handle(job, provider)
            if handle is None:
                handle = await self._provision(job, provider)
            self._machines[job.id] = (provider, handle)
            token = await asyncio.to_thread(self.store.runner_token, job.id)
            assert token is not None
            client = RunnerClient(str(job.runner_url), token, http=self._http)
            self._clients[job.id] = client
            if job.state is JobState.PROVISIONING:
                await self._start_command(job, client)
            self._interruptible.discard(job.id)
            if job.id in self._cancel_requested:  # asked while it could not be interrupted outright
                self._cancel_requested.discard(job.id)
                self._honour_cancel(job.id)
            if job.state is JobState.RUNNING:
                await self._follow(job, client)
                outcome = await self._conclude(job, client)
            if job.state is JobState.DOWNLOADING:
                await self._auto_download(job, client)
                outcome = Outcome(JobState.COMPLETED)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if job.id in self._user_cancelled and job.id not in self._lost and not self._closed_or_closing():
                if task is not None:
                    task.uncancel()
                outcome = Outcome(JobState.CANCELLED)
            else:
                # Closing, or the job was taken over: leave the machine to the next driver (re-attach).
                detached = True
                raise
        except LeaseLost:
            log.warning("job %s: another orchestrator took it over; this one stops driving it", job.id)
            detached = True
        except JobCancelled:
            outcome = Outcome(JobState.CANCELLED)
        except DeadlineExceeded as exc:
            outcome = Outcome(JobState.FAILED, str(exc), timed_out=True)
        except Exception as exc:
            log.debug("job %s failed", job.id, exc_info=True)
            if job.id in self._cancel_requested:
                # A cancel makes the runner refuse what the drive was doing (an upload answered 409, a
                # start after the cancel): the job was cancelled, it did not fail.
                outcome = Outcome(JobState.CANCELLED)
            else:
                outcome = Outcome(JobState.FAILED, _describe(exc))
        finally:
            self._machines.pop(job.id, None)
            self._clients.pop(job.id, None)
            self._interruptible.discard(job.id)
            self._user_cancelled.discard(job.id)
            if not detached:
                try:
                    if provider is not None and handle is not None:
                        await self._terminate(provider, handle, job)
                    if outcome is None:  # nothing concluded (should not happen): never leave a job live
                        outcome = Outcome(JobState.FAILED, "the job ended without an outcome")
                    await self._finish(job, outcome.state, error=outcome.error, timed_out=outcome.timed_out)
                except LeaseLost:
                    log.warning("job %s: another orchestrator took it over while it ended", job.id)
            if job.id not in self._unsaved:
                self._jobs.pop(job.id, None)
            self._fences.pop(job.id, None)
            self._lost.discard(job.id)
            self._cancel_requested.discard(job.id)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.release, job.id, self.owner)

    def _closed_or_closing(self) -> bool:
        return self._closed or self._closing

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
            with contextlib.suppress(BaseException):
                await download  # none of the job's tasks outlives its drive
            raise
        finally:
            self._downloading.pop(job.id, None)

    async def _provision(self, job: Job, provider: Provider) -> MachineHandle:
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
        bootstrap = self._bootstrap(job, token)
        intent = _intent_id(job.id)
        await self._store_write(self.store.add_reap, provider.name, intent, {}, job_id=job.id, kind="reconcile")
        try:
            handle = await asyncio.wait_for(provider.launch(job, bootstrap), provider.provision_timeout_s)
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
            job.price_per_hour = handle.price_per_hour
            job.gpu = handle.gpu
            job.runner_url = handle.runner_url
            await self._save(job)
            await self._wait_machine(job, provider, handle)
        except LeaseLost:
            raise  # the new driver owns the machine now
        except BaseException:
            await self._terminate(provider, handle, job)
            raise
        return handle

    def _bootstrap(self, job: Job, token: str) -> Bootstrap:
        """What the machine needs to run the runner for ``job``; the runner's life is bounded in every state
        (idle before the start, the max runtime while running, a retention time after the command exits)."""
        bootstrap = Bootstrap(job_id=job.id, token=token, runner_source=_runner_source(),
                              idle_timeout_s=RUNNER_IDLE_S,
                              packages=["trainorch-jupyter[train]"] if job.spec.train is not None else [])
        if hasattr(bootstrap, "retention_s"):
            bootstrap.retention_s = RUNNER_RETENTION_S
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

    async def _wait_machine(self, job: Job, provider: Provider, handle: MachineHandle) -> None:
        """Until the machine is up and its runner answers, within the provider's deadline. Provider API
        errors that may pass (429, 5xx, the network) are ridden out inside the deadline."""
        deadline = time.monotonic() + provider.provision_timeout_s
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
                raise ProviderError(job.provider, f"the machine was not ready within {provider.provision_timeout_s:.0f}s")
            await asyncio.sleep(2.0)
        await self._save(job)
        token = await asyncio.to_thread(self.store.runner_token, job.id)
        assert token is not None
        client = RunnerClient(str(job.runner_url), token, http=self._http)
        await client.wait_ready(timeout=max(5.0, deadline - time.monotonic()))

    async def _start_command(self, job: Job, client: RunnerClient) -> None:
        """Upload the inputs and start the command, unless the runner already has (a re-attach after the
        start was sent: uploading again would be refused, and the command is running or done)."""
        spec = job.spec
        status = await self._persist("reading the status", client.status, job.id)
        if status.get("state") == "idle":
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
        result = await self._poll(provider, handle)
        if result.status is MachineStatus.READY and result.runner_url:
            if result.runner_url != job.runner_url:  # the machine is reached elsewhere now
                handle.runner_url = job.runner_url = result.runner_url
                await self._save(job)
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
        deadline = time.monotonic() + POLL_RETRY_S
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
            if machine is not None and now - checked >= MACHINE_CHECK_S:
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

    async def _follow(self, job: Job, client: RunnerClient) -> None:
        """Copy logs and metrics from the runner into the store until the command exited.

        The two followers run in one task group: when one fails the other is stopped, and none is left
        once this returns. The orchestrator's own deadline (the max runtime plus a slack, for a runner that
        cannot end the command itself) applies only while the command runs: a job re-attached long after
        it ended drains its whole backlog."""
        fence = self._fence(job.id)
        log_offset = await self._store_write(self.store.prepare_log, job.id, fence=fence)
        metrics_offset = await asyncio.to_thread(self.store.metrics_offset, job.id)

        async def follow_logs() -> None:
            offset = log_offset
            while True:
                chunk = await self._persist("reading logs", functools.partial(client.read_logs, offset, wait=20.0), job.id)
                if chunk.data or chunk.next_offset != offset:
                    await self._store_write(self.store.append_log, job.id, chunk.data, chunk.next_offset, fence=fence)
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
                    await self._store_write(self.store.append_metrics, job.id, chunk.metrics, chunk.next_offset,
                                            fence=fence)
                    offset = chunk.next_offset
                    for m in chunk.metrics:
                        self._emit(job.id, "metric", m)
                if chunk.complete:
                    return

        async def followers() -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(follow_logs(), name=f"job-{job.id}-logs")
                tg.create_task(follow_metrics(), name=f"job-{job.id}-metrics")

        try:
            async with asyncio.TaskGroup() as tg:
                main = tg.create_task(followers(), name=f"job-{job.id}-follow")
                guard = tg.create_task(self._runtime_guard(job, client), name=f"job-{job.id}-deadline")
                main.add_done_callback(lambda _t: guard.cancel())
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _runtime_guard(self, job: Job, client: RunnerClient) -> None:
        """Raise DeadlineExceeded (after cancelling the command) when the command still runs past its max
        runtime plus the slack. The runner enforces the max runtime itself; this is for one that cannot
        (hung, or its clock wrong): a wait with no end would leave a paid machine running."""
        started = job.started_at or utcnow()
        left = job.spec.max_runtime + self.runtime_slack_s - (utcnow() - started).total_seconds()
        await asyncio.sleep(max(0.0, left))
        status = await self._persist("reading the status", client.status, job.id)
        if status.get("state") != "running":
            return  # it ended (in time or not, the runner says how): the followers drain the rest
        with contextlib.suppress(RunnerError, httpx.HTTPError):
            await client.cancel(grace_s=5.0)
        raise DeadlineExceeded(
            f"stopped by the orchestrator {self.runtime_slack_s:.0f}s past the max runtime of "
            f"{job.spec.max_runtime:.0f}s (the runner did not end the job)")

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
        if error and job.error and job.error.startswith("WARNING:"):
            error = f"{error}\n{job.error}"  # keep a terminate warning
        elif job.error and job.error.startswith("WARNING:") and error is None:
            error = job.error
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
                if time.monotonic() - started > TERMINATE_GIVE_UP_S:
                    log.error("could not terminate %s machine %s of job %s yet (%s); it stays on the reap list "
                              "and is retried until its provider confirms it gone", provider.name,
                              handle.machine_id, job.id, exc)
                    await asyncio.to_thread(self.store.mark_reap_due, provider.name, handle.machine_id, str(exc)[:500])
                    job.error = ((job.error + "\n") if job.error else "") + (
                        f"WARNING: the {provider.name} machine {handle.machine_id} could not be terminated yet "
                        f"({exc}); trainorch keeps trying (see Orchestrator.reap_list())")
                    return
                await asyncio.sleep(delay)
                delay = min(TERMINATE_RETRY_S, delay * 2)
            else:
                await self._store_write(self.store.reap_done, provider.name, handle.machine_id)
                return

    # -- the reaper ---------------------------------------------------------------------------

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
                                    "provider not installed", REAP_MAX_BACKOFF_S)
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
            retry = min(REAP_MAX_BACKOFF_S, REAP_POLL_S * 2 ** min(entry.attempts, 10))
            log.warning("reaping %s machine %s failed (%s); next try in %.0fs", entry.provider, entry.machine_id,
                        exc, retry)
            await asyncio.to_thread(self.store.reap_failed, entry.provider, entry.machine_id, str(exc)[:500], retry)
            return 0
        await asyncio.to_thread(self.store.reap_done, entry.provider, entry.machine_id)
        log.info("reaped %s machine %s (job %s)", entry.provider, entry.machine_id, entry.job_id)
        return 1

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
            await self._store_write(self.store.save_artifacts, job.id, infos, fence=self._fence(job.id))
            await self._save(job)
        self._emit(job.id, "artifacts", infos)
        return infos

    async def _download(self, job_id: str, to: Path | None, *, overwrite: bool = False) -> list[ArtifactInfo]:
        """On-demand download: verified files into ``to`` (default artifacts/<job_id>/).

        One at a time per job: two at once would serve the finished job's files from two runners on
        one state dir (the second refuses to start) and write the same destination twice."""
        lock = self._download_locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            return await self._download_locked(job_id, to, overwrite=overwrite)

    async def _download_locked(self, job_id: str, to: Path | None, *, overwrite: bool = False) -> list[ArtifactInfo]:
        """The files always come into the job's own folder first (recorded with the job, kept for the next
        call); a folder ``to`` of the user's gets verified copies, checked before the first byte is fetched."""
        job = await self._aget(job_id)
        own = self.artifacts_dir / job_id
        dest = (to or own).resolve()
        elsewhere = dest != own.resolve()
        have = await asyncio.to_thread(self.store.artifacts, job_id)
        if have:
            try:
                local = await asyncio.to_thread(artifacts_mod.verify_local, own)
            except (TrainorchError, OSError):
                local = []
            if local:
                if elsewhere:
                    return await asyncio.to_thread(_copy_verified, local, dest, job_id=job_id, overwrite=overwrite,
                                                   src_dir=own)
                return local
        if job.state.is_live:
            # A live job's files are not final: wait for its end (its own download, when it has one).
            await self._wait_terminal(job_id)
            return await self._download_locked(job_id, to, overwrite=overwrite)

        async def fetch(client: RunnerClient) -> list[ArtifactInfo]:
            if elsewhere:  # the user's folder would be clobbered or is too small: refuse before the first byte
                manifest = await client.manifest()
                if manifest is not None:
                    await asyncio.to_thread(artifacts_mod.check_destination, dest, manifest, job_id=job_id,
                                            overwrite=overwrite)
            infos = await self._download_from(job, client, own)
            if elsewhere:
                return await asyncio.to_thread(_copy_verified, infos, dest, job_id=job_id, overwrite=overwrite,
                                               src_dir=own)
            return infos

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
                return await fetch(client)
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
            return await fetch(client)
        finally:
            await self._terminate(provider, handle, job)

    async def _wait_terminal(self, job_id: str) -> None:
        while not (await self._aget(job_id)).state.is_terminal:
            await asyncio.sleep(0.2)

    # -- done callbacks, webhook ------------------------------------------------------------

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


def _copy_verified(infos: list[ArtifactInfo], dest: Path, *, job_id: str, overwrite: bool = False,
                   src_dir: Path | None = None) -> list[ArtifactInfo]:
    """Verified copies of ``infos`` (from ``src_dir``, the job's own folder) in the user's ``dest``: a file there
    with other bytes is never replaced unless ``overwrite`` (DestinationConflict before the first byte), and the
    free space is checked first; each copy is hashed before it is placed."""
    index = src_dir / artifacts_mod.ARTIFACT_INDEX if src_dir is not None else None
    return artifacts_mod.copy_artifacts(infos, dest, job_id=job_id, overwrite=overwrite, index_source=index)


def _intent_id(job_id: str) -> str:
    """The reap-list key of a create whose result is not known yet (found by the job's tag)."""
    return f"create:{job_id}"


def _handle_dict(handle: MachineHandle) -> dict[str, Any]:
    return {"runner_url": handle.runner_url, "data": dict(handle.data), "price_per_hour": handle.price_per_hour,
            "gpu": handle.gpu}


def _transient(exc: BaseException) -> bool:
    """An error of a provider's API that may pass if asked again (a 429, a 5xx, the network)."""
    if isinstance(exc, ProviderError):
        return bool(getattr(exc, "retryable", False))
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError | TimeoutError | ConnectionError)


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error a task group ended with that explains it (not the cancellations it caused)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


def _run_callback(fn: Callable[[Job], None], job: Job) -> None:
    try:
        fn(job)
    except Exception:
        log.exception("on_done callback failed")


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

    def download(self, to: Path | str | None = None, *, overwrite: bool = False) -> Download:
        """See :meth:`Orchestrator.download`: never replaces a file it did not place unless ``overwrite``."""
        return self.orchestrator.download(self.id, to, overwrite=overwrite)

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

