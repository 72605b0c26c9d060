"""The Lambda provider against the fake Lambda (real HTTP on loopback, instances whose user_data really runs, an SSH
server standing for each instance's port 22).

Every request the provider sends is validated against Lambda's OpenAPI spec by an httpx event hook, and every answer
of the fake by the fake itself (429 and 5xx, which Lambda answers but its spec does not list, are the only
mismatches allowed); the canary key must never show in a URL or a body, and nothing may touch the account-wide
firewall. Each test ends with the fake billing no machine."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shlex
import stat
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainorch_jupyter.fakes import LambdaFake
from trainorch_jupyter.fakes.base import OpenAPIValidator
from trainorch_jupyter.fakes.lambdacloud import RUNNER_PORT_ENV as FAKE_PORT_ENV
from trainorch_jupyter.model import CapacityError, Job, JobSpec, ProviderError, Resources, SpecError, new_job_id
from trainorch_jupyter.providers import Bootstrap, MachineHandle, MachineStatus, PollResult
from trainorch_jupyter.providers.lambda_api import (
    LAUNCH_INTERVAL_S,
    REQUEST_INTERVAL_S,
    LambdaAPI,
    LambdaAuthError,
    LambdaNoCapacity,
    LambdaQuotaExceeded,
    LambdaUnavailable,
    gpu_name_and_vram,
)
from trainorch_jupyter.providers.lambdacloud import (
    DEADMAN_HOOK,
    RUNNER_PORT_ENV,
    TAG_JOB,
    LambdaProvider,
    user_data_script,
)
from trainorch_jupyter.providers.runpod import PriceAboveMax

asyncssh = pytest.importorskip("asyncssh")

ROOT = Path(__file__).resolve().parent.parent
SPEC = Path(__file__).resolve().parent / "specs" / "lambda-cloud-v1.8.3.openapi.json"
RUNNER = ROOT / "trainorch_jupyter" / "runner.py"
KEY = "secret_CANARY_lambda_key_5e8dd0b1c2"  # must never show outside the Authorization header
PY = sys.executable
UNDOCUMENTED = {429, 500, 503}
FAST = {"request_interval_s": 0.0, "launch_interval_s": 0.0, "list_ttl_s": 0.0, "api_backoff_s": 0.01,
        "api_timeout_s": 5.0, "adopt_wait_s": 1.0, "terminate_wait_s": 5.0, "unhealthy_grace_s": 0.0,
        "ssh_timeout_s": 5.0}
# A stand-in for the stage-0: an HTTP server on the machine's 8765 (the port the fake maps it to). The stage-0
# command holds no single quote, so this one goes through a file.
SERVER = (f"{shlex.quote(PY)} -c " + shlex.quote(
    "import http.server as h, os\n"
    "class H(h.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b = ('vm ' + os.environ['HOME']).encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers()\n"
    "        self.wfile.write(b)\n"
    "    def log_message(self, *a): pass\n"
    f"h.HTTPServer(('127.0.0.1', int(os.environ['{RUNNER_PORT_ENV}'])), H).serve_forever()\n"))


@dataclass(repr=False)
class StageBootstrap(Bootstrap):
    """A Bootstrap with the ``start_command`` the orchestrator's gives (there: ``remote.stage0_command``)."""

    command: str = "sleep 60"
    port_envs: list[str | None] = field(default_factory=list)

    def start_command(self, *, port_env: str | None = None) -> str:
        self.port_envs.append(port_env)
        return self.command


def make_job(name: str = "tj", **resources: Any) -> Job:
    spec = JobSpec(name=name, provider="lambda", command=("true",), resources=Resources(**resources))
    return Job(id=new_job_id(name), spec=spec, provider="lambda")


@pytest.fixture(scope="module")
def validator() -> OpenAPIValidator:
    assert SPEC.exists(), f"Lambda's spec is missing at {SPEC}"
    return OpenAPIValidator.cached(SPEC)


@pytest.fixture
def memory_keyring() -> Iterator[Any]:
    keyring = pytest.importorskip("keyring")
    from tests.test_keys import MemoryKeyring

    old = keyring.get_keyring()
    kr = MemoryKeyring()
    keyring.set_keyring(kr)
    try:
        yield kr
    finally:
        keyring.set_keyring(old)


class Env:
    """Fakes and providers whose every request is checked against the spec and for the key."""

    def __init__(self, validator: OpenAPIValidator, tmp_path: Path) -> None:
        self.validator = validator
        self.tmp_path = tmp_path
        self.fakes: list[LambdaFake] = []
        self.mismatches: list[tuple[str, list[str]]] = []
        self.sent: list[httpx.Request] = []
        self.clients: list[httpx.AsyncClient] = []
        (tmp_path / "server.sh").write_text(SERVER + "\n")
        self.server = f"sh {tmp_path / 'server.sh'}"

    def fake(self, **kw: Any) -> LambdaFake:
        opts: dict[str, Any] = {"api_keys": {KEY}, "boot_s": 0.05, "terminate_s": 0.1, "kill_grace_s": 0.5,
                                "rate_limit": False, "validator": self.validator, "work_dir": self.tmp_path / "vms",
                                "extra_env": {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}}
        opts.update(kw)
        fake = LambdaFake(**opts).start()
        self.fakes.append(fake)
        return fake

    def http(self) -> httpx.AsyncClient:
        async def on_request(request: httpx.Request) -> None:
            self.sent.append(request)
            path = request.url.raw_path.decode().split("?")[0]
            if path.startswith("/_fake/"):
                return
            errors = self.validator.check_request(request.method, path, request.url.query.decode(),
                                                  dict(request.headers), request.content)
            if errors:
                self.mismatches.append((f"{request.method} {request.url.path}", errors))

        client = httpx.AsyncClient(event_hooks={"request": [on_request]})
        self.clients.append(client)
        return client

    def provider(self, fake: LambdaFake | None = None, **config: Any) -> LambdaProvider:
        cfg: dict[str, Any] = {"workspace_id": "ws1", **FAST}
        if fake is not None:
            cfg["base_url"] = fake.base_url
        cfg.update(config)
        return LambdaProvider(workspace=self.tmp_path / "ws", http=self.http(), **cfg)

    def bootstrap(self, job: Job, command: str | None = None) -> StageBootstrap:
        return StageBootstrap(job_id=job.id, token="t0ken-" + "x" * 20, runner_source="",
                              command=self.server if command is None else command)

    def launches(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.sent if r.url.path.endswith("/instance-operations/launch")]

    async def aclose(self, *providers: LambdaProvider) -> None:
        for p in providers:
            await p.aclose()
        for c in self.clients:
            await c.aclose()

    def check(self) -> None:
        for request in self.sent:
            assert KEY not in str(request.url) and KEY.encode() not in request.content
            if request.url.path.startswith("/_fake/"):
                assert "authorization" not in request.headers  # the fake's own endpoints get no key
            else:
                assert request.headers.get("authorization", "").startswith("Bearer ")
            assert "firewall" not in request.url.path  # the account-wide firewall is never touched
        assert self.mismatches == []
        for fake in self.fakes:
            if not fake.instance_ids():  # every VM gone: nothing of theirs may still run
                deadline = time.monotonic() + 10
                while fake.vm_pids() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert fake.vm_pids() == []
            assert fake.ledger.spec_mismatches("request") == [] and fake.ledger.spec_mismatches("fake-crash") == []
            for m in fake.ledger.spec_mismatches("response"):
                assert m["status"] in UNDOCUMENTED and all(e.startswith("ResponseNotFound") for e in m["errors"]), m
            assert KEY not in json.dumps(fake.state())
            assert fake.firewall_changes == 0


@pytest.fixture
def env(validator: OpenAPIValidator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        memory_keyring: Any) -> Iterator[Env]:
    monkeypatch.setenv("LAMBDA_API_KEY", KEY)
    monkeypatch.delenv("TRAINORCH_LAMBDA_URL", raising=False)
    e = Env(validator, tmp_path)
    try:
        yield e
        e.check()
    finally:
        for fake in e.fakes:
            fake.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def until_status(provider: LambdaProvider, handle: MachineHandle, *statuses: MachineStatus,
                       timeout: float = 20.0) -> PollResult:
    async with asyncio.timeout(timeout):
        while True:
            result = await provider.poll(handle)
            if result.status in statuses:
                return result
            await asyncio.sleep(0.05)


async def http_get(url: str) -> str:
    """GET through the tunnel (plain HTTP: the stand-in serves no TLS); the server may need a moment to start."""
    async with httpx.AsyncClient() as c:
        for _ in range(100):
            try:
                return (await c.get(url.replace("https://", "http://"), timeout=5.0)).text
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"nothing answered at {url}")


# --------------------------------------------------------------------------------------------
# validate and config: no network, nothing created
# --------------------------------------------------------------------------------------------


def test_validate_needs_the_key_and_knows_the_gpu_names(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = env.fake()
    provider = env.provider(fake)
    for gpu in ("A10", "a100", "A100-80GB", "H100", "GH200", "RTX 6000", "A100 (40 GB SXM4)", "gpu_1x_a10"):
        provider.validate(make_job(gpu=gpu).spec)
    provider.validate(make_job(gpu="H100", gpu_count=8, region="us-west-3", image="family:lambda-stack-24-04").spec)
    with pytest.raises(SpecError, match=r"resources.gpu: Lambda has no GPU called 'Quadro Z9'"):
        provider.validate(make_job(gpu="Quadro Z9").spec)
    for bad, where in (({"gpu_count": 3}, "resources.gpu_count"), ({"region": "mars-1"}, "resources.region"),
                       ({"image": "runpod/pytorch:2.8"}, "resources.image")):
        with pytest.raises(SpecError, match=where):
            provider.validate(make_job(gpu="A10", **bad).spec)
    with pytest.raises(SpecError, match="not container images"):
        provider.validate(make_job(image="nvcr.io/nvidia/pytorch:24.01").spec)
    assert gpu_name_and_vram("A100 (40 GB SXM4)") == ("A100", 40.0)
    assert gpu_name_and_vram("RTX 6000 (24 GB)") == ("RTX 6000", 24.0)

    monkeypatch.delenv("LAMBDA_API_KEY")
    with pytest.raises(SpecError, match="set LAMBDA_API_KEY") as err:
        provider.validate(make_job(gpu="A10").spec)
    assert "nothing was created" in str(err.value)

    async def launch_without_key() -> None:
        job = make_job(gpu="A10")
        with pytest.raises(LambdaAuthError, match="LAMBDA_API_KEY"):
            await provider.launch(job, env.bootstrap(job))
        await env.aclose()

    run(launch_without_key())
    assert fake.ledger.requests() == [] and fake.state()["machines_billing"] == 0


def test_provider_config_is_checked(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match="unknown keys"):
        env.provider(imagee="x")
    with pytest.raises(SpecError, match="workspace_id"):
        env.provider(workspace_id="has-dash")
    with pytest.raises(SpecError, match="TRAINORCH_LAMBDA_URL"):
        env.provider(base_url="http://api.example.com")  # plain http off loopback would send the key in clear
    with pytest.raises(SpecError, match="region"):
        env.provider(region="nowhere-1")
    monkeypatch.setenv("TRAINORCH_LAMBDA_URL", "https://lambda.example/api/v1/")
    p = env.provider(provision_timeout_s=90)
    assert p.base_url == "https://lambda.example" and p.provision_timeout_s == 90
    assert KEY not in repr(p)
    monkeypatch.delenv("TRAINORCH_LAMBDA_URL")
    assert env.provider().base_url == "https://cloud.lambda.ai"  # the spec's server (lambdalabs.com is deprecated)
    assert LambdaProvider.provision_timeout_s == 30 * 60 and LambdaProvider.remote
    # Lambda's documented limits are the default pacing: ~1 request/s, one launch per 12 s
    assert (REQUEST_INTERVAL_S, LAUNCH_INTERVAL_S) == (1.0, 12.0)
    default = LambdaProvider(workspace=env.tmp_path, http=env.http())
    assert (default._pacer.min_interval_s, default._launch_pacer.min_interval_s) == (1.0, 12.0)
    assert default.key_dir == env.tmp_path / ".trainorch" / "lambda-ssh"
    assert RUNNER_PORT_ENV == FAKE_PORT_ENV  # the provider and its fake agree on the stage-0's port variable
    run(env.aclose())


# --------------------------------------------------------------------------------------------
# launch, the tunnel, terminate
# --------------------------------------------------------------------------------------------


def test_launch_tunnel_ready_and_terminate_confirmed(env: Env) -> None:
    fake = env.fake()
    job = make_job(gpu="A10")
    boot = env.bootstrap(job)

    async def go() -> None:
        provider = env.provider(fake)
        handle = await provider.launch(job, boot)
        [body] = env.launches()
        name = f"trainorch-ws1-{job.id}"
        assert body["name"] == name and body["ssh_key_names"] == [name] and body["file_system_names"] == []
        assert body["tags"] == [{"key": "trainorch-workspace", "value": "ws1"}, {"key": TAG_JOB, "value": job.id}]
        assert (body["instance_type_name"], body["region_name"]) == ("gpu_1x_a10", "us-east-1")
        assert body["user_data"] == user_data_script(env.server, job.id)
        assert body["user_data"].startswith("#!/bin/sh\n") and "nohup sh -c '" in body["user_data"]
        assert "quantity" not in body and "image" not in body and boot.port_envs == [RUNNER_PORT_ENV]
        # the job's own key pair: the public half registered under the tag, the private half kept here (0600)
        assert fake.ssh_key_names() == [name]
        key_file = provider.key_dir / name
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(provider.key_dir.stat().st_mode) == 0o700

        assert handle.provider == "lambda" and handle.machine_id in fake.instance_ids() and handle.runner_url is None
        assert handle.price_per_hour == pytest.approx(0.75) and handle.gpu == "A10"
        assert json.loads(json.dumps(handle.data)) == handle.data  # JSON only, and no secret in it
        assert "PRIVATE" not in json.dumps(handle.data) and "jupyter" not in json.dumps(handle.data)
        assert handle.data["ssh_key_name"] == name and handle.data["runner_port"] == 8765

        ready = await until_status(provider, handle, MachineStatus.READY)
        assert ready.runner_url and ready.runner_url.startswith("https://127.0.0.1:")
        # the user_data really ran on the "machine", and the tunnel reaches its 8765
        assert await http_get(ready.runner_url) == f"vm {fake.instance_dir(handle.machine_id)}"
        assert (provider.key_dir / f"{name}.hostkey").read_text().startswith("ssh-ed25519 ")  # recorded at first use

        assert [h.machine_id for h in await provider.reconcile(job)] == [handle.machine_id]
        await provider.terminate(handle)
        assert fake.state()["machines_billing"] == 0
        assert fake.ssh_key_names() == [] and list(provider.key_dir.iterdir()) == []  # the key pair is gone too
        await provider.terminate(handle)  # already gone: success
        gone = await provider.poll(handle)
        assert gone.status is MachineStatus.GONE and "no instance" in gone.detail
        assert await provider.reconcile(job) == []
        await env.aclose(provider)

    run(go())
    terminates = [r["status"] for r in fake.ledger.requests() if r["path"].endswith("/terminate")]
    # The second terminate asks again (a read's 404 alone is not trusted for a machine that may be new) and takes
    # Lambda's object-does-not-exist as "already gone".
    assert terminates == [200, 404]
    assert fake.state()["machines_billing"] == 0


def test_the_tunnel_is_made_again_after_a_drop_and_a_kernel_restart_and_a_changed_host_key_is_refused(env: Env) -> None:
    fake = env.fake()
    job = make_job(gpu="A10")

    async def go() -> None:
        provider = env.provider(fake)
        handle = await provider.launch(job, env.bootstrap(job))
        url = (await until_status(provider, handle, MachineStatus.READY)).runner_url
        assert url is not None
        expected = f"vm {fake.instance_dir(handle.machine_id)}"
        assert await http_get(url) == expected
        # 1. the SSH connection drops: the next poll opens it again, on the same local port when it is free
        assert fake.drop_ssh(handle.machine_id) == 1
        async with asyncio.timeout(10):
            while True:  # once the client has seen its connection close, a poll makes it again
                again = await provider.poll(handle)
                if fake.ssh_state(handle.machine_id)["logins"] == 2:  # type: ignore[index]
                    break
                await asyncio.sleep(0.05)
        assert again.status is MachineStatus.READY and again.runner_url == url
        assert await http_get(url) == expected
        # 2. a new kernel (a new provider, same workspace): the key from the workspace, the recorded host key
        await provider.aclose()
        restarted = env.provider(fake)
        fresh = MachineHandle(provider="lambda", machine_id=handle.machine_id, data=dict(handle.data))
        moved = await until_status(restarted, fresh, MachineStatus.READY)
        assert moved.runner_url and await http_get(moved.runner_url) == expected
        assert fake.ssh_state(handle.machine_id)["logins"] == 3  # type: ignore[index]
        # 3. the machine presents another host key: refused, the machine counts as failed (and must go)
        await restarted.aclose()
        fake.change_host_key(handle.machine_id)
        third = env.provider(fake)
        refused = await third.poll(fresh)
        assert refused.status is MachineStatus.FAILED and "host key changed" in refused.detail
        await third.terminate(fresh)
        await env.aclose(third)

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_a_long_job_name_fits_lambdas_64_characters_and_is_found_by_its_tags(env: Env) -> None:
    fake = env.fake()
    job = make_job("a-very-long-job-name-that-goes-on-and-on", gpu="A10")  # 40 characters, the longest allowed

    async def go() -> None:
        provider = env.provider(fake, workspace_id="abcdef0123456789")
        name = provider.tag(job.id)
        assert len(f"trainorch-abcdef0123456789-{job.id}") > 64 and len(name) == 64
        assert name.startswith("trainorch-abcdef0123456789-a-very-long") and name == provider.tag(job.id)
        handle = await provider.launch(job, env.bootstrap(job, "sleep 60"))
        assert env.launches()[0]["name"] == name and handle.data["job_id"] == job.id
        [found] = await provider.reconcile(job)
        assert (found.data["workspace_id"], found.data["job_id"]) == ("abcdef0123456789", job.id)
        [listed] = await provider.list_machines()
        assert listed.data["job_id"] == job.id and listed.data["this_workspace"] is True
        await provider.terminate(listed)  # a listed machine is destroyed through its handle, its key too
        assert fake.ssh_key_names() == []
        await env.aclose(provider)

    run(go())
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# choosing, prices, capacity
# --------------------------------------------------------------------------------------------


def test_the_type_is_chosen_by_capacity_and_price_before_any_launch(env: Env) -> None:
    fake = env.fake(faults={"unavailable_types": ["gpu_1x_h100_pcie"]})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="A100", max_price_per_hour=1.0)
        with pytest.raises(PriceAboveMax) as err:
            await provider.launch(job, env.bootstrap(job))
        assert "$1.29/h" in str(err.value) and "$1.00/h" in str(err.value) and "nothing was created" in str(err.value)
        with pytest.raises(SpecError, match=r"A6000 \(48 GB\) machines have 1 or 2 GPUs, not 4"):
            job = make_job(gpu="A6000", gpu_count=4)
            await provider.launch(job, env.bootstrap(job))
        job = make_job(gpu="H100")  # no region has capacity: not even a launch is tried
        with pytest.raises(LambdaNoCapacity) as nocap:
            await provider.launch(job, env.bootstrap(job))
        assert isinstance(nocap.value, CapacityError) and "H100 (80 GB PCIe)" in str(nocap.value)
        assert "With capacity now: RTX 6000 (24 GB) (gpu_1x_rtx6000) $0.50/h" in str(nocap.value)
        job = make_job(gpu="A10", region="europe-central-1")
        with pytest.raises(LambdaNoCapacity, match=r"in europe-central-1 right now \(capacity now in us-east-1, us-west-1\)"):
            await provider.launch(job, env.bootstrap(job))
        # no GPU named: the cheapest type with capacity within the cap, in a region that has it
        job = make_job(max_price_per_hour=0.6)
        handle = await provider.launch(job, env.bootstrap(job, "sleep 60"))
        assert (handle.data["instance_type"], handle.data["region"]) == ("gpu_1x_rtx6000", "us-south-1")
        await provider.terminate(handle)
        # the region the spec names, and an offer's own description (what --provider auto passes)
        job = make_job(gpu="A10 (24 GB PCIe)", region="us-west-1")
        handle = await provider.launch(job, env.bootstrap(job, "sleep 60"))
        assert (handle.data["instance_type"], handle.data["region"]) == ("gpu_1x_a10", "us-west-1")
        await provider.terminate(handle)
        await env.aclose(provider)

    run(go())
    assert len(env.launches()) == 2
    assert fake.state()["machines_billing"] == 0 and fake.ssh_key_names() == []


def test_capacity_and_quota_errors_at_launch_name_what_to_change_and_leave_nothing(env: Env) -> None:
    fake = env.fake(faults={"capacity_errors": 1, "quota_errors": 1})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="A10")
        with pytest.raises(LambdaQuotaExceeded, match="quota") as quota:
            await provider.launch(job, env.bootstrap(job))
        assert isinstance(quota.value, CapacityError) and quota.value.code == "global/quota-exceeded"
        with pytest.raises(LambdaNoCapacity) as err:  # listed with capacity, yet the launch finds none
            await provider.launch(job, env.bootstrap(job))
        text = str(err.value)
        assert "no 1x A10 (24 GB PCIe) (gpu_1x_a10) free in us-east-1" in text and "no reservation" in text
        assert "RTX 6000 (24 GB) (gpu_1x_rtx6000) $0.50/h" in text and err.value.status == 400
        assert fake.ssh_key_names() == [] and list(provider.key_dir.iterdir()) == []  # the key went with it
        await env.aclose(provider)

    run(go())
    assert fake.state()["machines"] == []


# --------------------------------------------------------------------------------------------
# a launch that fails yet makes the instance
# --------------------------------------------------------------------------------------------


def test_a_launch_that_failed_but_made_the_instance_is_adopted(env: Env) -> None:
    fake = env.fake(faults={"fail_but_created": 1})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="A10")
        handle = await provider.launch(job, env.bootstrap(job))
        assert fake.instance_ids() == [handle.machine_id] and handle.data["adopted"] is True
        assert (await until_status(provider, handle, MachineStatus.READY)).runner_url
        await provider.terminate(handle)

        # an answer that never comes (the client times out): the instance is found and adopted too
        fake.inject(create_timeout={"count": 1, "seconds": 3})
        slow = env.provider(fake, launch_timeout_s=0.5)
        job = make_job(gpu="A10")
        handle = await slow.launch(job, env.bootstrap(job))
        assert handle.data["adopted"] is True and handle.data["name"] == slow.tag(job.id)
        await slow.terminate(handle)

        # a 5xx that made nothing: the name is looked for, nothing is there, the error goes up (and the key goes)
        fake.inject(server_errors={"count": 1, "method": "POST", "path": "/instance-operations/launch"})
        job = make_job(gpu="A10")
        calls = len(env.launches())
        with pytest.raises(LambdaUnavailable, match="may have been launched") as err:
            await provider.launch(job, env.bootstrap(job))
        assert err.value.maybe_created and len(env.launches()) == calls + 1  # looked for, never launched again
        assert fake.instance_ids() == [] and fake.ssh_key_names() == []
        await env.aclose(provider, slow)

    run(go())
    assert [r["status"] for r in fake.ledger.requests() if r["path"].endswith("/launch")] == [500, 200, 503]
    assert fake.state()["machines_billing"] == 0 and fake.ssh_key_names() == []


def test_a_failed_launch_with_nothing_made_cleans_its_key_and_reconcile_settles_the_rest(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="A10")
        api = LambdaAPI(KEY, base_url=fake.base_url, http=env.http(), request_interval_s=0, launch_interval_s=0)
        # an earlier try of this job left an instance and a key of the same name (its private half is lost)
        key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        await api.add_ssh_key(provider.tag(job.id), key)
        old = (await api.launch({"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10",
                                 "ssh_key_names": [provider.tag(job.id)], "name": provider.tag(job.id)}))[0]
        # reconcile finds it by name (the orchestrator destroys what it returns)
        [found] = await provider.reconcile(job)
        assert found.machine_id == old
        await provider.terminate(found)
        assert fake.ssh_key_names() == []  # the key named with the tag went with the instance
        # a new launch for the job replaces a stale key of its name
        await api.add_ssh_key(provider.tag(job.id), key)
        handle = await provider.launch(job, env.bootstrap(job, "sleep 60"))
        assert fake.ssh_key_names() == [provider.tag(job.id)]
        [registered] = await api.list_ssh_keys()
        assert registered.public_key != key
        await provider.terminate(handle)
        # reconcile with no instance left deletes a leftover key of the job
        await api.add_ssh_key(provider.tag(job.id), key)
        assert await provider.reconcile(job) == [] and fake.ssh_key_names() == []
        await env.aclose(provider)

    run(go())
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# preemption, unhealthy, terminate failures, rate limits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "status", "said"), [
    ("vanish", MachineStatus.GONE, "terminated, or Lambda took the machine back"),
    ("preempted", MachineStatus.GONE, "preempted"),
    ("unhealthy", MachineStatus.FAILED, "unhealthy"),
])
def test_preemption_and_unhealthy_end_the_wait_with_the_reason(env: Env, mode: str, status: MachineStatus,
                                                               said: str) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="A10")
        handle = await provider.launch(job, env.bootstrap(job))
        await until_status(provider, handle, MachineStatus.READY)
        assert fake.preempt(handle.machine_id, mode)
        result = await provider.poll(handle)
        assert result.status is status and said in result.detail and handle.machine_id in result.detail
        await provider.terminate(handle)  # an unhealthy instance still bills: it must go
        await env.aclose(provider)

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_unhealthy_is_waited_out_for_its_grace(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake, unhealthy_grace_s=0.5)
        job = make_job(gpu="A10")
        handle = await provider.launch(job, env.bootstrap(job))
        await until_status(provider, handle, MachineStatus.READY)
        fake.preempt(handle.machine_id, "unhealthy")
        first = await provider.poll(handle)
        assert first.status is MachineStatus.PROVISIONING and "waiting up to 0.5s" in first.detail
        assert (await until_status(provider, handle, MachineStatus.FAILED, timeout=5)).status is MachineStatus.FAILED
        await provider.terminate(handle)
        await env.aclose(provider)

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_terminate_that_fails_is_retried_until_confirmed(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake, max_attempts=2)
        job = make_job(gpu="A10")
        handle = await provider.launch(job, env.bootstrap(job, "sleep 60"))
        fake.inject(terminate_failures=3)
        with pytest.raises(LambdaUnavailable) as err:  # errors propagate: the orchestrator's reaper retries
            await provider.terminate(handle)
        assert err.value.retryable and fake.state()["machines_billing"] == 1
        assert fake.ssh_key_names() != []  # the key stays while the instance does
        await provider.terminate(handle)  # the third failure, then 200, then confirmed gone
        await env.aclose(provider)

    run(go())
    assert [r["status"] for r in fake.ledger.requests() if r["path"].endswith("/terminate")] == [500, 500, 500, 200]
    assert fake.state()["machines_billing"] == 0 and fake.ssh_key_names() == []


def test_requests_and_launches_are_paced_to_the_fakes_limits_and_429_bursts_pass(env: Env) -> None:
    # Lambda's limits scaled down 20x (the defaults are checked in test_provider_config_is_checked).
    fake = env.fake(rate_limit=True, request_rate=20.0, request_burst=2.0, launch_interval_s=0.6,
                    launch_slack_s=0.05, faults={"rate_limit_burst": 2})

    async def go() -> float:
        provider = env.provider(fake, request_interval_s=0.05, launch_interval_s=0.6, list_ttl_s=0.0)
        jobs = [make_job(gpu="A10") for _ in range(3)]
        started = time.monotonic()
        handles = await asyncio.gather(*(provider.launch(j, env.bootstrap(j, "sleep 60")) for j in jobs))
        took = time.monotonic() - started
        for h in handles:
            for _ in range(3):
                await provider.poll(h)
        for h in handles:
            await provider.terminate(h)
        assert provider._pacer.waited_s > 0 and provider._launch_pacer.waited_s > 0
        await env.aclose(provider)
        return took

    took = run(go())
    statuses = [r["status"] for r in fake.ledger.requests()]
    assert fake.ledger.rate_limit_violations() == []  # paced: never over the fake's limits
    assert statuses.count(429) == 2  # the injected burst, ridden out
    assert took >= 2 * 0.6  # three launches, one per 0.6 s
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# the key, the dead-man switch, cleanup listing, offers
# --------------------------------------------------------------------------------------------


def test_the_key_never_leaks(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = env.fake(faults={"fail_but_created": 1})
    texts: list[str] = []

    async def go() -> None:
        provider = env.provider(fake, max_attempts=1)
        job = make_job(gpu="A10")
        handle = await provider.launch(job, env.bootstrap(job))
        texts.extend([json.dumps(handle.data), repr(handle), repr(provider)])
        fake.inject(capacity_errors=1, terminate_failures=1)
        other = make_job(gpu="A10")
        for coro in (provider.launch(other, env.bootstrap(other)), provider.terminate(handle)):
            try:
                await coro
            except Exception as exc:
                texts.extend([str(exc), repr(exc)])
        texts.extend(json.dumps(h.data) for h in await provider.list_machines())
        await provider.terminate(handle)
        await env.aclose(provider)

    run(go())
    assert len(texts) == 8 and all(KEY not in t for t in texts)
    assert KEY not in caplog.text and KEY not in json.dumps(fake.state())
    assert fake.state()["machines_billing"] == 0


def test_the_real_stage0_comes_up_through_the_tunnel_and_its_idle_end_halts_the_vm_which_still_bills(env: Env) -> None:
    """The dead-man switch on Lambda: the stage-0 (then the runner) halts its VM with ``sudo -n shutdown -h now``
    when its life ends. Lambda has no stop, so the halted VM still bills until it is terminated: the provider reads
    it as failed and the orchestrator (or its reap list) terminates it."""
    from trainorch_jupyter.remote import new_channel_keys, runner_http_client

    fake = env.fake()
    source = RUNNER.read_text()

    async def go() -> None:
        provider = env.provider(fake)
        assert provider.on_exit_hook() == DEADMAN_HOOK == "sudo -n shutdown -h now"
        job = make_job(gpu="A10")
        boot = Bootstrap(job_id=job.id, token="tok-" + "k" * 40, runner_source=source, idle_timeout_s=2.0,
                         runner_sha256=hashlib.sha256(source.encode()).hexdigest(), channel=new_channel_keys(),
                         on_exit=provider.on_exit_hook())
        handle = await provider.launch(job, boot)
        [body] = env.launches()
        assert boot.token not in json.dumps({k: v for k, v in body.items() if k != "user_data"})
        ready = await until_status(provider, handle, MachineStatus.READY)
        assert ready.runner_url and ready.runner_url.startswith("https://127.0.0.1:")
        async with runner_http_client(boot.channel.cert_pem) as http:  # TLS pinned end to end, inside the tunnel
            async with asyncio.timeout(20):
                while True:
                    try:
                        answer = await http.get(ready.runner_url + "/v1/health",
                                                headers={"Authorization": f"Bearer {boot.token}"})
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
        assert answer.status_code == 200 and answer.json() == {"ok": True, "stage": 0}
        # nobody pushes the runner: stage-0's idle end runs the hook, which halts the VM ...
        failed = await until_status(provider, handle, MachineStatus.FAILED, timeout=30)
        assert "unhealthy" in failed.detail and fake.state()["instances"][0]["halted"]
        assert fake.state()["machines_billing"] == 1  # ... which still bills
        await provider.terminate(handle)
        await env.aclose(provider)

    run(go())
    assert [m["gone_reason"] for m in fake.state()["machines"]] == ["terminated"]
    assert fake.state()["machines_billing"] == 0


def test_reconcile_and_list_machines_find_instances_by_tag(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        mine, theirs = env.provider(fake), env.provider(fake, workspace_id="ws2")
        job1, job2 = make_job("one", gpu="A10"), make_job("two", gpu="A6000", gpu_count=2)
        h1 = await mine.launch(job1, env.bootstrap(job1, "sleep 60"))
        h2 = await theirs.launch(job2, env.bootstrap(job2, "sleep 60"))
        api = LambdaAPI(KEY, base_url=fake.base_url, http=env.http(), request_interval_s=0, launch_interval_s=0)
        pub = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        await api.add_ssh_key("someone-else", pub)
        [stranger] = await api.launch({"region_name": "us-west-1", "instance_type_name": "gpu_1x_a10",
                                       "ssh_key_names": ["someone-else"], "name": "not-ours"})

        assert [h.machine_id for h in await mine.reconcile(job1)] == [h1.machine_id]
        assert await mine.reconcile(job2) == []  # another workspace's tag
        found = {h.machine_id: h for h in await mine.list_machines()}
        assert set(found) == {h1.machine_id, h2.machine_id}  # not the instance this tool did not make
        a, b = found[h1.machine_id], found[h2.machine_id]
        assert (a.data["workspace_id"], a.data["job_id"], a.data["this_workspace"]) == ("ws1", job1.id, True)
        assert (b.data["workspace_id"], b.data["job_id"], b.data["this_workspace"]) == ("ws2", job2.id, False)
        assert a.price_per_hour == pytest.approx(0.75) and b.price_per_hour == pytest.approx(1.60)
        assert all(json.loads(json.dumps(h.data)) == h.data for h in found.values())
        for h in found.values():
            await mine.terminate(h)
        await api.terminate([stranger])
        assert fake.ssh_key_names() == ["someone-else"]  # never a key this tool did not make
        await env.aclose(mine, theirs)

    run(go())
    wait = time.monotonic() + 5
    while fake.state()["machines_billing"] and time.monotonic() < wait:
        time.sleep(0.05)
    assert fake.state()["machines_billing"] == 0


def test_offers_come_from_the_instance_types_with_capacity(env: Env) -> None:
    fake = env.fake(faults={"unavailable_types": ["gpu_1x_a100_sxm4"]})

    async def go() -> None:
        provider = env.provider(fake)
        offers = await provider.offers(Resources())
        by = {(o.data["instance_type"], o.region): o for o in offers}
        a10 = by[("gpu_1x_a10", "us-east-1")]
        assert (a10.gpu, a10.gpu_count, a10.price_per_hour, a10.vram_gb, a10.provider_gpu, a10.available) == (
            "A10", 1, 0.75, 24.0, "A10 (24 GB PCIe)", True)
        assert ("gpu_1x_a10", "us-west-1") in by  # one offer per region with capacity
        assert not by[("gpu_1x_a100_sxm4", None)].available and by[("gpu_1x_a100_sxm4", None)].gpu == "A100-40GB"
        assert all(o.gpu_count == 1 for o in offers)  # the machines with the GPUs asked for
        avail = [o.price_per_hour for o in offers if o.available]
        assert avail == sorted(avail) and not offers[-1].available
        eight = await provider.offers(Resources(gpu="A100-80GB", gpu_count=8))
        assert [(o.gpu, o.gpu_count, o.price_per_hour, o.region) for o in eight] == [("A100-80GB", 8, 14.32, "us-east-1")]
        cheap = await provider.offers(Resources(max_price_per_hour=0.8, region="us-west-1"))
        assert [(o.data["instance_type"], o.region, o.available) for o in cheap] == [
            ("gpu_1x_a10", "us-west-1", True), ("gpu_1x_a6000", "us-west-1", True),
            ("gpu_1x_rtx6000", "us-west-1", False)]  # in the fake only us-south-1 has RTX 6000s
        assert await provider.offers(Resources(gpu="Quadro Z9")) == []
        await env.aclose(provider)

    run(go())
    assert fake.ledger.requests() and all(r["path"] == "/api/v1/instance-types" for r in fake.ledger.requests())


def test_an_instance_is_only_reached_through_the_api_that_made_it(env: Env) -> None:
    fake, other = env.fake(), env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="A10")
        handle = await provider.launch(job, env.bootstrap(job, "sleep 60"))
        elsewhere = env.provider(other)  # TRAINORCH_LAMBDA_URL changed meanwhile: a 404 there is no proof
        for call in (elsewhere.poll(handle), elsewhere.terminate(handle)):
            with pytest.raises(ProviderError, match=f"TRAINORCH_LAMBDA_URL={fake.base_url}") as err:
                await call
            assert err.value.retryable
        assert fake.state()["machines_billing"] == 1
        await provider.terminate(handle)
        await env.aclose(provider)

    run(go())
    assert other.ledger.requests() == []
    assert fake.state()["machines_billing"] == 0


def test_a_bootstrap_without_a_start_command_creates_nothing(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        job = make_job(gpu="A10")
        with pytest.raises(ProviderError, match="start command could not be made"):
            await env.provider(fake).launch(job, Bootstrap(job_id=job.id, token="t" * 32, runner_source=""))

        class Old:  # no start_command at all
            job_id, token = job.id, "t" * 32

        with pytest.raises(ProviderError, match="no start_command"):
            await env.provider(fake).launch(job, Old())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="single quote"):
            user_data_script("echo 'x'", job.id)
        await env.aclose()

    run(go())
    assert fake.ledger.requests() == [] and fake.state()["machines_billing"] == 0


def test_the_provider_is_an_entry_point() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["trainorch_jupyter.providers"]["lambda"]
    module, _, attr = target.partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is LambdaProvider
