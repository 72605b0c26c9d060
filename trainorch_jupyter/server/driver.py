"""The Jupyter server as a driver of jobs: the orchestrator of the server process.

It is the kernels' :class:`~trainorch_jupyter.orchestrator.Orchestrator` (same store, same fenced leases, same
drive), with what the REST API needs around it:

* **Drafts.** ``POST /api/training/jobs`` makes a job that exists (PENDING, in the store, seen by every kernel)
  but is not started until ``POST .../submit``. A draft is held under a lease no driver can take
  (:data:`DRAFT_OWNER`, never expiring), so no kernel's re-attach and no restarted server starts it by
  mistake; ``submit`` hands it to this orchestrator through the store's ordinary claim (a new fencing
  generation). A cancel of a draft (from the API, or recorded in the store by a kernel's ``%train cancel``)
  ends it CANCELLED without a machine ever being made.
* **Adoption.** :meth:`ServerOrchestrator.adopt` re-attaches every live job whose lease lapsed (its kernel
  died or was shut down): the store's claim grants it to one driver only, and the fence stops a stalled
  old driver from writing beside the new one.

Every method here blocks (store writes, waits on the orchestrator's loop): the server calls them from worker
threads, never on its own event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ..model import Job, JobNotFound, JobSpec, JobState, TrainorchError, new_job_id
from ..orchestrator import Orchestrator, settings

#: The lease owner of drafts. Its host part is no host name, so the store's liveness check always counts it
#: alive; with a lease that never runs out, no orchestrator's claim takes a draft. Only ``submit`` (which
#: releases it first) or a cancel does.
DRAFT_OWNER = "trainorch-draft:0:not-submitted"
#: A draft's lease: ~100 years.
DRAFT_LEASE_S = 100 * 365 * 24 * 3600.0


class Conflict(TrainorchError):
    """The job is not in a state that allows the request (HTTP 409)."""


class ServerOrchestrator(Orchestrator):
    """The orchestrator of the Jupyter server process (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("reattach", False)  # the server adopts on its own schedule (``adopt``)
        self._draft_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    # -- drafts -------------------------------------------------------------------------------

    def is_draft(self, job_id: str) -> bool:
        return self.store.owner(job_id) == DRAFT_OWNER

    def create_draft(self, spec: JobSpec | Mapping[str, Any]) -> Job:
        """Validate (as ``submit`` does) and record a PENDING job that nothing starts until :meth:`start`."""
        spec = self.validate(spec)
        job = Job(id=new_job_id(spec.name), spec=spec, provider=spec.provider)
        self.store.create(job, owner=DRAFT_OWNER, lease_s=DRAFT_LEASE_S)
        return job

    def start(self, job_id: str) -> bool:
        """Start a draft here. True when this orchestrator drives it now; False when another orchestrator
        took it in the instant between (it is driven: that is what was asked). :class:`Conflict` when it is
        not a draft (submitted already, or ended)."""
        with self._draft_lock:
            job = self.store.get(job_id)
            if job.state.is_terminal:
                raise Conflict(f"job {job_id} has ended ({job.state.value}); submit a new one")
            if self.store.owner(job_id) != DRAFT_OWNER or job_id in self._tasks:
                raise Conflict(f"job {job_id} was submitted already (it is {job.state.value})")
            if self.store.cancel_requested(job_id):
                self._end_draft(job_id)
                raise Conflict(f"job {job_id} was cancelled before it was submitted")
            self.store.release(job_id, DRAFT_OWNER)
            fence = self.store.claim(job_id, self.owner, settings.LEASE_S)
            if fence is None:
                return False  # another orchestrator claimed it first: it is submitted and driven there
            self._fences[job_id] = fence
            self._done_events[job_id] = threading.Event()
            self._jobs[job_id] = self.store.get(job_id)
            self._call(self._schedule(job_id, resume=False))
            return True

    def cancel_job(self, job_id: str) -> None:
        """Cancel any job: a draft ends at once; a submitted one through the store's cancel request, which
        whoever drives it honours (this orchestrator within CANCEL_POLL_S; one that lapsed is adopted here
        and ended, its machine terminated)."""
        with self._draft_lock:
            if self.store.owner(job_id) == DRAFT_OWNER:
                self.store.request_cancel(job_id)
                self._end_draft(job_id)
                return
        self.cancel(job_id)

    def _end_draft(self, job_id: str) -> None:
        """A draft with a cancel request: CANCELLED, under a lease of our own (fenced like any driver's write)."""
        self.store.release(job_id, DRAFT_OWNER)
        fence = self.store.claim(job_id, self.owner, settings.LEASE_S)
        if fence is None:
            return  # another orchestrator took it: it honours the request
        try:
            job = self.store.get(job_id)
            if not job.state.is_terminal:
                job.transition(JobState.CANCELLED)
                job.error = "cancelled before it was submitted"
                self.store.save(job, note=job.error, fence=fence)
        finally:
            self.store.release(job_id, self.owner)

    def end_cancelled_drafts(self, job_ids: list[str]) -> list[str]:
        """End the drafts among ``job_ids`` whose cancel was requested in the store (a kernel's ``%train
        cancel``); the ids ended."""
        ended = []
        for job_id in job_ids:
            with self._draft_lock:
                try:
                    if self.store.owner(job_id) == DRAFT_OWNER and self.store.cancel_requested(job_id):
                        self._end_draft(job_id)
                        ended.append(job_id)
                except JobNotFound:
                    continue
        return ended

    # -- adoption ----------------------------------------------------------------------------------

    def adopt(self, job_ids: list[str] | None = None) -> list[str]:
        """Drive the live jobs (of ``job_ids``, or all) that no live orchestrator drives: their lease lapsed or
        its owner's process is gone. The store's claim decides; the ids taken."""
        if self._closed or self._closing:
            return []
        wanted = set(job_ids) if job_ids is not None else None
        taken: list[str] = []
        for job_id in self.store.live_job_ids():
            if (wanted is not None and job_id not in wanted) or job_id in self._tasks:
                continue
            with self._draft_lock:
                if job_id in self._tasks:
                    continue
                if self._take(job_id):
                    taken.append(job_id)
        return taken

    def reattach(self) -> list[str]:
        return self.adopt()

    def driven(self) -> list[str]:
        """The jobs this orchestrator drives now."""
        return list(self._tasks)

