"""Stage-0 (``trainorch_jupyter.remote.stage0``): the start command really run by ``sh -c`` in a stand-in machine
(a temp HOME, a bare PATH, the port in an env variable as RunPod gives it), the real runner pushed to it, and a
job driven over the pinned channel. Also the wheel of this package (``remote.wheel``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import glob
import hashlib
import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import wait_for
from trainorch_jupyter.artifacts import download_manifest
from trainorch_jupyter.providers import Bootstrap
from trainorch_jupyter.remote import (
    MAX_COMMAND_CHARS,
    ChannelKeys,
    RunnerRefused,
    new_channel_keys,
    package_wheel,
    push_runner,
    runner_http_client,
    stage0_command,
)
from trainorch_jupyter.remote.stage0 import program_source
from trainorch_jupyter.runner_client import RunnerClient

REPO = Path(__file__).resolve().parents[1]
RUNNER_SOURCE = (REPO / "trainorch_jupyter" / "runner.py").read_bytes()
RUNNER_SHA = hashlib.sha256(RUNNER_SOURCE).hexdigest()
PORT_ENV = "RUNPOD_TCP_PORT_8765"
#: The dead-man hook a RunPod machine would get (the pod-scoped key is in its environment).
RUNPOD_HOOK = 'runpodctl remove pod "$RUNPOD_POD_ID" || kill -TERM 1'


def _python(version: str) -> str | None:
    """An interpreter of exactly ``version`` ("3.9"), or None."""
    candidates = [shutil.which(f"python{version}"),
                  *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))]
    for exe in candidates:
        if not exe:
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            continue
        if out.stdout.strip() == version:
            return exe
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Machine:
    """A stand-in for a rented machine: its HOME, its PATH and the start command running there."""

    home: Path
    bin: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        # Only what a provider sets: no value of ours (the command must carry everything itself).
        return {"HOME": str(self.home), "PATH": f"{self.bin}:/usr/bin:/bin", PORT_ENV: str(self.port)}

    def start(self, command: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log = self.home.parent / f"machine-{secrets.token_hex(3)}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["/bin/sh", "-c", command], env=env or self.env(), cwd=str(self.home),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        return self.proc

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _link(bin_dir: Path, name: str, target: str) -> None:
    (bin_dir / name).symlink_to(target)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    """``python3`` is a Python 3.8 where there is one (too old: stage-0 must skip it) and ``python`` a 3.9 where
    there is one (the oldest it must run on), else both are this interpreter."""
    home = tmp_path / "home"
    bin_dir = tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    py38, py39 = _python("3.8"), _python("3.9")
    _link(bin_dir, "python3", py38 if py38 and py39 else sys.executable)
    _link(bin_dir, "python", py39 or sys.executable)
    m = Machine(home=home, bin=bin_dir, port=_free_port())
    try:
        yield m
    finally:
        m.stop()


def _command(keys: ChannelKeys, token: str, *, args: list[str] | None = None, sha: str = RUNNER_SHA) -> str:
    return stage0_command(token=token, keys=keys, runner_sha256=sha, port_env=PORT_ENV,
                          runner_args=args if args is not None else ["--idle-timeout", "120", "--retention", "120"])


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------ the command


def test_stage0_command_fits_every_provider_and_needs_no_env_value() -> None:
    """Issue 8 item 1: one sh line <= 3,500 characters for realistic arguments (Vast.ai allows 4,096 for
    onstart + args, 256 per env value: nothing of ours goes in an env value)."""
    keys = new_channel_keys()
    token = secrets.token_urlsafe(32)
    bootstrap = Bootstrap(job_id="j-20261201-0a1b2c3d", token=token, runner_source=RUNNER_SOURCE.decode(),
                          on_exit=RUNPOD_HOOK)
    cmd = stage0_command(token=token, keys=keys, runner_sha256=RUNNER_SHA, runner_args=bootstrap.runner_args(),
                         port_env=PORT_ENV)
    assert len(cmd) <= MAX_COMMAND_CHARS == 3_500, len(cmd)
    assert cmd.isascii() and cmd.isprintable() and "\n" not in cmd
    # Safe to wrap in sh -c '...' as it is: no single quote, backslash or backtick.
    assert not set(cmd) & set("'\\`")
    # The only shell variables it reads are its own (P: the interpreter, H: the hook).
    assert set(re.findall(r"\$\{?(\w+)", cmd)) <= {"P", "H"}
    # Neither the token nor the key is there in clear (they are compressed in, for the provider's HTTPS API).
    assert token not in cmd and keys.key_pem.splitlines()[1] not in cmd
    # A hook too long for the limit is refused before anything is created.
    with pytest.raises(ValueError, match="shorten the --on-exit hook"):
        stage0_command(token=token, keys=keys, runner_sha256=RUNNER_SHA, port_env=PORT_ENV,
                       runner_args=["--on-exit", "echo " + secrets.token_hex(400)])


def test_stage0_command_validates_its_arguments() -> None:
    keys = new_channel_keys()
    with pytest.raises(ValueError, match="runner_sha256"):
        stage0_command(token="t", keys=keys, runner_sha256="abc", runner_args=[])
    with pytest.raises(ValueError, match="port_env"):
        stage0_command(token="t", keys=keys, runner_sha256=RUNNER_SHA, runner_args=[], port_env="A B")
    with pytest.raises(ValueError, match="python"):
        stage0_command(token="t", keys=keys, runner_sha256=RUNNER_SHA, runner_args=[], python="py; rm -rf /")
    with pytest.raises(ValueError, match="token"):
        stage0_command(token="a b", keys=keys, runner_sha256=RUNNER_SHA, runner_args=[])


def test_stage0_program_is_shipped_with_short_names_and_compiles_on_python_39() -> None:
    source = program_source()
    compile(source, "stage0", "exec")
    assert "def main(" in source and '"""' not in source  # no docstrings
    assert max(len(line) - len(line.lstrip(" ")) for line in source.splitlines()) <= 5  # one-space indents
    exe = _python("3.9")
    if exe is not None:
        out = subprocess.run([exe, "-c", "import sys; compile(sys.stdin.read(), 'stage0', 'exec')"], input=source,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------ run for real


def test_stage0_brings_up_the_runner_and_a_job_runs_over_the_pinned_channel(machine: Machine, tmp_path: Path) -> None:
    """Issue 8 items 1 and 2, for real: sh -c "<stage-0>" on a machine with no value of ours in its environment,
    the real runner.py pushed (hash-checked there), then a job over TLS pinned to the job's certificate: input
    upload, start, logs, metrics, manifest, and a download verified against the manifest's SHA-256."""
    keys = new_channel_keys()
    token = secrets.token_urlsafe(32)
    hook_file = tmp_path / "hook.txt"
    args = ["--idle-timeout", "120", "--retention", "120", "--on-exit", f'echo "$TRAINORCH_EXIT_REASON" > {hook_file}']
    proc = machine.start(_command(keys, token, args=args))
    job_code = ("import os, pathlib, sys\n"
                "data = pathlib.Path(os.environ['TRAINORCH_INPUT_DIR'], 'data.txt').read_text()\n"
                "print('read', len(data), 'bytes on Python %d.%d' % sys.version_info[:2])\n"
                "print('TRAINORCH_METRIC {\"step\": 1, \"loss\": 0.5}')\n"
                "pathlib.Path(os.environ['TRAINORCH_OUTPUT_DIR'], 'adapter.bin').write_text(data[::-1])\n")
    data = tmp_path / "data.txt"
    data.write_text("hello from the kernel " * 1000)
    dest = tmp_path / "artifacts" / "job1"

    async def drive() -> tuple[bytes, list[dict], dict]:
        async with runner_http_client(keys.cert_pem) as http:
            await push_runner(http, machine.url, token, RUNNER_SOURCE, timeout=60)
            client = RunnerClient(machine.url, token, http=http)
            health = await client.health()
            assert health["ok"] and "stage" not in health and health["state"] == "idle"
            argv = _cmdline(proc.pid).split(b"\0")
            assert any(a.endswith(b"/runner.py") for a in argv)  # stage-0 exec'd the runner: same pid
            assert max(map(len, argv)) < 500  # ... and the blob (token, key) left the process table
            assert (await client.upload_input("data.txt", data))["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
            await client.start(["python", "-c", job_code], max_runtime_s=60)
            log, offset = b"", 0
            while True:
                chunk = await client.read_logs(offset, wait=5)
                log, offset = log + chunk.data, chunk.next_offset
                if chunk.complete:
                    break
            metrics = (await client.read_metrics(0, wait=5)).metrics
            manifest = await client.manifest()
            assert manifest is not None
            await download_manifest(http, machine.url, headers=client.auth_headers(), manifest=manifest,
                                    dest_dir=dest, job_id="job1", metadata={})
            await client.shutdown()
            return log, metrics, manifest

    try:
        log, metrics, manifest = asyncio.run(drive())
    except BaseException:
        print(machine.output())
        raise
    assert b"read 22000 bytes" in log
    if _python("3.9"):
        assert b"on Python 3.9" in log  # python3 was a 3.8: stage-0 skipped it
    assert metrics == [{"step": 1, "loss": 0.5}]
    assert [f["path"] for f in manifest["files"]] == ["adapter.bin"]
    assert (dest / "adapter.bin").read_text() == data.read_text()[::-1]
    # The runner ends (shutdown request), and its dead-man hook runs.
    assert proc.wait(30) == 0, machine.output()
    assert wait_for(lambda: hook_file.exists() and hook_file.read_text().strip(), what="the hook") == "shutdown-request"
    # The key material is private on the machine; the token file was consumed.
    (job_dir,) = (machine.home / ".trainorch").iterdir()
    assert job_dir.name == "job-" + keys.fingerprint_sha256[:16]
    assert job_dir.stat().st_mode & 0o777 == 0o700
    assert (job_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    assert not (job_dir / "token").exists()
    assert token not in machine.output()


def test_stage0_refuses_a_wrong_hash_and_an_unauthenticated_push_and_keeps_waiting(machine: Machine) -> None:
    keys = new_channel_keys()
    token = secrets.token_urlsafe(32)
    machine.start(_command(keys, token))

    async def drive() -> None:
        async with runner_http_client(keys.cert_pem) as http:
            # A runner whose SHA-256 is not the one in the command: 400, and stage-0 keeps waiting.
            with pytest.raises(RunnerRefused, match=r"HTTP 400.*sha256 mismatch"):
                await push_runner(http, machine.url, token, RUNNER_SOURCE + b"\n# changed\n", timeout=60)
            for headers in ({}, {"Authorization": "Bearer " + secrets.token_urlsafe(32)}, {"Authorization": token}):
                r = await http.put(machine.url + "/v1/runner", content=RUNNER_SOURCE, headers=headers)
                assert r.status_code == 401, r.text
            with pytest.raises(RunnerRefused, match="401"):
                await push_runner(http, machine.url, "not-the-token", RUNNER_SOURCE, timeout=30)
            auth = {"Authorization": f"Bearer {token}"}
            r = await http.get(machine.url + "/v1/health", headers=auth)
            assert r.json() == {"ok": True, "stage": 0}
            assert (await http.get(machine.url + "/v1/nothing", headers=auth)).status_code == 404
            # The right runner is taken; pushing again finds it already up and returns at once.
            await push_runner(http, machine.url, token, RUNNER_SOURCE, timeout=60)
            await push_runner(http, machine.url, token, RUNNER_SOURCE, timeout=5)
            health = (await http.get(machine.url + "/v1/health", headers=auth)).json()
            assert health["ok"] and "stage" not in health
            await http.post(machine.url + "/v1/shutdown", headers=auth, json={})

    try:
        asyncio.run(drive())
    except BaseException:
        print(machine.output())
        raise
    assert machine.proc is not None and machine.proc.wait(30) == 0


def test_stage0_without_a_push_exits_after_its_idle_timeout_and_runs_the_hook(machine: Machine,
                                                                            tmp_path: Path) -> None:
    """The dead-man switch covers stage-0: no push within --idle-timeout -> it exits and runs --on-exit."""
    keys = new_channel_keys()
    hook_file = tmp_path / "hook.txt"
    args = ["--idle-timeout", "1", "--on-exit", f'echo "$TRAINORCH_EXIT_REASON" > {hook_file}']
    proc = machine.start(_command(keys, secrets.token_urlsafe(32), args=args))
    assert proc.wait(30) == 0, machine.output()
    assert hook_file.read_text().strip() == "idle-before-start"


def test_stage0_on_a_machine_without_python_39_runs_the_hook_and_exits_127(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "base64"):
        found = shutil.which(tool)
        assert found is not None
        _link(bin_dir, tool, found)
    py38 = _python("3.8")
    if py38:
        _link(bin_dir, "python3", py38)  # too old
    hook_file = tmp_path / "hook.txt"
    keys = new_channel_keys()
    cmd = _command(keys, secrets.token_urlsafe(32),
                   args=["--idle-timeout", "60", "--on-exit", f'echo "$TRAINORCH_EXIT_REASON" > {hook_file}'])
    out = subprocess.run(["/bin/sh", "-c", cmd], env={"HOME": str(tmp_path), "PATH": str(bin_dir)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 127, out.stderr
    assert "no Python 3.9+" in out.stderr
    assert hook_file.read_text().strip() == "no-python"


# ------------------------------------------------------------------------------------------ the wheel


def test_package_wheel_is_valid_cached_and_installs_offline(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wheel = package_wheel(cache)
    assert package_wheel(cache) == wheel  # built once per content
    assert re.fullmatch(r"trainorch_jupyter-\d+(\.\d+)*\+[0-9a-f]{12}-py3-none-any\.whl", wheel.name)
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = f"trainorch_jupyter-{version}.dist-info"
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        assert "Name: trainorch-jupyter" in metadata and f"Version: {version}" in metadata
        assert "Root-Is-Purelib: true" in zf.read(f"{dist_info}/WHEEL").decode()
        record = list(csv.reader(io.StringIO(zf.read(f"{dist_info}/RECORD").decode())))
        assert {row[0] for row in record} == set(names)
        for path, digest, size in record:
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = zf.read(path)
            assert int(size) == len(data)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert "trainorch_jupyter/runner.py" in names and "trainorch_jupyter/remote/stage0_program.py" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert zf.read("trainorch_jupyter/runner.py") == RUNNER_SOURCE
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                          "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    check = subprocess.run([sys.executable, "-c", "import trainorch_jupyter, trainorch_jupyter.remote; "
                            "print(trainorch_jupyter.__file__)"], capture_output=True, text=True, env=env,
                           cwd=str(tmp_path), timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(target))
    # Unpacked onto PYTHONPATH (no pip at all), the trainer's command line answers.
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    trainer = subprocess.run([sys.executable, "-m", "trainorch_jupyter.trainer", "--help"], capture_output=True,
                             text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert trainer.returncode == 0, trainer.stderr
    assert "usage" in trainer.stdout.lower()
