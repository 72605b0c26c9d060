"""The local provider: the runner as a subprocess on 127.0.0.1 of this machine.

The runner is started in its own session, so a kernel interrupt or restart does not kill it and a new
kernel re-attaches to it. Its state dir lives in the workspace (``.trainorch/machines/<job_id>``, 0700), so a
finished job's files can be served again later by starting a runner on the same dir.

The runner gets the kernel's environment less anything that looks secret (:mod:`trainorch_jupyter._env`), and
its token in a 0600 file that it reads and deletes (``--token-file``): neither the job's environment nor
``/proc/<runner pid>/environ`` holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .._env import runner_environment
from .._process import pid_alive
from ..model import Job, JobSpec, ProviderError, SpecError
from ..runner import write_token_file
from . import Bootstrap, MachineHandle, MachineStatus, PollResult, Provider

RUNNER_FILE = Path(__file__).resolve().parent.parent / "runner.py"


def _pid_is_runner(pid: int, state_dir: Path) -> bool:
    """True when ``pid`` is alive and really is the runner of ``state_dir`` (pids get reused)."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the pid
    return str(state_dir).encode() in cmdline


class LocalProvider(Provider):
    name = "local"
    provision_timeout_s = 60.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def state_dir(self, job_id: str) -> Path:
        return self.workspace / ".trainorch" / "machines" / job_id

    def validate(self, spec: JobSpec) -> None:
        r = spec.resources
        if r.max_price_per_hour is not None:
            raise SpecError("resources.max_price_per_hour", "does not apply to the local provider (it costs nothing)")
        for name in ("gpu", "region", "image", "cloud"):
            if getattr(r, name) is not None:
                raise SpecError(f"resources.{name}", "does not apply to the local provider: it runs on this machine "
                                "as it is (choose a cloud provider to pick a GPU, region or image)")

    async def launch(self, job: Job, bootstrap: Bootstrap) -> MachineHandle:
        state_dir = self.state_dir(job.id)
        return await self._start_runner(state_dir, bootstrap.token, bootstrap.runner_args())

    async def serve_again(self, job: Job, token: str, idle_timeout_s: float = 600.0) -> MachineHandle | None:
        """Start a runner on a finished job's state dir (to download its files); None if the dir is gone.
        It exits ``idle_timeout_s`` after the last request (its retention)."""
        state_dir = self.state_dir(job.id)
        if not (state_dir / "status.json").exists():
            return None
        return await self._start_runner(state_dir, token, ["--idle-timeout", f"{idle_timeout_s:g}",
                                                           "--retention", f"{idle_timeout_s:g}"])

    async def _start_runner(self, state_dir: Path, token: str, life_args: list[str]) -> MachineHandle:
        _private_dirs(self.workspace, state_dir)
        info_path = state_dir / "runner.json"
        info_path.unlink(missing_ok=True)
        # Nothing secret of the kernel's environment reaches the runner (hence the job); the token goes in a
        # 0600 file that the runner deletes once read.
        env = runner_environment(os.environ)
        token_file = write_token_file(str(state_dir), token)
        cmd = [sys.executable, str(RUNNER_FILE), "--state-dir", str(state_dir), "--host", "127.0.0.1",
               "--port", "0", "--token-file", token_file, *life_args]
        gpu_task: asyncio.Future[str | None] | None = None
        proc: subprocess.Popen[bytes] | None = None
        ready = False
        try:
            out_fd = os.open(state_dir / "runner.out", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(out_fd, "ab") as out:
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            self._procs[str(proc.pid)] = proc
            gpu_task = asyncio.ensure_future(asyncio.to_thread(_local_gpu))  # nvidia-smi: off the loop
            deadline = time.monotonic() + self.provision_timeout_s
            while True:
                if info_path.exists():
                    try:
                        info = json.loads(info_path.read_text())
                        if int(info["pid"]) == proc.pid:
                            break
                    except (ValueError, KeyError, OSError):
                        pass
                if proc.poll() is not None:
                    tail = (state_dir / "runner.out").read_bytes()[-2000:].decode(errors="replace")
                    raise ProviderError(self.name,
                                        f"the runner exited at start with code {proc.returncode}: {tail.strip()}")
                if time.monotonic() > deadline:
                    await self._kill(proc.pid, state_dir)
                    raise ProviderError(self.name, f"the runner did not start within {self.provision_timeout_s:.0f}s",
                                        retryable=True)
                await asyncio.sleep(0.05)
            gpu = await gpu_task
            ready = True
        finally:
            if proc is not None and not ready and proc.poll() is None:
                # Interrupted (a cancel, the orchestrator closing) or failed before the runner said where it
                # listens: nothing else knows this process, so it goes now.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._kill(proc.pid, state_dir, grace_s=2.0))
            with contextlib.suppress(OSError):
                os.unlink(token_file)  # the runner deleted it, unless it never got that far
            if gpu_task is not None and not gpu_task.done():
                gpu_task.cancel()
        return MachineHandle(provider=self.name, machine_id=str(proc.pid), runner_url=str(info["url"]),
                             data={"pid": proc.pid, "state_dir": str(state_dir)}, price_per_hour=0.0, gpu=gpu)

    async def poll(self, handle: MachineHandle) -> PollResult:
        pid = int(handle.data.get("pid", handle.machine_id))
        state_dir = Path(handle.data["state_dir"])
        if _pid_is_runner(pid, state_dir):
            return PollResult(MachineStatus.READY, handle.runner_url)
        return PollResult(MachineStatus.GONE, None, "the runner process is gone")

    async def terminate(self, handle: MachineHandle) -> None:
        await self._kill(int(handle.data.get("pid", handle.machine_id)), Path(handle.data["state_dir"]))

    async def reconcile(self, job: Job) -> list[MachineHandle]:
        state_dir = self.state_dir(job.id)
        try:
            info = json.loads((state_dir / "runner.json").read_text())
        except (OSError, ValueError):
            return []
        pid = int(info.get("pid", 0))
        if pid and _pid_is_runner(pid, state_dir):
            return [MachineHandle(self.name, str(pid), info.get("url"), {"pid": pid, "state_dir": str(state_dir)})]
        return []

    async def _kill(self, pid: int, state_dir: Path, grace_s: float = 15.0) -> None:
        """SIGTERM the runner (it stops its command first), then SIGKILL; confirmed by the pid's absence."""
        proc = self._procs.pop(str(pid), None)
        if _pid_is_runner(pid, state_dir):
            # The job's command runs in a process group of its own; the runner stops it on SIGTERM.
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while _pid_is_runner(pid, state_dir) and time.monotonic() < deadline:
                if proc is not None:
                    proc.poll()
                await asyncio.sleep(0.05)
            if _pid_is_runner(pid, state_dir):
                _signal(pid, signal.SIGKILL)
        _kill_command_group(state_dir)
        if proc is not None:
            await asyncio.to_thread(proc.wait)
        if _pid_is_runner(pid, state_dir):
            raise ProviderError(self.name, f"runner pid {pid} is still alive after SIGKILL", retryable=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_command_group(state_dir: Path) -> None:
    """Make sure the job's command group is gone too (if the runner died without stopping it)."""
    try:
        status = json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return
    pid = status.get("pid")
    if isinstance(pid, int) and pid > 0 and status.get("state") == "running":
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _private_dirs(workspace: Path, state_dir: Path) -> None:
    """Make the state dir (and what is missing of ``.trainorch/machines`` above it) 0700."""
    missing = []
    d = state_dir
    while not d.exists() and d != workspace and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
    with contextlib.suppress(OSError):
        state_dir.chmod(0o700)


@functools.cache
def _local_gpu() -> str | None:
    """A CUDA device name if one is visible to this process, without importing torch.

    Runs ``nvidia-smi`` (up to 5 s): call it off the event loop. Cached for the process (the GPUs a machine
    has do not change under a kernel)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return name or None
