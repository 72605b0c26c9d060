"""The RunPod provider against the fake RunPod (real HTTP on loopback, pods whose start command really runs).

Every request the provider sends is validated against RunPod's OpenAPI spec by an httpx event hook, and every
answer of the fake by the fake itself; the canary key must never show in a URL or a body. Each test ends with
the fake billing no machine."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shlex
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainorch_jupyter.fakes import RunPodFake
from trainorch_jupyter.fakes.base import OpenAPIValidator, RateWindow
from trainorch_jupyter.model import CapacityError, Job, JobSpec, ProviderError, Resources, SpecError, new_job_id
from trainorch_jupyter.providers import Bootstrap, MachineHandle, MachineStatus, PollResult
from trainorch_jupyter.providers.runpod import (
    DEFAULT_IMAGE,
    PriceAboveMax,
    RunPodProvider,
    deadman_code,
    normalise_gpu,
    parse_tag,
)
from trainorch_jupyter.providers.runpod_api import RunPodAPI, RunPodAuthError, RunPodNoCapacity, RunPodUnavailable

ROOT = Path(__file__).resolve().parent.parent
SPEC = Path(__file__).resolve().parent / "specs" / "runpod-rest-v2.openapi.json"
RUNNER = ROOT / "trainorch_jupyter" / "runner.py"
KEY = "rpa_CANARY_runpod_key_7c1e55d0a9"  # must never show outside the Authorization header
GPU_4090 = "NVIDIA GeForce RTX 4090"
PY = sys.executable
# A stand-in for the stage-0: an HTTP server on the port RunPod maps (what the runner would serve).
SERVER = (f"{shlex.quote(PY)} -c " + shlex.quote(
    "import http.server as h, os\n"
    "class H(h.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b = ('pod ' + os.environ['RUNPOD_POD_ID']).encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers()\n"
    "        self.wfile.write(b)\n"
    "    def log_message(self, *a): pass\n"
    "h.HTTPServer(('127.0.0.1', int(os.environ['RUNPOD_TCP_PORT_8765'])), H).serve_forever()\n"))


@dataclass(repr=False)
class StageBootstrap(Bootstrap):
    """A Bootstrap with the ``start_command`` the orchestrator's gives (there: ``remote.stage0_command``)."""

    command: str = "sleep 60"
    port_envs: list[str | None] = field(default_factory=list)

    def start_command(self, *, port_env: str | None = None) -> str:
        self.port_envs.append(port_env)
        return self.command


def bootstrap(job: Job, command: str = SERVER) -> StageBootstrap:
    return StageBootstrap(job_id=job.id, token="t0ken-" + "x" * 20, runner_source="", command=command)


def make_job(name: str = "tj", **resources: Any) -> Job:
    spec = JobSpec(name=name, provider="runpod", command=("true",), resources=Resources(**resources))
    return Job(id=new_job_id(name), spec=spec, provider="runpod")


@pytest.fixture(scope="module")
def validator() -> OpenAPIValidator:
    assert SPEC.exists(), f"RunPod's spec is missing at {SPEC}"
    return OpenAPIValidator.cached(SPEC)


@pytest.fixture
def memory_keyring() -> Iterator[Any]:
    """An empty in-memory keyring for the test (so the machine's own keyring plays no part)."""
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
        self.fakes: list[RunPodFake] = []
        self.mismatches: list[tuple[str, list[str]]] = []
        self.sent: list[httpx.Request] = []
        self.clients: list[httpx.AsyncClient] = []

    def fake(self, **kw: Any) -> RunPodFake:
        opts: dict[str, Any] = {"api_keys": {KEY}, "provision_s": 0.05, "start_s": 0.05, "ports_delay_s": 0.05,
                                "kill_grace_s": 0.5, "rate_limits": [], "validator": self.validator,
                                "extra_env": {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}}
        opts.update(kw)
        fake = RunPodFake(**opts).start()
        self.fakes.append(fake)
        return fake

    def http(self) -> httpx.AsyncClient:
        async def on_request(request: httpx.Request) -> None:
            self.sent.append(request)
            errors = self.validator.check_request(request.method, request.url.raw_path.decode().split("?")[0],
                                                  request.url.query.decode(), dict(request.headers), request.content)
            if errors:
                self.mismatches.append((f"{request.method} {request.url.path}", errors))

        client = httpx.AsyncClient(event_hooks={"request": [on_request]})
        self.clients.append(client)
        return client

    def provider(self, fake: RunPodFake | None = None, **config: Any) -> RunPodProvider:
        cfg: dict[str, Any] = {"workspace_id": "ws1", "api_backoff_s": 0.01, "api_timeout_s": 5.0, "adopt_wait_s": 1.0}
        if fake is not None:
            cfg["base_url"] = fake.base_url
        cfg.update(config)
        return RunPodProvider(workspace=self.tmp_path, http=self.http(), **cfg)

    def posts(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.sent if r.method == "POST" and r.url.path == "/v2/pods"]

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()

    def check(self) -> None:
        for request in self.sent:
            assert KEY not in str(request.url) and KEY.encode() not in request.content
            assert request.headers.get("authorization", "").startswith("Bearer ")
        assert self.mismatches == []
        for fake in self.fakes:
            assert fake.ledger.spec_mismatches() == []
            assert KEY not in json.dumps(fake.state())


@pytest.fixture
def env(validator: OpenAPIValidator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        memory_keyring: Any) -> Iterator[Env]:
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.delenv("TRAINORCH_RUNPOD_URL", raising=False)
    e = Env(validator, tmp_path)
    try:
        yield e
        e.check()
    finally:
        for fake in e.fakes:
            fake.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def until_status(provider: RunPodProvider, handle: MachineHandle, *statuses: MachineStatus,
                       timeout: float = 20.0) -> PollResult:
    async with asyncio.timeout(timeout):
        while True:
            result = await provider.poll(handle)
            if result.status in statuses:
                return result
            await asyncio.sleep(0.05)


async def http_get(url: str) -> str:
    async with httpx.AsyncClient() as c:
        return (await c.get(url, timeout=5.0)).text


# --------------------------------------------------------------------------------------------
# validate: no network, nothing created
# --------------------------------------------------------------------------------------------


def test_validate_needs_the_key_and_knows_the_gpu_names(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = env.fake()
    provider = env.provider(fake)
    spec = make_job(gpu="RTX 4090").spec
    provider.validate(spec)
    for name in ("RTX 4090", "rtx4090", "NVIDIA GeForce RTX 4090", "rtx-4090", "4090", "GeForce RTX 4090"):
        assert provider._resolve_offline(name) == GPU_4090, name
    assert normalise_gpu("NVIDIA GeForce RTX 4090") == normalise_gpu(" rtx 4090 ") == "rtx4090"
    assert provider._resolve_offline("A100 80GB") == "NVIDIA A100 80GB PCIe"
    assert provider._resolve_offline("H100") == "NVIDIA H100 80GB HBM3"
    with pytest.raises(SpecError, match=r"resources.gpu: RunPod has no GPU called 'Quadro Z9'.*RTX 4090"):
        provider.validate(make_job(gpu="Quadro Z9").spec)
    for bad, where in (({"region": "nowhere"}, "resources.region"), ({"gpu_count": 9}, "resources.gpu_count"),
                       ({"image": "two words"}, "resources.image")):
        with pytest.raises(SpecError, match=where):
            provider.validate(make_job(gpu="RTX 4090", **bad).spec)
    provider.validate(make_job(gpu="RTX 4090", region="us-ks-2, EUR-IS-1", max_price_per_hour=1.0).spec)

    monkeypatch.delenv("RUNPOD_API_KEY")
    with pytest.raises(SpecError, match="set RUNPOD_API_KEY") as err:
        provider.validate(spec)
    assert "nothing was created" in str(err.value)

    async def launch_without_key() -> None:
        job = make_job(gpu="RTX 4090")
        with pytest.raises(RunPodAuthError, match="RUNPOD_API_KEY"):
            await provider.launch(job, bootstrap(job))
        await env.aclose()

    run(launch_without_key())
    assert fake.ledger.requests() == []  # nothing was asked of RunPod, so nothing was made
    assert fake.state()["machines_billing"] == 0


def test_provider_config_is_checked(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match="unknown keys"):
        env.provider(imagee="x")
    with pytest.raises(SpecError, match="workspace_id"):
        env.provider(workspace_id="has-dash")
    with pytest.raises(SpecError, match="TRAINORCH_RUNPOD_URL"):
        env.provider(base_url="http://api.example.com")  # plain http off loopback would send the key in clear
    with pytest.raises(SpecError, match="cloud"):
        env.provider(cloud="everywhere")
    monkeypatch.setenv("TRAINORCH_RUNPOD_URL", "https://runpod.example/")
    p = env.provider(provision_timeout_s=90)
    assert p.base_url == "https://runpod.example" and p.provision_timeout_s == 90
    assert env.provider(base_url=None).base_url == "https://runpod.example"
    assert KEY not in repr(p)
    monkeypatch.delenv("TRAINORCH_RUNPOD_URL")
    assert env.provider().base_url == "https://api.runpod.io"
    assert RunPodProvider.provision_timeout_s == 20 * 60
    run(env.aclose())


# --------------------------------------------------------------------------------------------
# launch, poll, terminate
# --------------------------------------------------------------------------------------------


def test_launch_poll_ready_and_terminate_confirmed(env: Env) -> None:
    fake = env.fake()
    job = make_job(gpu="rtx4090")
    boot = bootstrap(job)

    async def go() -> None:
        provider = env.provider(fake)
        handle = await provider.launch(job, boot)
        [body] = env.posts()
        assert body["name"] == f"trainorch-ws1-{job.id}" and parse_tag(body["name"]) == ("ws1", job.id)
        assert body["gpu"] == {"id": GPU_4090, "count": 1, "minCudaVersion": "12.8"}
        assert body["ports"] == ["8765/tcp"] and body["cloud"] == "SECURE" and body["disk"] == 50
        assert body["image"] == DEFAULT_IMAGE
        assert body["args"] == "bash -c " + shlex.quote(SERVER)
        # what the dead-man hook needs (its code, the API when not RunPod's own); never a key
        assert body["env"] == {"TRAINORCH_DEADMAN": deadman_code(fake.base_url), "TRAINORCH_RUNPOD_URL": fake.base_url}
        assert boot.port_envs == ["RUNPOD_TCP_PORT_8765"]

        assert handle.provider == "runpod" and handle.machine_id in fake.pod_ids() and handle.runner_url is None
        assert handle.price_per_hour == pytest.approx(0.69) and handle.gpu == "RTX 4090"
        assert json.loads(json.dumps(handle.data)) == handle.data  # JSON only
        assert handle.data["pod_id"] == handle.machine_id and handle.data["job_id"] == job.id
        assert handle.data["cloud"] == "SECURE" and handle.data["base_url"] == fake.base_url

        ready = await until_status(provider, handle, MachineStatus.READY)
        port = fake._pods[handle.machine_id].port_map[8765]
        assert ready.runner_url == f"https://127.0.0.1:{port}"
        # the start command really ran on the "machine", with RunPod's environment
        assert await http_get(f"http://127.0.0.1:{port}/") == f"pod {handle.machine_id}"

        assert [h.machine_id for h in await provider.reconcile(job)] == [handle.machine_id]
        await provider.terminate(handle)
        assert fake.state()["machines_billing"] == 0
        await provider.terminate(handle)  # already gone: success
        gone = await provider.poll(handle)
        assert gone.status is MachineStatus.GONE and "no pod" in gone.detail
        assert await provider.reconcile(job) == []
        await env.aclose()

    run(go())
    assert [r["status"] for r in fake.ledger.requests() if r["method"] == "DELETE"] == [204, 404]
    assert fake.state()["machines_billing"] == 0


def test_a_symmetric_port_above_70000_can_be_configured(env: Env) -> None:
    fake = env.fake()
    job = make_job(gpu="RTX 4090")
    boot = bootstrap(job, SERVER.replace("RUNPOD_TCP_PORT_8765", "RUNPOD_TCP_PORT_70000"))

    async def go() -> None:
        provider = env.provider(fake, port=70000)
        handle = await provider.launch(job, boot)
        assert env.posts()[0]["ports"] == ["70000/tcp"] and boot.port_envs == ["RUNPOD_TCP_PORT_70000"]
        ready = await until_status(provider, handle, MachineStatus.READY)
        port = fake._pods[handle.machine_id].port_map[70000]
        assert ready.runner_url == f"https://127.0.0.1:{port}"
        assert await http_get(f"http://127.0.0.1:{port}/") == f"pod {handle.machine_id}"
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_the_max_price_is_checked_against_the_catalog_before_create(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090", max_price_per_hour=0.5)
        with pytest.raises(PriceAboveMax) as err:
            await provider.launch(job, bootstrap(job))
        text = str(err.value)
        assert "$0.69/h" in text and "$0.50/h" in text and "--cloud community ($0.34/h)" in text
        assert "nothing was created" in text and not err.value.retryable

        # more GPUs than the cloud's machines have: a clear error, nothing created
        job = make_job(gpu="A100", gpu_count=8)
        provider_c = env.provider(fake, cloud="COMMUNITY")
        with pytest.raises(SpecError, match="at most 4 GPUs, not 8"):
            await provider_c.launch(job, bootstrap(job))

        # no GPU named: the cheapest one in stock within the cap
        job = make_job(max_price_per_hour=0.6)
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        assert env.posts()[-1]["gpu"]["id"] == "NVIDIA RTX A6000" and handle.price_per_hour == pytest.approx(0.49)
        await provider.terminate(handle)
        job = make_job(max_price_per_hour=0.3)
        with pytest.raises(CapacityError, match=r"no GPU in stock .* within \$0.30/h"):
            await provider.launch(job, bootstrap(job))

        # the catalog said $0.55/h but the pod bills $0.69/h: it is destroyed at once
        real = provider._catalog

        async def cheaper(api: Any, cloud: str, count: int) -> list[Any]:
            gpus = await real(api, cloud, count)
            for g in gpus:
                g.price_secure = 0.55 if g.id == GPU_4090 else g.price_secure
            return gpus

        provider._catalog = cheaper  # type: ignore[method-assign]
        job = make_job(gpu="RTX 4090", max_price_per_hour=0.6)
        with pytest.raises(PriceAboveMax, match=r"bills \$0.69/h, above the max price \$0.60/h; it was destroyed"):
            await provider.launch(job, bootstrap(job, "sleep 60"))
        assert fake.pod_ids() == []
        await env.aclose()

    run(go())
    assert len(env.posts()) == 2  # the affordable one, and the one that billed more than its list price
    assert fake.state()["machines_billing"] == 0


def test_capacity_errors_name_the_gpu_and_what_to_change(env: Env) -> None:
    fake = env.fake(faults={"capacity_errors": 1})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        with pytest.raises(RunPodNoCapacity) as err:
            await provider.launch(job, bootstrap(job))
        assert isinstance(err.value, CapacityError) and err.value.status == 400
        text = str(err.value)
        assert "no RTX 4090 x1 free on SECURE cloud" in text and "--cloud community" in text
        assert "in stock now RTX A6000 $0.49/h" in text
        # the catalog says there is no stock: not even a create is tried
        fake.inject(unavailable_gpus=[GPU_4090])
        provider._catalogs.clear()
        with pytest.raises(RunPodNoCapacity, match="no RTX 4090 x1 free"):
            await provider.launch(job, bootstrap(job))
        # a GPU not offered on that cloud at all
        job = make_job(gpu="H100 SXM")
        with pytest.raises(RunPodNoCapacity, match="does not offer H100 SXM on COMMUNITY cloud"):
            await env.provider(fake, cloud="community").launch(job, bootstrap(job))
        await env.aclose()

    run(go())
    assert len(env.posts()) == 1
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# a create that fails yet makes the pod
# --------------------------------------------------------------------------------------------


def test_a_create_that_failed_but_made_the_pod_is_adopted(env: Env) -> None:
    fake = env.fake(faults={"fail_but_created": 1})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job))
        assert fake.pod_ids() == [handle.machine_id] and handle.data["adopted"] is True
        assert (await until_status(provider, handle, MachineStatus.READY)).runner_url
        await provider.terminate(handle)

        # an answer that never comes (the client times out): the pod is found and adopted too
        fake.inject(create_timeout={"count": 1, "seconds": 3})
        slow = env.provider(fake, create_timeout_s=0.5)
        job = make_job(gpu="RTX 4090")
        handle = await slow.launch(job, bootstrap(job))
        assert handle.data["adopted"] is True and handle.data["name"] == slow.tag(job.id)
        await slow.terminate(handle)
        await env.aclose()

    run(go())
    assert len(env.posts()) == 2  # never a second create for the same job
    assert fake.state()["machines_billing"] == 0


def test_a_failed_create_destroys_what_it_cannot_adopt(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        # an earlier attempt left a pod with the same tag: the newer is adopted, the older destroyed
        api = RunPodAPI(KEY, base_url=fake.base_url, http=env.http())
        old = await api.create_pod({"name": provider.tag(job.id), "image": DEFAULT_IMAGE,
                                    "gpu": {"id": GPU_4090, "count": 1}, "args": "sleep 60"})
        await asyncio.sleep(1.1)  # createdAt has whole seconds
        fake.inject(fail_but_created=1)
        handle = await provider.launch(job, bootstrap(job))
        assert handle.machine_id != old.id and fake.pod_ids() == [handle.machine_id]
        await provider.terminate(handle)

        # a 5xx that made nothing: the name is looked for, nothing is there, the error goes up
        fake.inject(server_errors={"count": 1, "method": "POST"})
        job = make_job(gpu="RTX 4090")
        with pytest.raises(RunPodUnavailable, match="may have been created") as err:
            await provider.launch(job, bootstrap(job))
        assert err.value.maybe_created  # the orchestrator reconciles by tag again later
        assert fake.pod_ids() == []
        await env.aclose()

    run(go())
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# preemption, terminate failures, rate limits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "status", "said"), [
    ("vanish", MachineStatus.GONE, "preempted"),
    ("error", MachineStatus.FAILED, "in ERROR"),
    ("exited", MachineStatus.FAILED, "is EXITED"),
])
def test_preemption_mid_run_ends_the_wait_with_the_reason(env: Env, mode: str, status: MachineStatus,
                                                          said: str) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job))
        await until_status(provider, handle, MachineStatus.READY)
        assert fake.preempt(handle.machine_id, mode)
        result = await provider.poll(handle)
        assert result.status is status and said in result.detail and handle.machine_id in result.detail
        await provider.terminate(handle)  # an ERROR or EXITED pod still bills (its disk): it must go
        await env.aclose()

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_terminate_that_fails_is_retried_until_confirmed(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake, max_attempts=2)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        fake.inject(terminate_failures=3)
        with pytest.raises(RunPodUnavailable) as err:  # errors propagate: the orchestrator's reaper retries
            await provider.terminate(handle)
        assert err.value.retryable and fake.state()["machines_billing"] == 1
        await provider.terminate(handle)  # the third failure, then 204, then a confirming 404
        await env.aclose()

    run(go())
    assert [r["status"] for r in fake.ledger.requests() if r["method"] == "DELETE"] == [500, 500, 500, 204]
    assert fake.state()["machines_billing"] == 0


def test_429_bursts_are_paced_and_nothing_fails(env: Env) -> None:
    fake = env.fake(rate_limits=[RateWindow("second", 4, 1.0)], faults={"rate_limit_burst": 3})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job))
        await until_status(provider, handle, MachineStatus.READY)
        for _ in range(6):
            await provider.poll(handle)
        await provider.terminate(handle)
        assert provider._pacer.waited_s > 0
        await env.aclose()

    run(go())
    statuses = [r["status"] for r in fake.ledger.requests()]
    assert statuses.count(429) == 3 and fake.ledger.rate_limit_violations() == []  # paced to the window
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
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job))
        texts.extend([json.dumps(handle.data), repr(handle), repr(provider)])
        fake.inject(capacity_errors=1, terminate_failures=1)
        other = make_job(gpu="RTX 4090")
        for coro in (provider.launch(other, bootstrap(other)), provider.terminate(handle)):
            try:
                await coro
            except Exception as exc:
                texts.extend([str(exc), repr(exc)])
        texts.extend(json.dumps(h.data) for h in await provider.list_machines())
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    assert len(texts) == 8 and all(KEY not in t for t in texts)
    assert KEY not in caplog.text and KEY not in json.dumps(fake.state())
    assert all(KEY not in json.dumps(body) for body in env.posts())
    assert fake.state()["machines_billing"] == 0


def test_the_dead_man_hook_deletes_its_own_pod_with_the_pod_key(env: Env) -> None:
    fake = env.fake()
    inline = RunPodProvider.self_destroy_hook(fake.base_url, inline=True)
    assert "'" not in inline[len("python3 -c '"):-1] and len(inline) < 1000  # nests in one layer of quoting
    short = RunPodProvider.self_destroy_hook()
    assert short == 'python3 -c "${TRAINORCH_DEADMAN:?}"'  # the code rides in the pod's env

    async def go() -> list[str]:
        provider = env.provider(fake)
        assert provider.on_exit_hook() == short
        # 1. the self-contained hook alone, as a machine's last act
        job = make_job(gpu="RTX 4090")
        await provider.launch(job, bootstrap(job, f"sleep 0.3; {inline}"))
        # 2. the real runner: no request before --idle-timeout, so it ends its life and runs its --on-exit hook
        job2 = make_job(gpu="RTX 4090")
        runner = (f"umask 077; printf %s secret-token-123456 > tok; exec {shlex.quote(PY)} {shlex.quote(str(RUNNER))} "
                  "--state-dir state --host 127.0.0.1 --port $RUNPOD_TCP_PORT_8765 --token-file tok "
                  f"--idle-timeout 1 --retention 1 --on-exit {shlex.quote(provider.on_exit_hook())}")
        handle2 = await provider.launch(job2, bootstrap(job2, runner))
        async with asyncio.timeout(30):
            while fake.state()["machines_billing"]:
                await asyncio.sleep(0.1)
        gone = await provider.poll(handle2)
        assert gone.status is MachineStatus.GONE
        await env.aclose()
        return [m["gone_reason"] for m in fake.state()["machines"]]

    reasons = run(go())
    assert reasons == ["deleted by its pod-scoped key"] * 2
    pod_key_deletes = [r for r in fake.ledger.requests() if r["auth"] == "pod-key"]
    assert [(r["method"], r["status"]) for r in pod_key_deletes] == [("DELETE", 204)] * 2
    assert fake.state()["machines_billing"] == 0


def test_the_real_stage0_comes_up_on_the_pinned_channel_and_its_idle_end_destroys_the_pod(env: Env) -> None:
    from trainorch_jupyter.remote import new_channel_keys, runner_http_client

    fake = env.fake()
    source = RUNNER.read_text()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        boot = Bootstrap(job_id=job.id, token="tok-" + "k" * 40, runner_source=source, idle_timeout_s=3.0,
                         runner_sha256=hashlib.sha256(source.encode()).hexdigest(), channel=new_channel_keys(),
                         on_exit=provider.on_exit_hook())
        handle = await provider.launch(job, boot)
        [body] = env.posts()
        assert boot.token not in json.dumps(body["env"]) and len(body["args"]) < 3600
        ready = await until_status(provider, handle, MachineStatus.READY)
        assert ready.runner_url and ready.runner_url.startswith("https://127.0.0.1:")
        async with runner_http_client(boot.channel.cert_pem) as http:
            async with asyncio.timeout(20):
                while True:  # stage-0 may need a moment after RunPod shows the port
                    try:
                        answer = await http.get(ready.runner_url + "/v1/health",
                                                headers={"Authorization": f"Bearer {boot.token}"})
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
        assert answer.status_code == 200 and answer.json() == {"ok": True, "stage": 0}
        # nobody pushes the runner: stage-0's idle end runs the dead-man hook, which deletes the pod
        async with asyncio.timeout(30):
            while fake.state()["machines_billing"]:
                await asyncio.sleep(0.1)
        await env.aclose()

    run(go())
    assert [m["gone_reason"] for m in fake.state()["machines"]] == ["deleted by its pod-scoped key"]
    assert fake.state()["machines_billing"] == 0


def test_reconcile_and_list_machines_find_pods_by_tag(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        mine, theirs = env.provider(fake), env.provider(fake, workspace_id="ws2")
        job1, job2 = make_job("one", gpu="RTX 4090"), make_job("two", gpu="RTX A6000", gpu_count=2)
        h1 = await mine.launch(job1, bootstrap(job1, "sleep 60"))
        h2 = await theirs.launch(job2, bootstrap(job2, "sleep 60"))
        api = RunPodAPI(KEY, base_url=fake.base_url, http=env.http())
        stranger = await api.create_pod({"name": "not-ours", "image": DEFAULT_IMAGE, "gpu": {"id": GPU_4090}})

        assert [h.machine_id for h in await mine.reconcile(job1)] == [h1.machine_id]
        assert await mine.reconcile(job2) == []  # another workspace's tag
        found = {h.machine_id: h for h in await mine.list_machines()}
        assert set(found) == {h1.machine_id, h2.machine_id}  # not the pod this tool did not make
        a, b = found[h1.machine_id], found[h2.machine_id]
        assert (a.data["workspace_id"], a.data["job_id"], a.data["this_workspace"]) == ("ws1", job1.id, True)
        assert (b.data["workspace_id"], b.data["job_id"], b.data["this_workspace"]) == ("ws2", job2.id, False)
        assert a.price_per_hour == pytest.approx(0.69) and b.price_per_hour == pytest.approx(0.98)
        assert all(json.loads(json.dumps(h.data)) == h.data for h in found.values())
        for h in found.values():
            await mine.terminate(h)  # a listed machine is destroyed through its handle
        await api.terminate_pod(stranger.id)
        await env.aclose()

    run(go())
    assert parse_tag("trainorch-ab12-my-job-20260101-000000-abcdef") == ("ab12", "my-job-20260101-000000-abcdef")
    assert parse_tag("trainorch-x") is None and parse_tag("other-ab12-job") is None
    assert fake.state()["machines_billing"] == 0


def test_offers_come_from_the_gpu_catalog(env: Env) -> None:
    fake = env.fake(faults={"unavailable_gpus": ["NVIDIA A100 80GB PCIe"]})

    async def go() -> None:
        provider = env.provider(fake)
        offers = await provider.offers(Resources())
        by = {(o.gpu, o.data["cloud"]): o for o in offers}
        assert by[("RTX 4090", "SECURE")].price_per_hour == pytest.approx(0.69)
        assert by[("RTX 4090", "COMMUNITY")].price_per_hour == pytest.approx(0.34)
        assert by[("RTX 4090", "SECURE")].data["memory_gb"] == 24 and by[("RTX 4090", "SECURE")].available
        assert ("H100 SXM", "COMMUNITY") not in by  # not offered there
        assert not by[("A100 PCIe", "SECURE")].available and offers[-1].gpu == "A100 PCIe"  # out of stock: last
        assert [o.price_per_hour for o in offers if o.available] == sorted(o.price_per_hour for o in offers if o.available)
        two = await provider.offers(Resources(gpu="rtx 4090", gpu_count=2, max_price_per_hour=1.0))
        assert [(o.gpu, o.gpu_count, o.price_per_hour, o.data["cloud"]) for o in two] == [
            ("RTX 4090", 2, pytest.approx(0.68), "COMMUNITY")]
        assert await provider.offers(Resources(gpu="Quadro Z9")) == []
        await env.aclose()

    run(go())
    assert fake.ledger.requests() and all(r["path"].startswith("/v2/catalog/") for r in fake.ledger.requests())


def test_a_pod_is_only_reached_through_the_api_that_made_it(env: Env) -> None:
    fake, other = env.fake(), env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        elsewhere = env.provider(other)  # TRAINORCH_RUNPOD_URL changed meanwhile: a 404 there is no proof
        for call in (elsewhere.poll(handle), elsewhere.terminate(handle)):
            with pytest.raises(ProviderError, match=f"TRAINORCH_RUNPOD_URL={fake.base_url}") as err:
                await call
            assert err.value.retryable
        assert fake.state()["machines_billing"] == 1
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    assert other.ledger.requests() == []
    assert fake.state()["machines_billing"] == 0


def test_a_bootstrap_without_a_start_command_creates_nothing(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        job = make_job(gpu="RTX 4090")
        # a Bootstrap without channel keys cannot make a remote start command
        with pytest.raises(ProviderError, match="start command could not be made"):
            await env.provider(fake).launch(job, Bootstrap(job_id=job.id, token="t" * 32, runner_source=""))

        class Old:  # no start_command at all
            job_id, token = job.id, "t" * 32

        with pytest.raises(ProviderError, match="no start_command"):
            await env.provider(fake).launch(job, Old())  # type: ignore[arg-type]
        await env.aclose()

    run(go())
    assert fake.ledger.requests() == [] and fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# packaging and the notebook's options
# --------------------------------------------------------------------------------------------


def test_the_provider_is_an_entry_point() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["trainorch_jupyter.providers"]["runpod"]
    module, _, attr = target.partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is RunPodProvider
    assert "keyring>=24" in meta["project"]["optional-dependencies"]["keyring"]


def test_submit_options_map_to_the_resources() -> None:
    from dataclasses import fields

    from trainorch_jupyter.magics import _parse, spec_from_args

    args = _parse("submit", ["--provider", "runpod", "--gpu", "RTX 4090", "--gpus", "2", "--max-price", "1.5",
                             "--image", "my/image:1"])
    spec = spec_from_args(args, ["python", "x.py"])
    r = spec.resources
    assert (r.gpu, r.gpu_count, r.max_price_per_hour, r.image) == ("RTX 4090", 2, 1.5, "my/image:1")
    assert _parse("submit", ["--gpu-count", "3"]).gpu_count == 3  # the old spelling still works
    cloud_args = _parse("submit", ["--provider", "runpod", "--cloud", "COMMUNITY"])
    assert cloud_args.cloud == "community"
    if "cloud" in {f.name for f in fields(Resources)}:
        assert spec_from_args(cloud_args, ["true"]).resources.to_dict()["cloud"] == "COMMUNITY"
    else:  # until the model has resources.cloud: a clear error, not a silent default
        with pytest.raises(SpecError, match=r"resources\.cloud"):
            spec_from_args(cloud_args, ["true"])
