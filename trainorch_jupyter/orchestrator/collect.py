"""Collect: a job's files, each verified by SHA-256 against the runner's manifest, into ``artifacts/<job_id>/``.

Three ways in: the DOWNLOADING phase of a job that succeeded (``_auto_download``; a cancel stops it), what a
stopped command saved before its machine goes (``_salvage``, best effort), and a download on demand
(``_download``: one at a time per job, copies into a user's folder that never replace a file they did not
place; for an ended job whose machine is gone, the provider may serve its saved state again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import httpx

from .. import artifacts as artifacts_mod
from ..model import ArtifactInfo, Job, JobState, RunnerError, TrainorchError
from ..providers import MachineHandle
from ..runner_client import RunnerClient
from .base import OrchestratorBase
from .outcome import JobCancelled

log = logging.getLogger("trainorch_jupyter")


class CollectStage(OrchestratorBase):
    """Mixin: download, verify and place a job's files."""

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
        infos = await artifacts_mod.download_manifest(self._runner_http(job), client.base_url, headers=client.auth_headers(),
                                                      manifest=manifest, dest_dir=dest, job_id=job.id, metadata=metadata)
        if dest == self.artifacts_dir / job.id:
            job.artifacts = infos
            await self._store_write(self.store.save_artifacts, job.id, infos, fence=self._fence(job.id))
            await self._save(job)
        self._emit(job.id, "artifacts", infos)
        return infos

    async def _auto_download(self, job: Job, client: RunnerClient) -> None:
        """The DOWNLOADING phase; a cancel stops it (JobCancelled) so the machine goes at once."""
        self._check_cancel(job)
        dest = self.artifacts_dir / job.id
        download = asyncio.create_task(self._persist("downloading artifacts",
                                                     lambda: self._download_from(job, client, dest), job.id,
                                                     bounded=False))
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
            client = RunnerClient(job.runner_url, token, http=self._runner_http(job))
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
            client = RunnerClient(handle.runner_url, token, http=self._runner_http(job))
            await client.wait_ready(timeout=30.0)
            return await fetch(client)
        finally:
            await self._terminate(provider, handle, job)

    async def _wait_terminal(self, job_id: str) -> None:
        while not (await self._aget(job_id)).state.is_terminal:
            await asyncio.sleep(0.2)


def _copy_verified(infos: list[ArtifactInfo], dest: Path, *, job_id: str, overwrite: bool = False,
                   src_dir: Path | None = None) -> list[ArtifactInfo]:
    """Verified copies of ``infos`` (from ``src_dir``, the job's own folder) in the user's ``dest``: a file there
    with other bytes is never replaced unless ``overwrite`` (DestinationConflict before the first byte), and the
    free space is checked first; each copy is hashed before it is placed."""
    index = src_dir / artifacts_mod.ARTIFACT_INDEX if src_dir is not None else None
    return artifacts_mod.copy_artifacts(infos, dest, job_id=job_id, overwrite=overwrite, index_source=index)
