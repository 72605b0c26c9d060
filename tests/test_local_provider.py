"""The local provider with a real runner subprocess: what the job sees, the runner's life, nvidia-smi off the loop."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.runner_fixtures import PY
from trainorch_jupyter import _env
from trainorch_jupyter.model import SECRET_ENV_KEYS, Job, JobSpec
from trainorch_jupyter.providers import Bootstrap, MachineHandle, MachineStatus
from trainorch_jupyter.providers import local as local_mod
from trainorch_jupyter.providers.local import LocalProvider
from trainorch_jupyter.runner_client import RunnerClient


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make_job(name: str = "local") -> Job:
    return Job(id=f"{name}-{secrets.token_hex(4)}", spec=JobSpec(name=name, command=("true",)))


@asynccontextmanager
async def launched(workspace: Path, job: Job, **bootstrap: Any) -> AsyncIterator[tuple[LocalProvider, MachineHandle,
                                                                                     RunnerClient, str]]:
    token = secrets.token_urlsafe(24)
    async with httpx.AsyncClient() as http:
        provider = LocalProvider(workspace=workspace, http=http)
        handle = await provider.launch(job, Bootstrap(job_id=job.id, token=token, runner_source="", **bootstrap))
        try:
            async with RunnerClient(str(handle.runner_url), token) as client:
                yield provider, handle, client, token
        finally:
            await provider.terminate(handle)


async def run_job(client: RunnerClient, command: list[str], env: dict[str, str] | None = None) -> bytes:
    await client.start(command, env=env)
    deadline = time.monotonic() + 30
    while (await client.status())["state"] != "exited":
        assert time.monotonic() < deadline, "the command did not exit"
        await asyncio.sleep(0.05)
    out = bytearray()
    offset = 0
    while True:
        chunk = await client.read_logs(offset, wait=5)
        out += chunk.data
        offset = chunk.next_offset
        if chunk.complete:
            return bytes(out)


# ------------------------------------------------------------------------------------ secrets (issue 7.17, 7.15)

ENV_PROBE = r"""
import json, os, sys
try:
    with open(f'/proc/{os.getppid()}/environ', 'rb') as f:
        runner_env = f.read()
except OSError:
    runner_env = b''
print(json.dumps({'env': dict(os.environ), 'runner_env': runner_env.decode('utf-8', 'replace')}))
"""

CANARIES = {
    "CANARY_API_KEY": "canary-api-key-1",
    "MY_SERVICE_TOKEN": "canary-token-2",
    "DB_PASSWORD_PROD": "canary-password-3",
    "APP_SECRET": "canary-secret-4",
    "GCP_CREDENTIALS": "canary-credentials-5",
    "lowercase_api_key": "canary-lowercase-6",
    "RUNPOD_API_KEY": "canary-runpod-7",
    "TRAINORCH_WEBHOOK_URL": "https://hooks.example/canary-webhook-8",
}


def test_no_secret_of_the_kernel_reaches_the_job_nor_the_runner(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7.17: only three exact names were kept from the job; any other secret of the kernel's environment
    reached it. Issue 7.15: nor may the job find the runner's token (its env, /proc/<runner pid>/environ)."""
    for k, v in CANARIES.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HARMLESS_CANARY_SETTING", "harmless-canary-9")
    monkeypatch.delenv(_env.SECRET_ENV_PATTERNS_ENV, raising=False)

    async def main() -> tuple[dict[str, Any], str]:
        async with launched(tmp_path, make_job()) as (_, _, client, token):
            log = await run_job(client, [PY, "-c", ENV_PROBE], env={"HF_TOKEN": "explicit-spec-value"})
            return json.loads(log), token

    probe, token = run(main())
    env, runner_env = probe["env"], probe["runner_env"]
    for name, value in CANARIES.items():
        assert name not in env and value not in json.dumps(env), name
        assert value not in runner_env, name
    assert env["HARMLESS_CANARY_SETTING"] == "harmless-canary-9"  # not everything is dropped
    assert env["HF_TOKEN"] == "explicit-spec-value"  # what the spec sets explicitly is passed
    assert token not in json.dumps(env) and token not in runner_env
    if Path("/proc/self/environ").exists():
        assert "HARMLESS_CANARY_SETTING=harmless-canary-9" in runner_env  # the probe did read the runner's env
    assert not list((tmp_path / ".trainorch" / "machines").rglob("*token*"))  # the token file is gone


def test_secret_rule_patterns_and_configuration() -> None:
    assert SECRET_ENV_KEYS <= _env.SECRET_ENV_NAMES
    secret = ["OPENAI_API_KEY", "aws_secret_access_key", "GITHUB_TOKEN", "PGPASSWORD", "MY_PASSWORD_FILE",
              "CLIENT_SECRET", "GOOGLE_APPLICATION_CREDENTIALS", "TRAINORCH_WEBHOOK_URL", "TRAINORCH_RUNNER_TOKEN"]
    kept = ["PATH", "HOME", "HF_HOME", "KEYBOARD", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES",
            "TRAINORCH_SECRET_ENV_PATTERNS"]
    assert [n for n in secret if not _env.is_secret_env_name(n, _env.DEFAULT_SECRET_ENV_PATTERNS)] == []
    assert [n for n in kept if _env.is_secret_env_name(n, _env.DEFAULT_SECRET_ENV_PATTERNS)] == []
    # The patterns can be replaced; the provider keys, the webhook URL and the token stay out regardless.
    custom = _env.secret_env_patterns({_env.SECRET_ENV_PATTERNS_ENV: "*_CANARY, hf_*"})
    assert custom == ("*_CANARY", "HF_*")
    base = {"A_CANARY": "1", "HF_HOME": "2", "OPENAI_API_KEY": "3", "RUNPOD_API_KEY": "4", "PATH": "5",
            _env.SECRET_ENV_PATTERNS_ENV: "*_CANARY, hf_*"}
    assert _env.runner_environment(base) == {"OPENAI_API_KEY": "3", "PATH": "5",
                                             _env.SECRET_ENV_PATTERNS_ENV: "*_CANARY, hf_*"}
    assert _env.job_environment({"X_TOKEN": "k", "PATH": "p"}, {"X_TOKEN": "explicit"}) == {
        "X_TOKEN": "explicit", "PATH": "p"}


# ------------------------------------------------------------------------------------ the runner's life (issue 7.3)


def test_launch_passes_the_runner_life_and_the_hook(tmp_path: Path) -> None:
    """Bootstrap.retention_s / on_exit reach the runner: after the command exited and no request came for the
    retention time, the runner exits by itself and runs the hook; the state dir says why."""
    hook_out = tmp_path / "hook.txt"
    job = make_job()

    async def main() -> None:
        async with launched(tmp_path, job, idle_timeout_s=600.0, retention_s=1.0,
                            on_exit=f'echo "$TRAINORCH_EXIT_REASON" > {hook_out}') as (provider, handle, client, _):
            assert await run_job(client, ["true"]) == b""
            deadline = time.monotonic() + 60
            while (await provider.poll(handle)).status is not MachineStatus.GONE:
                assert time.monotonic() < deadline, "the runner did not end its life"
                await asyncio.sleep(0.1)

    run(main())
    state_dir = tmp_path / ".trainorch" / "machines" / job.id
    status = json.loads((state_dir / "status.json").read_text())
    assert status["state"] == "exited" and status["exit_code"] == 0
    assert status["runner_exit_reason"] == "retention-expired"
    assert hook_out.read_text() == "retention-expired\n"
    assert "retention-expired" in (state_dir / "runner.out").read_text()
    # Issue 7.15: what the provider makes is private too.
    for d in (tmp_path / ".trainorch" / "machines", state_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((state_dir / "runner.out").stat().st_mode) == 0o600


def test_bootstrap_keeps_secrets_out_of_its_repr() -> None:
    b = Bootstrap(job_id="j", token="tok-secret", runner_source="", on_exit="destroy --key-file /k")
    assert "tok-secret" not in repr(b) and "key-file" not in repr(b)
    assert b.runner_args() == ["--idle-timeout", "1800", "--retention", "1800", "--on-exit", "destroy --key-file /k"]


# ------------------------------------------------------------------------------------ nvidia-smi (issue 7.13)


def test_nvidia_smi_runs_off_the_event_loop_and_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_local_gpu()`` ran nvidia-smi (up to 5 s) on the orchestrator's loop. The fake nvidia-smi here answers
    only once a coroutine on the same loop lets it: with the loop blocked it gives up (no GPU name)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started, release, calls = tmp_path / "started", tmp_path / "release", tmp_path / "calls"
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"""#!/bin/sh
echo call >> {calls}
touch {started}
i=0
while [ $i -lt 40 ]; do
  if [ -e {release} ]; then echo "Fake GPU 9000"; exit 0; fi
  sleep 0.1; i=$((i+1))
done
exit 1
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    local_mod._local_gpu.cache_clear()

    async def releaser() -> None:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        release.touch()

    async def main() -> list[str | None]:
        gpus = []
        async with httpx.AsyncClient() as http:
            provider = LocalProvider(workspace=tmp_path, http=http)
            for _ in range(2):
                job = make_job()
                token = secrets.token_urlsafe(16)
                handle, _ = await asyncio.gather(
                    provider.launch(job, Bootstrap(job_id=job.id, token=token, runner_source="")), releaser())
                try:
                    gpus.append(handle.gpu)
                finally:
                    await provider.terminate(handle)
        return gpus

    try:
        assert run(main()) == ["Fake GPU 9000", "Fake GPU 9000"]
        assert calls.read_text().count("call") == 1  # cached for the process
    finally:
        local_mod._local_gpu.cache_clear()


def _runners_of(state_dir: Path) -> list[int]:
    """Pids of live processes whose command line names ``state_dir`` (a runner of it)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_bytes()
        except OSError:
            continue
        if str(state_dir).encode() in cmdline and state[state.rfind(b")") + 2:][:1] not in (b"Z", b"X"):
            out.append(int(entry.name))
    return out


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_a_launch_interrupted_before_the_runner_answers_leaves_no_process(tmp_path: Path) -> None:
    """A cancel (or the orchestrator closing) during the create: the started runner is not known to anyone
    yet (it has not written runner.json), so the launch itself must stop it."""
    job = make_job("interrupted")

    async def scenario() -> None:
        async with httpx.AsyncClient() as http:
            provider = LocalProvider(workspace=tmp_path, http=http)
            task = asyncio.create_task(provider.launch(job, Bootstrap(job_id=job.id, token="t" * 32,
                                                                      runner_source="")))
            state_dir = provider.state_dir(job.id)
            deadline = time.monotonic() + 10
            # The runner has read (and deleted) its token file: it runs and will serve.
            while time.monotonic() < deadline and not (
                    _runners_of(state_dir) and not list(state_dir.glob(".runner-token-*"))):
                await asyncio.sleep(0.002)
            assert _runners_of(state_dir), "the runner never started"
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(scenario())
    state_dir = tmp_path / ".trainorch" / "machines" / job.id
    deadline = time.monotonic() + 10
    while _runners_of(state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _runners_of(state_dir) == []
