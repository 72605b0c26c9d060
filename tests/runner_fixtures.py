"""Helpers shared by the runner tests: start a real runner subprocess on loopback, stop it for sure."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import wait_for as wait_for
from trainorch_jupyter._process import pid_alive as pid_alive

REPO = Path(__file__).resolve().parents[1]
RUNNER_PY = REPO / "trainorch_jupyter" / "runner.py"
PY = sys.executable


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


@dataclass
class RunningRunner:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    token: str
    url: str
    port: int
    stderr_path: Path
    job_pgids: list[int] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60.0, **kwargs)

    def status_file(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "status.json").read_text())

    def stop(self) -> None:
        """Stop the runner for sure, and anything left of the job's process group."""
        with contextlib.suppress(Exception):
            pid = self.status_file().get("pid")
            if isinstance(pid, int):
                self.job_pgids.append(pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pgid in self.job_pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group_pids(pgid):
                    os.killpg(pgid, signal.SIGKILL)


def write_token_file(directory: Path, token: str) -> Path:
    """A 0600 file holding ``token``, the way a provider hands it to the runner (which deletes it)."""
    path = directory / f"token-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def start_runner(state_dir: Path, *, token: str | None = None, args: tuple[str, ...] = (),
                 module: bool = False, port: int = 0, wait: bool = True, token_via: str = "file",
                 env: dict[str, str] | None = None, python: str = PY) -> RunningRunner:
    """A runner subprocess on loopback. ``token_via``: "file" (``--token-file``) or "env" (the legacy
    ``TRAINORCH_RUNNER_TOKEN``). ``env`` replaces the environment it starts with (the token aside)."""
    token = token or secrets.token_urlsafe(24)
    run_env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
    run_env.pop("TRAINORCH_RUNNER_TOKEN", None)
    state_dir.mkdir(parents=True, exist_ok=True)
    token_args: list[str] = []
    if token_via == "env":
        run_env["TRAINORCH_RUNNER_TOKEN"] = token
    else:
        token_args = ["--token-file", str(write_token_file(state_dir.parent, token))]
    stderr_path = state_dir.parent / f"{state_dir.name}-runner-stderr-{secrets.token_hex(3)}.txt"
    target = ["-m", "trainorch_jupyter.runner"] if module else [str(RUNNER_PY)]
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([python, *target, "--state-dir", str(state_dir), "--port", str(port), *token_args,
                                 *args],
                                env=run_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                cwd=str(state_dir.parent))
    info_path = state_dir / "runner.json"
    runner = RunningRunner(proc=proc, state_dir=state_dir, token=token, url=f"http://127.0.0.1:{port}", port=port,
                           stderr_path=stderr_path)
    if not wait:
        return runner

    def ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise AssertionError(f"runner exited with {proc.returncode}: {stderr_path.read_text()}")
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("pid") == proc.pid else None

    try:
        info = wait_for(ready, timeout=20.0, what="runner.json")
    except BaseException:
        runner.stop()
        raise
    runner.url = info["url"]
    runner.port = info["port"]
    return runner


@contextlib.contextmanager
def running(state_dir: Path, **kwargs: Any) -> Iterator[RunningRunner]:
    runner = start_runner(state_dir, **kwargs)
    try:
        yield runner
    finally:
        runner.stop()


def wait_exited(client: httpx.Client, timeout: float = 20.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        st = client.get("/v1/status").json()
        return st if st["state"] == "exited" else None

    return wait_for(done, timeout=timeout, interval=0.05, what="the command to exit")


def py_command(code: str) -> list[str]:
    return [PY, "-c", code]
