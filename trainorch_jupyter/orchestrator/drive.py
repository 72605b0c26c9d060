"""One job's drive: the stages in order, how the drive ends, the job's record, and honouring a cancel.

``_drive`` runs a job from where its record says it is: provision (``provision.py``), connect and start the
command (``connect.py``, ``run.py``), follow it to its end (``run.py``), collect its files (``collect.py``), and
on every way out release the machine (``release.py``) before the job is ended (``_finish``), so a job seen as
finished never has a machine left behind. Every write of the job's record goes through ``_store_write``
(retried over a locked database, fenced by the job's lease) and ``_set_state`` (emits the event, runs the done
callbacks and the webhook once the job ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx

from ..model import Job, JobState, TrainorchError, utcnow
from ..providers import MachineHandle, Provider
from ..runner_client import RunnerClient
from ..store import Fence, LeaseLost
from . import settings
from .base import OrchestratorBase
from .outcome import _USER_CANCEL, DeadlineExceeded, JobCancelled, Outcome

log = logging.getLogger("trainorch_jupyter")
T = TypeVar("T")


class DriveStage(OrchestratorBase):
    """Mixin: the drive of each job driven here, and the writes of its record."""

    # -- the job's record ---------------------------------------------------------------------

    async def _store_write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store write from a job's driver, in a worker thread: a locked database or a full disk for a
        moment is retried (up to STORE_RETRY_S) instead of failing a healthy job; a lost lease is final."""
        delay = 0.1
        deadline = time.monotonic() + settings.STORE_RETRY_S
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

    # -- the drive ----------------------------------------------------------------------------

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
            self._interruptible.add(job.id)
            if job.provider == "auto" and job.machine_id is None:
                # --provider auto: the cheapest offer that fits, falling over to the next (offers.py).
                if job.state is JobState.PENDING:
                    await self._set_state(job, JobState.PROVISIONING)
                provider, handle = await self._provision_auto(job)
            else:
                provider = self.provider(job.provider)
                if resume:
                    handle = await self._resume_handle(job, provider)
                if handle is None:
                    handle = await self._provision(job, provider)
            self._machines[job.id] = (provider, handle)
            token = await asyncio.to_thread(self.store.runner_token, job.id)
            assert token is not None
            client = RunnerClient(str(job.runner_url), token, http=self._runner_http(job))
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
            self._last_ok.pop(job.id, None)
            await self._close_runner_http(job.id)
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
                from ..diagnose import diagnose_job

                tail = await asyncio.to_thread(self.store.read_log, job.id, tail=80)
                job.diagnosis = diagnose_job(job, tail, error=error, timed_out=timed_out, workspace=self.workspace)
            except Exception:  # a diagnosis is a help; its failure must not keep the job live
                log.exception("diagnosis of job %s failed", job.id)
        await self._set_state(job, state, note=error)

    # -- cancel -------------------------------------------------------------------------------

    def _check_cancel(self, job: Job) -> None:
        if job.id in self._cancel_requested:
            raise JobCancelled(job.id)

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TrainorchError):
        return str(exc)
    if isinstance(exc, httpx.HTTPError):
        return f"network error talking to the machine: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"
