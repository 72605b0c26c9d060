"""The orchestrator's public face: :class:`Orchestrator` and the process's one instance (``get_orchestrator``).

``Orchestrator`` puts the parts together (each a mixin in its own file, sharing the state in ``base.py``) and
holds the public API: submit/validate, job/jobs/get, cancel, wait/await_job/on_done, logs/metrics, download,
reattach, provider, reap/reap_list (``reaper.py``), subscribe (``events.py``), close. The notebook's thread only
ever hands work to the orchestrator's loop (``loop.py``) and returns: ``submit`` validates and persists the job,
schedules its drive (``drive.py``) and gives back a :class:`~.handle.JobHandle` at once. Public methods come in
pairs: ``async def a<name>`` for IPython's top-level ``await`` and a sync wrapper.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from ..model import ArtifactInfo, Job, JobSpec, JobState, SpecError, new_job_id
from ..providers import Provider
from . import settings
from .collect import CollectStage
from .connect import ConnectStage
from .drive import DriveStage
from .events import Event
from .handle import Download, JobHandle
from .housekeeping import Housekeeping
from .notify import Notifier
from .offers import AUTO, OffersStage
from .provision import ProvisionStage
from .reaper import Reaper
from .release import ReleaseStage
from .run import RunStage
from .watch import WatchStage


class Orchestrator(DriveStage, ProvisionStage, ConnectStage, RunStage, CollectStage, ReleaseStage, Reaper,
                   OffersStage, WatchStage, Notifier, Housekeeping):
    """Runs jobs of one workspace. Thread-safe; all job work happens on its own loop thread."""

    def __init__(self, workspace: Path | str | None = None, *, provider_config: Mapping[str, Mapping[str, Any]] | None = None,
                 reattach: bool = True, webhook_url: str | None = None,
                 providers: Mapping[str, type[Provider]] | None = None) -> None:
        super().__init__(workspace, provider_config=provider_config, webhook_url=webhook_url, providers=providers)
        self._start_loop("trainorch-orchestrator")
        self._http = self._call(self._make_http())
        self._lease_task = self._call(self._start_housekeeping())
        if reattach:
            self.reattach()

    async def _make_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))

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
            for watcher in [*self._watchers.values(), *([self._all_watcher] if self._all_watcher else [])]:
                watcher.cancel()
            for job_id in list(self._runner_https):
                await self._close_runner_http(job_id)
            await self._http.aclose()

        with contextlib.suppress(Exception):
            self._call(shutdown(), timeout)
        self._closed = True
        self._stop_loop(timeout)
        self._callbacks.shutdown(wait=False)
        self.store.close()

    # -- providers --------------------------------------------------------------------------

    def provider(self, name: str) -> Provider:
        """The provider instance of ``name`` (one per orchestrator; made on first use, from any thread)."""
        with self._providers_lock:
            if name not in self._providers:
                cls = self._provider_classes.get(name)
                if cls is None:
                    raise SpecError("provider", f"unknown provider {name!r}; available: {', '.join(sorted(self._provider_classes))}")
                config = {"workspace_id": self.workspace_id, **self._provider_config.get(name, {})}
                self._providers[name] = cls(workspace=self.workspace, http=self._http, **config)
            return self._providers[name]

    @property
    def provider_names(self) -> list[str]:
        return sorted(self._provider_classes)

    def subscribe(self, callback: Callable[[Event], None], job_id: str | None = None) -> Callable[[], None]:
        """Call ``callback(event)`` on the loop thread for each event of ``job_id`` (all jobs if None). Jobs that
        another process drives (another kernel, the Jupyter server) are followed through the store."""
        unsubscribe = super().subscribe(callback, job_id)
        self._watch_elsewhere(job_id)
        return unsubscribe

    # -- public API ---------------------------------------------------------------------------

    def validate(self, spec: JobSpec | Mapping[str, Any]) -> JobSpec:
        """The spec as a JobSpec, checked; raises SpecError naming the field. Touches nothing."""
        if not isinstance(spec, JobSpec):
            spec = JobSpec.from_dict(spec)
        spec.validate(known_providers={*self._provider_classes, AUTO})
        if spec.provider == AUTO:
            # Checked against every cloud provider now: at least one must take it (a key, a GPU it knows).
            reasons = {}
            for name in self.cloud_providers():
                try:
                    self.provider(name).validate(dataclasses.replace(spec, provider=name))
                except SpecError as exc:
                    reasons[name] = str(exc)
            if len(reasons) == len(self.cloud_providers()):
                detail = "; ".join(f"{n}: {r}" for n, r in sorted(reasons.items())) or "no cloud provider is installed"
                raise SpecError("provider", f"'auto' found no cloud provider that can take this job ({detail})")
            return spec
        self.provider(spec.provider).validate(spec)
        return spec

    def submit(self, spec: JobSpec | Mapping[str, Any]) -> JobHandle:
        """Validate, persist and schedule a job; returns its handle at once."""
        spec = self.validate(spec)
        job = Job(id=new_job_id(spec.name), spec=spec, provider=spec.provider)
        self.store.create(job, owner=self.owner, lease_s=settings.LEASE_S)
        fence = self.store.claim(job.id, self.owner, settings.LEASE_S)
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
        fence = await asyncio.to_thread(self.store.claim, job_id, self.owner, settings.LEASE_S)
        if fence is not None:
            # Nobody alive drives it: adopt it; the drive sees the request and ends it (its machine too).
            self._fences[job_id] = fence
            self._done_events.setdefault(job_id, threading.Event())
            await self._schedule(job_id, resume=True)

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
            if self._take(job_id):
                taken.append(job_id)
        return taken

    def _take(self, job_id: str) -> bool:
        """Claim ``job_id``'s lease and drive it from where its record stands; False when a live orchestrator
        holds it. (Not from the loop thread: it waits for the drive to be scheduled.)"""
        fence = self.store.claim(job_id, self.owner, settings.LEASE_S)
        if fence is None:
            return False
        self._fences[job_id] = fence
        self._done_events.setdefault(job_id, threading.Event())
        self._jobs[job_id] = self.store.get(job_id)
        self._call(self._schedule(job_id, resume=True))
        return True

    async def _schedule(self, job_id: str, *, resume: bool) -> None:
        task = asyncio.create_task(self._drive(job_id, resume=resume), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))


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
