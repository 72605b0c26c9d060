"""Run and follow: upload the inputs and start the command, copy its logs and metrics into the store until it
exits (under the orchestrator's own deadline), and read how it ended.

``build_command`` is the argv the runner starts for a job spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import httpx

from ..diagnose import PathMap
from ..model import SNAPSHOT_INPUT_NAME, Job, JobSpec, JobState, RunnerError, utcnow
from ..runner_client import RunnerClient, RunnerHTTPError
from .base import OrchestratorBase
from .outcome import DeadlineExceeded, Outcome
from .provision import remote_packages

log = logging.getLogger("trainorch_jupyter")


class RunStage(OrchestratorBase):
    """Mixin: start a job's command on its runner, follow it to its end, and conclude."""

    async def _start_command(self, job: Job, client: RunnerClient) -> None:
        """Upload the inputs (the workdir snapshot among them) and start the command, unless the runner already
        has (a re-attach after the start was sent: uploading again would be refused, and the command is running
        or done). The job's record keeps what was sent and started: the snapshot, each input's SHA-256, the argv."""
        spec = job.spec
        status = await self._persist("reading the status", client.status, job.id)
        if status.get("state") == "idle":
            inputs = list(spec.all_inputs())
            provider = self.provider(job.provider)
            requirements = False
            if spec.workdir is not None:
                snapshot, manifest = await asyncio.to_thread(self._job_snapshot, job)
                inputs.append((SNAPSHOT_INPUT_NAME, snapshot.path))
                job.snapshot = snapshot.summary()
                requirements = any(f.get("path") == "requirements.txt" for f in manifest.get("files", []))
            wheel: Path | None = None
            if provider.remote and spec.train is not None:
                from ..remote import package_wheel

                wheel = await asyncio.to_thread(package_wheel, self.store.root / "wheels")
                inputs.append((wheel.name, wheel))
            command = build_command(spec, job.provider, wheel=wheel.name if wheel else None,
                                    packages=remote_packages(spec) if provider.remote else None,
                                    remote=provider.remote, requirements=requirements)
            job.command = list(command)
            for name, path in inputs:
                self._check_cancel(job)
                answer = await self._persist(f"uploading {name}", functools.partial(client.upload_input, name, path),
                                             job.id, bounded=False)
                if isinstance(answer, dict) and isinstance(answer.get("sha256"), str):
                    job.input_hashes[name] = answer["sha256"]
            await self._save(job)
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

    def _job_snapshot(self, job: Job) -> tuple[Any, dict[str, Any]]:
        """The job's workdir snapshot (checked against its SHA-256) and its manifest. A spec submitted without
        one (from Python, not through ``checks.prepare``) has its workdir packed now."""
        from .. import snapshot as snap
        from ..checks import resolve_snapshot

        spec = job.spec
        if spec.snapshot is not None:
            made = resolve_snapshot(spec, self.workspace)
        else:
            assert spec.workdir is not None
            limit = snap.max_bytes(spec.workdir_max_mb)
            found = snap.scan(spec.workdir, exclude=[self.workspace / "artifacts"], max_total=limit)
            found.check_size(limit)
            made = snap.pack(found, self.workspace, limit=limit)
        return made, snap.load_manifest(self.workspace, made.sha256) or {}

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
        if job.command and ENVIRONMENT_MARK in " ".join(job.command):
            await self._read_environment(job, client)
        if job.exit_code != 0:
            last = (await asyncio.to_thread(self.store.read_log, job.id, tail=5)).strip()
            paths = PathMap.for_job(job, self.workspace)
            msg = f"the command exited with code {job.exit_code}"
            if status.get("error"):
                msg += f" ({paths.map(str(status['error']))})"
            if last:
                msg += "; last lines:\n" + paths.map(last)
            return Outcome(JobState.FAILED, msg)
        if job.spec.auto_download:
            await self._set_state(job, JobState.DOWNLOADING)
            return None
        return Outcome(JobState.COMPLETED)

    async def _read_environment(self, job: Job, client: RunnerClient) -> None:
        """The packages of the job's Python after its installs (the file the command wrote into its output),
        into the job's record. Best effort: a record without it is still a record."""
        try:
            manifest = await client.manifest()
            entry = next((f for f in (manifest or {}).get("files", []) if f.get("path") == ENVIRONMENT_FILE), None)
            if entry is None or not isinstance(entry.get("size"), int) or entry["size"] > ENVIRONMENT_MAX_BYTES:
                return
            response = await self._runner_http(job).get(client.file_url(ENVIRONMENT_FILE),
                                                         headers=client.auth_headers())
            body = response.content
            if response.status_code != 200 or hashlib.sha256(body).hexdigest() != entry.get("sha256"):
                return
            data = json.loads(body)
            if isinstance(data, dict) and isinstance(data.get("packages"), dict):
                job.packages = {"python": str(data.get("python", "")), "requested": list(data.get("requested") or []),
                                "packages": {str(k): str(v) for k, v in data["packages"].items()}}
        except Exception as exc:  # the record is a help; it never fails the job
            log.info("job %s: could not read the packages it installed: %s", job.id, exc)


# What the composed command writes into the job's output after installing packages (the record reads it back).
ENVIRONMENT_FILE = ".trainorch/environment.json"
ENVIRONMENT_MAX_BYTES = 4 << 20
ENVIRONMENT_MARK = "[trainorch] packages recorded"
_PURELIB = "import sysconfig;print(sysconfig.get_paths()['purelib'])"
# A .pth line that adds the parent's site-packages as a site dir (its own .pth files, editable installs, count).
_PARENT_SITE = "import sysconfig;print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])"
_UNPACK = ("import sys,tarfile\n"
           "t=tarfile.open(sys.argv[1])\n"
           "k={'filter':'data'} if hasattr(tarfile,'data_filter') else {}\n"
           "t.extractall(sys.argv[2],**k)")
# The job's Python, after its installs: {python, packages {name: version}, requested} (importlib.metadata: the
# distributions the interpreter sees, first on sys.path wins, as an import would).
_RECORD_ENV = ("import importlib.metadata as m,json,os,sys,platform\n"
               "p={}\n"
               "for d in m.distributions():\n"
               " n=d.metadata['Name']\n"
               " if n and n.lower() not in p: p[n.lower()]=(n,d.version)\n"
               "o=os.path.join(os.environ['TRAINORCH_OUTPUT_DIR'],'.trainorch')\n"
               "os.makedirs(o,exist_ok=True)\n"
               "json.dump({'python':platform.python_version(),'requested':sys.argv[1:],"
               "'packages':dict(sorted(v for v in p.values()))},open(os.path.join(o,'environment.json'),'w'),"
               "indent=1)")


def build_command(spec: JobSpec, provider: str, *, wheel: str | None = None, packages: list[str] | None = None,
                  remote: bool | None = None, requirements: bool = False) -> list[str]:
    """The argv the runner starts for ``spec``.

    A plain command with nothing to bring is started as it is. Otherwise one ``/bin/sh`` script runs, every
    step printing into the job's log (a slow or failing install is seen live):

    1. the workdir snapshot (an input, hash-checked on upload) is unpacked into the runner's work dir, which is
       the command's working directory: the command sees the user's folder as it was at submit;
    2. with ``isolated``, a per-job virtual environment that sees the packages of the Python that made it and
       installs its own (on ``local``: never the kernel's environment);
    3. a trainer job on a remote machine brings this package's own code (``wheel``, unpacked onto
       ``PYTHONPATH``: the machine runs exactly the kernel's version) and pip-installs ``packages``;
    4. ``spec.pip`` and the snapshot's ``requirements.txt`` are pip-installed (``requirements.txt`` on ``local``
       only with ``isolated``), then the job's Python's packages are recorded (``ENVIRONMENT_FILE``);
    5. ``exec`` the command (or the trainer)."""
    is_remote = provider != "local" if remote is None else remote
    python = "python3" if is_remote else sys.executable
    user_pip = list(spec.pip)
    install_requirements = requirements and (is_remote or spec.isolated)
    needs_script = (wheel is not None or bool(packages) or spec.workdir is not None or bool(user_pip)
                    or spec.isolated)
    if spec.command is not None and not needs_script:
        return list(spec.command)
    if spec.train is not None:
        data = "${TRAINORCH_INPUT_DIR}/" + spec.train.data_input_name
        trainer_args = spec.train.cli_args(data, "${TRAINORCH_OUTPUT_DIR}")
        if not needs_script:
            return [python, "-m", "trainorch_jupyter.trainer", *trainer_args]
    q = shlex.quote
    lines = ["set -e", "export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1", f"PY={q(python)}"]
    if is_remote:
        # A rented machine is the job's alone: let pip install into its system Python (PEP 668 images such as
        # Ubuntu 24.04's refuse that otherwise; older pips ignore the variable).
        lines.insert(2, "export PIP_BREAK_SYSTEM_PACKAGES=1")
    if spec.workdir is not None:  # quietly: the log stays the command's own when nothing is installed
        lines.append(f'"$PY" -c {q(_UNPACK)} "$TRAINORCH_INPUT_DIR/{SNAPSHOT_INPUT_NAME}" .')
    if spec.isolated:
        lines += ['V="$(dirname "$TRAINORCH_INPUT_DIR")/venv"',
                  'echo "[trainorch] a virtual environment for this job (it sees the packages of $PY)"',
                  '"$PY" -m venv --without-pip --system-site-packages "$V"',
                  # The packages of the Python that made it stay visible (a kernel in a venv: its own, not the base
                  # interpreter's); pip installs into the new environment only, never there.
                  f'"$PY" -c {q(_PARENT_SITE)} > "$("$V/bin/python" -c {q(_PURELIB)})/trainorch-parent.pth"',
                  '"$V/bin/python" -m pip --version >/dev/null 2>&1 || "$V/bin/python" -m ensurepip --default-pip',
                  'export VIRTUAL_ENV="$V" PATH="$V/bin:$PATH"', 'PY="$V/bin/python"']
    if wheel is not None:
        lines += ['pkg="$PWD/.trainorch-pkg"',
                  f'"$PY" -m zipfile -e {q("${TRAINORCH_INPUT_DIR}/" + wheel)} "$pkg"',
                  'export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"',
                  f"echo {q('[trainorch] this package: ' + wheel)}"]
    requested: list[str] = []
    if packages:
        requested += packages
        lines += [f"echo {q('[trainorch] pip install ' + ' '.join(packages))}",
                  '"$PY" -m pip install --progress-bar off ' + " ".join(q(p) for p in packages)]
    if user_pip:
        requested += user_pip
        lines += [f"echo {q('[trainorch] pip install ' + ' '.join(user_pip))}",
                  '"$PY" -m pip install --progress-bar off ' + " ".join(q(p) for p in user_pip)]
    if install_requirements:
        requested.append("-r requirements.txt")
        lines += ["echo '[trainorch] pip install -r requirements.txt'",
                  '"$PY" -m pip install --progress-bar off -r requirements.txt']
    elif requirements:
        lines.append("echo '[trainorch] requirements.txt is not installed: on local, packages go into a per-job "
                     "environment only with --isolated (this job uses the environment of the kernel)'")
    if requested or spec.isolated:
        lines.append(f'"$PY" -c {q(_RECORD_ENV)} {" ".join(q(r) for r in requested)} '
                     f"&& echo {q(ENVIRONMENT_MARK)} || echo '[trainorch] could not record the packages'")
    if spec.command is not None:
        lines.append("exec " + " ".join(q(a) for a in spec.command))
    else:
        lines.append('exec "$PY" -m trainorch_jupyter.trainer ' + " ".join(q(a) for a in trainer_args))
    return ["/bin/sh", "-c", "\n".join(lines)]


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error a task group ended with that explains it (not the cancellations it caused)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
