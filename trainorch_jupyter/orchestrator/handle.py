"""What the notebook holds: :class:`JobHandle` (a live view of one job) and :class:`Download` (a download's
future, awaitable in a notebook)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..model import ArtifactInfo, Job, JobState

if TYPE_CHECKING:
    from .facade import Orchestrator


class Download(concurrent.futures.Future[list[ArtifactInfo]]):
    """What ``job.download()`` returns: ``await`` it in a notebook, or call ``.result(timeout)``."""

    def __await__(self) -> Generator[Any, None, list[ArtifactInfo]]:
        return asyncio.wrap_future(self).__await__()


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
