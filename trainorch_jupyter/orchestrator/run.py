"""Run and follow: upload the inputs and start the command, copy its logs and metrics into the store until it
exits (under the orchestrator's own deadline), and read how it ended.

``build_command`` is the argv the runner starts for a job spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx

from ..model import Job, JobSpec, JobState, RunnerError, utcnow
from ..runner_client import RunnerClient, RunnerHTTPError
from .base import OrchestratorBase
from .outcome import DeadlineExceeded, Outcome
from .provision import remote_packages


class RunStage(OrchestratorBase):
    """Mixin: start a job's command on its runner, follow it to its end, and conclude."""

    async def _start_command(self, job: Job, client: RunnerClient) -> None:
        """Upload the inputs and start the command, unless the runner already has (a re-attach after the
        start was sent: uploading again would be refused, and the command is running or done)."""
        spec = job.spec
        status = await self._persist("reading the status", client.status, job.id)
        if status.get("state") == "idle":
            inputs = list(spec.all_inputs())
            wheel: Path | None = None
            provider = self.provider(job.provider)
            if provider.remote and spec.train is not None:
                from ..remote import package_wheel

                wheel = await asyncio.to_thread(package_wheel, self.store.root / "wheels")
                inputs.append((wheel.name, wheel))
            command = build_command(spec, job.provider, wheel=wheel.name if wheel else None,
                                    packages=remote_packages(spec) if provider.remote else None)
            for name, path in inputs:
                self._check_cancel(job)
                await self._persist(f"uploading {name}", functools.partial(client.upload_input, name, path), job.id,
                                    bounded=False)
            self._check_cancel(job)

            async def start_once() -> None:
                # Safe to repeat: a start whose answer was lost shows as a runner that is no longer idle.
                status = await client.status()
                if status.get("state") != "idle":
                    return
                try:
                    await client.start(command, env=dict(spec.env),
                                       max_runtime_s=spec.max_runtime, grace_s=10.0)
                except RunnerHTTPError as exc:
                    if exc.status != 409:
                        raise

            await self._persist("starting the command", start_once, job.id)
        await self._set_state(job, JobState.RUNNING)

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


def build_command(spec: JobSpec, provider: str, *, wheel: str | None = None,
                  packages: list[str] | None = None) -> list[str]:
    """The argv the runner starts for ``spec``.

    On a remote machine a trainer job first brings this package's own code (``wheel``, an input built from
    the running package, unpacked onto ``PYTHONPATH``: the machine runs exactly the kernel's version) and pip-installs
    ``packages``; all of it prints into the job's log, so a slow or failing install is seen live."""
    if spec.command is not None:
        return list(spec.command)
    assert spec.train is not None
    python = sys.executable if provider == "local" else "python3"
    data = "${TRAINORCH_INPUT_DIR}/" + spec.train.data_input_name
    argv = [python, "-m", "trainorch_jupyter.trainer", *spec.train.cli_args(data, "${TRAINORCH_OUTPUT_DIR}")]
    if wheel is None and not packages:
        return argv
    lines = ["set -e", "export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1"]
    if wheel is not None:
        lines += ['pkg="$PWD/.trainorch-pkg"',
                  f'{python} -m zipfile -e {shlex.quote("${TRAINORCH_INPUT_DIR}/" + wheel)} "$pkg"',
                  'export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"',
                  f"echo {shlex.quote('[trainorch] this package: ' + wheel)}"]
    if packages:
        quoted = " ".join(shlex.quote(p) for p in packages)
        lines += [f"echo {shlex.quote('[trainorch] pip install ' + ' '.join(packages))}",
                  f"{python} -m pip install --progress-bar off {quoted}"]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return ["/bin/sh", "-c", "\n".join(lines)]


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error a task group ended with that explains it (not the cancellations it caused)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
