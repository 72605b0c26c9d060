"""The Vast.ai provider against the fake Vast (real HTTP on loopback, instances whose onstart really runs).

Every request the provider sends is validated against Vast's OpenAPI spec (with the notes' errata) by an httpx
event hook, and every answer of the fake by the fake itself; the canary key must never show in a URL or a body.
Each test ends with the fake billing no machine."""

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

from trainorch_jupyter.fakes import VastFake
from trainorch_jupyter.fakes.base import RateWindow, free_port
from trainorch_jupyter.fakes.vast import FakeMachine, VastSpecValidator
from trainorch_jupyter.model import CapacityError, Job, JobSpec, ProviderError, Resources, SpecError, new_job_id
from trainorch_jupyter.providers import Bootstrap, MachineHandle, MachineStatus, PollResult
from trainorch_jupyter.providers.runpod import PriceAboveMax, parse_tag
from trainorch_jupyter.providers.vast import (
    DEFAULT_IMAGE,
    VastProvider,
    deadman_code,
    deadman_env,
)
from trainorch_jupyter.providers.vast_api import (
    ENV_ENTRY_MAX,
    VastAPI,
    VastAuthError,
    VastNoCapacity,
    VastUnavailable,
    instance_create_body,
)

ROOT = Path(__file__).resolve().parent.parent
SPEC = Path(__file__).resolve().parent / "specs" / "vast-ai.openapi.yaml"
RUNNER = ROOT / "trainorch_jupyter" / "runner.py"
KEY = "vast_CANARY_key_5e0f9a1b2c3d4e"  # must never show outside the Authorization header
PY = sys.executable
FAST = {e: 0.0 for e in ("search", "create", "destroy", "show", "list", "manage", "user")}
# A stand-in for the stage-0: an HTTP server on the port Vast assigned (what the runner would serve).
SERVER = (f"{shlex.quote(PY)} -c " + shlex.quote(
    "import http.server as h, os\n"
    "class H(h.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b = ('instance ' + os.environ['CONTAINER_ID']).encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers()\n"
    "        self.wfile.write(b)\n"
    "    def log_message(self, *a): pass\n"
    "h.HTTPServer(('127.0.0.1', int(os.environ.get('VAST_TCP_PORT_70000') or os.environ['TJ_PORT'])), H)"
    ".serve_forever()\n"))


@dataclass(repr=False)
class StageBootstrap(Bootstrap):
    """A Bootstrap with the ``start_command`` the orchestrator's gives (there: ``remote.stage0_command``)."""

    command: str = "sleep 60"
    port_envs: list[str | None] = field(default_factory=list)

    def start_command(self, *, port_env: str | None = None) -> str:
        self.port_envs.append(port_env)
        return self.command.replace("@PORT@", str(self.port))


def bootstrap(job: Job, command: str = SERVER) -> StageBootstrap:
    return StageBootstrap(job_id=job.id, token="t0ken-" + "x" * 20, runner_source="", command=command)


def make_job(name: str = "tj", **resources: Any) -> Job:
    spec = JobSpec(name=name, provider="vast", command=("true",), resources=Resources(**resources))
    return Job(id=new_job_id(name), spec=spec, provider="vast")


@pytest.fixture(scope="module")
def validator() -> VastSpecValidator:
    assert SPEC.exists(), f"Vast's spec is missing at {SPEC}"
    return VastSpecValidator.cached(SPEC)


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

    def __init__(self, validator: VastSpecValidator, tmp_path: Path) -> None:
        self.validator = validator
        self.tmp_path = tmp_path
        self.fakes: list[VastFake] = []
        self.mismatches: list[tuple[str, list[str]]] = []
        self.sent: list[httpx.Request] = []
        self.clients: list[httpx.AsyncClient] = []

    def fake(self, **kw: Any) -> VastFake:
        opts: dict[str, Any] = {"api_keys": {KEY}, "provision_s": 0.05, "start_s": 0.05, "ports_delay_s": 0.05,
                                "kill_grace_s": 0.5, "rate_limits": [], "validator": self.validator,
                                "extra_env": {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}}
        opts.update(kw)
        fake = VastFake(**opts).start()
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

    def provider(self, fake: VastFake | None = None, **config: Any) -> VastProvider:
        cfg: dict[str, Any] = {"workspace_id": "ws1", "api_backoff_s": 0.01, "api_timeout_s": 5.0, "adopt_wait_s": 1.0,
                               "min_intervals": FAST, "poll_cache_s": 0.0}
        if fake is not None:
            cfg["base_url"] = fake.base_url
        cfg.update(config)
        return VastProvider(workspace=self.tmp_path, http=self.http(), **cfg)

    def creates(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.sent if r.method == "PUT" and "/asks/" in r.url.path]

    def searches(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.sent if r.url.path == "/api/v0/bundles/"]

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
def env(validator: VastSpecValidator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        memory_keyring: Any) -> Iterator[Env]:
    monkeypatch.setenv("VAST_API_KEY", KEY)
    monkeypatch.delenv("TRAINORCH_VAST_URL", raising=False)
    e = Env(validator, tmp_path)
    try:
        yield e
        e.check()
    finally:
        for fake in e.fakes:
            fake.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def until_status(provider: VastProvider, handle: MachineHandle, *statuses: MachineStatus,
                       timeout: float = 20.0) -> PollResult:
    async with asyncio.timeout(timeout):
        while True:
            result = await provider.poll(handle)
            if result.status in statuses:
                return result
            await asyncio.sleep(0.05)


async def http_get(url: str) -> str:
    async with httpx.AsyncClient() as c:
        for _ in range(100):
            try:
                return (await c.get(url, timeout=5.0)).text
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        raise AssertionError(f"nothing answers at {url}")


def _billing(fake: VastFake) -> int:
    return int(fake.state()["machines_billing"])


# --------------------------------------------------------------------------------------------
# validate and config: no network, nothing created
# --------------------------------------------------------------------------------------------


def test_validate_needs_the_key_and_sane_resources(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = env.fake()
    provider = env.provider(fake)
    for gpu in ("RTX 4090", "rtx4090", "A100-80GB", "H100 SXM", "RTX_3060"):
        provider.validate(make_job(gpu=gpu, region="us, CA").spec)
    for bad, where in (({"gpu": "RTX 4090; rm -rf"}, "resources.gpu"), ({"gpu_count": 16, "disk_gb": 4}, "disk_gb"),
                       ({"region": "US-KS-2"}, "resources.region"), ({"cloud": "secure"}, "resources.cloud"),
                       ({"image": "two words"}, "resources.image")):
        with pytest.raises(SpecError, match=where):
            provider.validate(make_job(**bad).spec)
    monkeypatch.delenv("VAST_API_KEY")
    with pytest.raises(SpecError, match="set VAST_API_KEY") as err:
        provider.validate(make_job().spec)
    assert "nothing was created" in str(err.value)

    async def launch_without_key() -> None:
        job = make_job(gpu="RTX 4090")
        with pytest.raises(VastAuthError, match="VAST_API_KEY"):
            await provider.launch(job, bootstrap(job))
        await env.aclose()

    run(launch_without_key())
    assert fake.ledger.requests() == [] and _billing(fake) == 0


def test_provider_config_is_checked(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match="unknown keys"):
        env.provider(imagee="x")
    with pytest.raises(SpecError, match="workspace_id"):
        env.provider(workspace_id="has-dash")
    with pytest.raises(SpecError, match="TRAINORCH_VAST_URL"):
        env.provider(base_url="http://console.example.com")  # plain http off loopback would send the key in clear
    with pytest.raises(SpecError, match="port"):
        env.provider(port=66000)
    monkeypatch.setenv("TRAINORCH_VAST_URL", "https://vast.example/")
    p = env.provider(provision_timeout_s=90)
    assert p.base_url == "https://vast.example" and p.provision_timeout_s == 90
    assert KEY not in repr(p)
    monkeypatch.delenv("TRAINORCH_VAST_URL")
    assert env.provider().base_url == "https://console.vast.ai"
    assert VastProvider.provision_timeout_s == 10 * 60 and VastProvider.remote is True and VastProvider.name == "vast"
    run(env.aclose())


def test_a_start_over_vasts_limits_is_refused_before_any_call(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        with pytest.raises(ProviderError, match=r"onstart \+ args are 4097 characters.*nothing was created"):
            await provider.launch(job, bootstrap(job, "x" * 4097))
        with pytest.raises(ProviderError, match="no start_command"):
            await provider.launch(job, object())  # type: ignore[arg-type]
        with pytest.raises(ProviderError, match="could not be made"):  # no channel keys: no stage-0
            await provider.launch(job, Bootstrap(job_id=job.id, token="t" * 32, runner_source=""))
        await env.aclose()

    run(go())
    with pytest.raises(ValueError, match="env entry A is 258 characters"):
        instance_create_body(image="i", disk_gb=10, label="l", env={"A": "v" * 256})
    with pytest.raises(ValueError, match="one non-empty word"):
        instance_create_body(image="i", disk_gb=10, label="l", env={"A": "two words"})
    entries = deadman_env("http://127.0.0.1:1234")
    assert all(len(f"{k}={v}") <= ENV_ENTRY_MAX for k, v in entries.items()) and len(entries) == 5
    assert fake.ledger.requests() == [] and _billing(fake) == 0


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
        [search] = env.searches()
        assert search["gpu_name"] == {"in": ["RTX 4090"]} and search["num_gpus"] == {"eq": 1}
        assert search["direct_port_count"] == {"gte": 1} and search["verified"] == {"eq": True}
        assert search["allocated_storage"] == 50.0 and search["cuda_max_good"] == {"gte": 12.8}
        assert search["order"] == [["dph_total", "asc"]] and "type" not in search  # on-demand
        [body] = env.creates()
        assert body["label"] == f"trainorch-ws1-{job.id}" and parse_tag(body["label"]) == ("ws1", job.id)
        assert body["image"] == DEFAULT_IMAGE and body["disk"] == 50.0 and body["runtype"] == "ssh"
        assert body["onstart"] == SERVER and "args" not in body and "price" not in body and body["cancel_unavail"]
        assert body["env"].endswith(f"-e TRAINORCH_VAST_URL={fake.base_url} -p 70000:70000")
        assert boot.port_envs == ["VAST_TCP_PORT_70000"]
        assert fake.state()["requests"][-1]["path"] == "/api/v0/asks/20002/"  # the cheapest fitting offer

        assert handle.provider == "vast" and int(handle.machine_id) in fake.instance_ids() and handle.runner_url is None
        assert handle.price_per_hour == pytest.approx(0.28 + 0.15 * 50 / 720, abs=1e-4) and handle.gpu == "RTX 4090"
        assert json.loads(json.dumps(handle.data)) == handle.data
        assert handle.data["job_id"] == job.id and handle.data["base_url"] == fake.base_url
        assert handle.data["ask_id"] == 20002 and handle.data["geolocation"] == "Quebec, CA"

        ready = await until_status(provider, handle, MachineStatus.READY)
        port = fake.port_of(int(handle.machine_id), 70000)
        assert ready.runner_url == f"https://127.0.0.1:{port}"
        assert await http_get(f"http://127.0.0.1:{port}/") == f"instance {handle.machine_id}"

        assert [h.machine_id for h in await provider.reconcile(job)] == [handle.machine_id]
        await provider.terminate(handle)
        assert _billing(fake) == 0
        await provider.terminate(handle)  # already gone: success
        gone = await provider.poll(handle)
        assert gone.status is MachineStatus.GONE and "no instance" in gone.detail
        assert await provider.reconcile(job) == []
        await env.aclose()

    run(go())
    assert [r["status"] for r in fake.ledger.requests() if r["method"] == "DELETE"] == [200, 404]
    assert _billing(fake) == 0


def test_a_low_port_is_reached_through_vasts_mapping(env: Env) -> None:
    fake = env.fake()
    port = free_port()
    job = make_job(gpu="RTX 4090")
    boot = bootstrap(job, "TJ_PORT=@PORT@ " + SERVER)

    async def go() -> None:
        provider = env.provider(fake, port=port)
        handle = await provider.launch(job, boot)
        assert env.creates()[0]["env"].endswith(f"-p {port}:{port}")
        assert boot.port_envs == [None]  # a copy of the bootstrap on that port made it (the list is shared), no port env
        ready = await until_status(provider, handle, MachineStatus.READY)
        public = fake.port_of(int(handle.machine_id), port)
        assert public != port and ready.runner_url == f"https://127.0.0.1:{public}"
        assert await http_get(f"http://127.0.0.1:{public}/") == f"instance {handle.machine_id}"
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    assert _billing(fake) == 0


def test_the_price_cap_picks_the_cheapest_fitting_offer(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="A100", max_price_per_hour=0.5)
        with pytest.raises(PriceAboveMax) as err:
            await provider.launch(job, bootstrap(job))
        text = str(err.value)
        assert "$0.61/h (A100 PCIE in Ontario, CA)" in text and "$0.50/h" in text and "nothing was created" in text
        job = make_job(gpu="A100-80GB")  # only the 80 GB card, though the 40 GB one is cheaper
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        assert handle.data["ask_id"] == 20007 and handle.data["vram_gb"] == 80.0
        await provider.terminate(handle)
        job = make_job(max_price_per_hour=0.2)  # no GPU named: the cheapest fitting (the unverified one is left out)
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        assert handle.gpu == "RTX 3090" and handle.price_per_hour < 0.2
        await provider.terminate(handle)
        job = make_job(gpu="RTX 4090", gpu_count=4)
        with pytest.raises(VastNoCapacity, match="no offer for RTX 4090 x4") as no:
            await provider.launch(job, bootstrap(job))
        assert isinstance(no.value, CapacityError)
        await env.aclose()

    run(go())
    assert len(env.creates()) == 2
    assert _billing(fake) == 0


def test_taken_offers_fall_over_to_the_next_and_then_fail_as_capacity(env: Env) -> None:
    fake = env.fake(faults={"capacity_errors": 1})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        assert handle.data["ask_id"] == 20003  # 20002 was taken meanwhile
        await provider.terminate(handle)
        fake.inject(capacity_errors={"count": 3, "status": 410})
        job = make_job(gpu="RTX 4090", region="US,CA")
        with pytest.raises(VastNoCapacity) as err:
            await env.provider(fake, max_offers_tried=2).launch(job, bootstrap(job))
        assert isinstance(err.value, CapacityError)
        assert "offer 20002" in str(err.value) and "offer 20003" in str(err.value) and "nothing is billed" in str(err.value)
        assert env.searches()[-1]["geolocation"] == {"in": ["US", "CA"]}
        await env.aclose()

    run(go())
    assert [r["status"] for r in fake.ledger.requests() if r["method"] == "PUT"] == [404, 200, 410, 410]
    assert _billing(fake) == 0


# --------------------------------------------------------------------------------------------
# a create that fails yet makes the instance
# --------------------------------------------------------------------------------------------


def test_a_failed_create_that_made_a_stopped_instance_destroys_it_and_goes_on(env: Env) -> None:
    fake = env.fake(faults={"fail_but_created": 1})

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        assert handle.data["ask_id"] == 20003 and fake.instance_ids() == [int(handle.machine_id)]
        await provider.terminate(handle)
        # one that is coming up after all is adopted
        fake.inject(fail_but_created={"count": 1, "status": 200, "state": "running"})
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job))
        assert handle.data["adopted"] is True and handle.data["ask_id"] == 20002
        assert (await until_status(provider, handle, MachineStatus.READY)).runner_url
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    gone = {m["id"]: m["gone_reason"] for m in fake.state()["machines"]}
    assert len(gone) == 3 and set(gone.values()) == {"destroyed"}
    assert _billing(fake) == 0


def test_an_interruptible_bid_below_the_minimum_leaves_nothing_billing(env: Env) -> None:
    cheap_floor = FakeMachine(30001, "RTX 4090", 1, 24564, 0.3, "Texas, US", min_bid=0.2)
    fake = env.fake(machines=[cheap_floor, FakeMachine(30002, "RTX 4090", 1, 24564, 0.4, "Texas, US", min_bid=0.25)])

    async def go() -> None:
        provider = env.provider(fake, interruptible=True, bid_margin=-0.5)  # bids half the minimum: Vast's trap
        job = make_job(gpu="RTX 4090")
        with pytest.raises(VastNoCapacity, match=r"the instance it made .* was destroyed"):
            await provider.launch(job, bootstrap(job))
        assert env.searches()[-1]["type"] == "bid" and [c["price"] for c in env.creates()] == [0.1, 0.125]
        provider = env.provider(fake, interruptible=True)
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        assert env.creates()[-1]["price"] == pytest.approx(0.22) and handle.data["bid_per_hour"] == pytest.approx(0.22)
        assert handle.price_per_hour == pytest.approx(0.22 + 0.15 * 50 / 720, abs=1e-4)
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    assert _billing(fake) == 0


def test_a_create_whose_answer_never_comes_is_adopted_by_label(env: Env) -> None:
    fake = env.fake(faults={"create_timeout": {"count": 1, "seconds": 3}})

    async def go() -> None:
        provider = env.provider(fake, create_timeout_s=0.5)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        assert handle.data["adopted"] is True and handle.data["label"] == provider.tag(job.id)
        await provider.terminate(handle)
        # a 5xx that made nothing: the label is looked for, nothing is there, the error goes up
        fake.inject(server_errors={"count": 1, "method": "PUT"})
        job = make_job(gpu="RTX 4090")
        with pytest.raises(VastUnavailable, match="may have been created") as err:
            await env.provider(fake, adopt_wait_s=0.2).launch(job, bootstrap(job))
        assert err.value.maybe_created and fake.instance_ids() == []
        await env.aclose()

    run(go())
    assert len(env.creates()) == 2  # never a second create for the same job
    assert _billing(fake) == 0


# --------------------------------------------------------------------------------------------
# every wait ends: bad starts, preemption; terminate failures; pacing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "said"), [
    ({"bad_start": {"count": 1, "status": "exited"}}, "exited (its container exited"),
    ({"bad_start": {"count": 1, "status": "offline"}}, "offline (its host went offline"),
    ({"bad_start": {"count": 1, "status": "oci"}}, "cannot start (Error response from daemon"),
    ({"preempt_after_running": {"count": 1, "seconds": 0.1, "mode": "stopped"}}, "stopped (an interruptible"),
    ({"preempt_after_running": {"count": 1, "seconds": 0.1, "mode": "unknown"}}, "unknown (Vast lost"),
    ({"preempt_after_running": {"count": 1, "seconds": 0.1, "mode": "vanish"}}, "no instance"),
])
def test_bad_states_end_the_wait_with_the_reason(env: Env, fault: dict[str, Any], said: str) -> None:
    fake = env.fake(faults=fault)

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        result = await until_status(provider, handle, MachineStatus.FAILED, MachineStatus.GONE)
        assert said in result.detail and handle.machine_id in result.detail, result.detail
        await provider.terminate(handle)  # a stopped, exited or lost instance still bills its disk: it must go
        await env.aclose()

    run(go())
    assert _billing(fake) == 0


def test_an_instance_billing_above_the_cap_fails_its_poll(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090", max_price_per_hour=0.3)
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        handle.data["max_price_per_hour"] = 0.2  # as if Vast billed more than its offer said
        result = await until_status(provider, handle, MachineStatus.FAILED)
        assert "above the max price $0.20/h" in result.detail
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    assert _billing(fake) == 0


def test_terminate_that_fails_is_retried_until_confirmed(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake, max_attempts=2)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        fake.inject(terminate_failures=3)  # 200 {"success": false}: Vast's way of failing
        with pytest.raises(VastUnavailable) as err:  # errors propagate: the orchestrator's reaper retries
            await provider.terminate(handle)
        assert err.value.retryable and _billing(fake) == 1
        await provider.terminate(handle)  # the third failure, then success, then a confirming null
        await env.aclose()

    run(go())
    assert [r["status"] for r in fake.ledger.requests() if r["method"] == "DELETE"] == [200] * 4
    assert _billing(fake) == 0


def test_polls_of_many_instances_share_one_list_call(env: Env) -> None:
    fake = env.fake(provision_s=3600.0)

    async def go() -> None:
        provider = env.provider(fake, poll_cache_s=30.0)
        jobs = [make_job(f"j{i}", gpu="RTX 4090") for i in range(3)]
        handles = [await provider.launch(j, bootstrap(j, "sleep 60")) for j in jobs]
        results = await asyncio.gather(*(provider.poll(h) for h in handles))
        assert all(r.status is MachineStatus.PROVISIONING for r in results)
        await asyncio.gather(*(provider.poll(h) for h in handles))
        for h in handles:
            await provider.terminate(h)
        await env.aclose()

    run(go())
    reads = [r["path"] for r in fake.ledger.requests() if r["method"] == "GET"]
    lists = [p for p in reads if p == "/api/v1/instances/"]
    assert len(lists) <= 3 and len(reads) - len(lists) == 3  # shows only to confirm each destroy
    assert _billing(fake) == 0


def test_429s_are_paced_and_backed_off_and_nothing_fails(env: Env) -> None:
    windows = {e: (RateWindow(e, 1, 0.15),) for e in ("search", "create", "destroy", "show", "list", "manage")}
    fake = env.fake(rate_limits=windows, faults={"rate_limit_burst": 3})

    async def go() -> None:
        provider = env.provider(fake, min_intervals={e: 0.3 for e in FAST})  # twice the fake's (a loaded machine)
        provider._pacer.backoff_s = 0.05
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job))
        await until_status(provider, handle, MachineStatus.READY)
        for _ in range(4):
            await provider.poll(handle)
        await provider.terminate(handle)
        assert provider._pacer.waited_s > 0 and provider._pacer.rate_limited == 3
        await env.aclose()

    run(go())
    statuses = [r["status"] for r in fake.ledger.requests()]
    assert statuses.count(429) == 3 and fake.ledger.rate_limit_violations() == []  # paced to the spacing
    assert _billing(fake) == 0


# --------------------------------------------------------------------------------------------
# the key, the dead-man switch, cleanup listing, offers
# --------------------------------------------------------------------------------------------


def test_the_key_never_leaks(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = env.fake()
    texts: list[str] = []

    async def go() -> None:
        provider = env.provider(fake, max_attempts=1)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        texts.extend([json.dumps(handle.data), repr(handle), repr(provider), repr(provider._client())])
        fake.inject(capacity_errors=5, terminate_failures=1)
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
    instance_key = "vik_"
    assert len(texts) == 9 and all(KEY not in t and instance_key not in t for t in texts)
    assert KEY not in caplog.text and instance_key not in caplog.text
    assert all(KEY not in json.dumps(body) for body in env.creates())
    assert _billing(fake) == 0


def test_the_dead_man_hook_destroys_its_own_instance_with_the_instance_key(env: Env) -> None:
    fake = env.fake()
    inline = VastProvider.self_destroy_hook(inline=True)
    short = VastProvider.self_destroy_hook()
    assert len(short) < 100 and "${TJDM0:?}" in short and len(inline) < 1000
    assert "CONTAINER_API_KEY" in deadman_code() and "TRAINORCH_VAST_URL" in deadman_code()

    async def go() -> None:
        provider = env.provider(fake)
        assert provider.on_exit_hook() == short
        # 1. the self-contained hook alone, as a machine's last act
        job = make_job(gpu="RTX 4090")
        await provider.launch(job, bootstrap(job, f"sleep 0.3; {inline}"))
        # 2. the real runner: no request before --idle-timeout, so it ends its life and runs its --on-exit hook
        job2 = make_job(gpu="RTX 4090")
        runner = (f"umask 077; printf %s secret-token-123456 > tok; exec {shlex.quote(PY)} {shlex.quote(str(RUNNER))} "
                  "--state-dir state --host 127.0.0.1 --port $VAST_TCP_PORT_70000 --token-file tok "
                  f"--idle-timeout 1 --retention 1 --on-exit {shlex.quote(provider.on_exit_hook())}")
        handle2 = await provider.launch(job2, bootstrap(job2, runner))
        async with asyncio.timeout(30):
            while _billing(fake):
                await asyncio.sleep(0.1)
        assert (await provider.poll(handle2)).status is MachineStatus.GONE
        await env.aclose()

    run(go())
    assert [m["gone_reason"] for m in fake.state()["machines"]] == ["destroyed by its own key (CONTAINER_API_KEY)"] * 2
    own = [r for r in fake.ledger.requests() if r["auth"] == "instance-key"]
    assert [(r["method"], r["status"]) for r in own] == [("DELETE", 200)] * 2


def test_the_real_stage0_comes_up_on_the_pinned_channel_and_its_idle_end_destroys_the_instance(env: Env) -> None:
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
        [body] = env.creates()
        assert boot.token not in body["env"] and len(body["onstart"]) <= 3500  # the stage-0 needs no env of ours
        ready = await until_status(provider, handle, MachineStatus.READY)
        assert ready.runner_url and ready.runner_url.startswith("https://127.0.0.1:")
        async with runner_http_client(boot.channel.cert_pem) as http:
            async with asyncio.timeout(20):
                while True:  # stage-0 may need a moment after Vast shows the port
                    try:
                        answer = await http.get(ready.runner_url + "/v1/health",
                                                headers={"Authorization": f"Bearer {boot.token}"})
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
        assert answer.status_code == 200 and answer.json() == {"ok": True, "stage": 0}
        async with asyncio.timeout(30):  # nobody pushes the runner: stage-0's idle end runs the dead-man hook
            while _billing(fake):
                await asyncio.sleep(0.1)
        await env.aclose()

    run(go())
    assert [m["gone_reason"] for m in fake.state()["machines"]] == ["destroyed by its own key (CONTAINER_API_KEY)"]


def test_reconcile_and_list_machines_find_instances_by_label(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        mine, theirs = env.provider(fake), env.provider(fake, workspace_id="ws2")
        job1, job2 = make_job("one", gpu="RTX 4090"), make_job("two", gpu="RTX A6000")
        h1 = await mine.launch(job1, bootstrap(job1, "sleep 60"))
        h2 = await theirs.launch(job2, bootstrap(job2, "sleep 60"))
        api = VastAPI(KEY, base_url=fake.base_url, http=env.http(), pacer=mine._pacer)
        stranger = await api.create_instance(20001, {"image": DEFAULT_IMAGE, "label": "not-ours"})
        assert [h.machine_id for h in await mine.reconcile(job1)] == [h1.machine_id]
        assert await mine.reconcile(job2) == []  # another workspace's tag
        found = {h.machine_id: h for h in await mine.list_machines()}
        assert set(found) == {h1.machine_id, h2.machine_id}  # not the instance this tool did not make
        a, b = found[h1.machine_id], found[h2.machine_id]
        assert (a.data["workspace_id"], a.data["job_id"], a.data["this_workspace"]) == ("ws1", job1.id, True)
        assert (b.data["workspace_id"], b.data["job_id"], b.data["this_workspace"]) == ("ws2", job2.id, False)
        assert b.gpu == "RTX A6000" and b.price_per_hour == pytest.approx(0.4 + 0.15 * 50 / 720, abs=1e-4)
        for h in found.values():
            await mine.terminate(h)
        await api.terminate_instance(stranger)
        await env.aclose()

    run(go())
    assert _billing(fake) == 0


def test_offers_come_from_the_offer_search(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        offers = await provider.offers(Resources(disk_gb=20))
        prices = [o.price_per_hour for o in offers]
        assert prices == sorted(prices) and all(o.provider == "vast" and o.available for o in offers)
        by = {o.data["ask_id"]: o for o in offers}
        assert 20005 not in by  # unverified, unreliable and slow: filtered out by default
        a = by[20002]
        assert (a.gpu, a.provider_gpu, a.gpu_count, a.vram_gb, a.region) == ("RTX4090", "RTX 4090", 1, 24.0, "Quebec, CA")
        assert a.price_per_hour == pytest.approx(0.28 + 0.15 * 20 / 720, abs=1e-4)  # the disk is in the hourly price
        assert a.data["country"] == "CA" and a.data["reliability"] == pytest.approx(0.992)
        assert a.data["inet_down_cost_per_gb"] == pytest.approx(0.002)
        assert by[20007].gpu == "A100-80GB" and by[20008].gpu == "A100-40GB"
        big = await provider.offers(Resources(gpu="A100-80GB"))
        assert [o.data["ask_id"] for o in big] == [20007]
        two = await provider.offers(Resources(gpu="rtx 4090", gpu_count=2, max_price_per_hour=1.0))
        assert [(o.gpu, o.gpu_count, o.data["ask_id"]) for o in two] == [("RTX4090", 2, 20004)]
        assert await provider.offers(Resources(gpu="H100", max_price_per_hour=1.0)) == []
        assert await provider.offers(Resources(gpu="Quadro Z9")) == []
        await env.aclose()

    run(go())
    assert all(r["path"] == "/api/v0/bundles/" for r in fake.ledger.requests())


def test_an_instance_is_only_reached_through_the_api_that_made_it(env: Env) -> None:
    fake, other = env.fake(), env.fake()

    async def go() -> None:
        provider = env.provider(fake)
        job = make_job(gpu="RTX 4090")
        handle = await provider.launch(job, bootstrap(job, "sleep 60"))
        elsewhere = env.provider(other)  # TRAINORCH_VAST_URL changed meanwhile: a null there is no proof
        for call in (elsewhere.poll(handle), elsewhere.terminate(handle)):
            with pytest.raises(ProviderError, match=f"TRAINORCH_VAST_URL={fake.base_url}") as err:
                await call
            assert err.value.retryable
        await provider.terminate(handle)
        await env.aclose()

    run(go())
    assert other.ledger.requests() == []
    assert _billing(fake) == 0


# --------------------------------------------------------------------------------------------
# packaging
# --------------------------------------------------------------------------------------------


def test_the_provider_is_an_entry_point() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["trainorch_jupyter.providers"].get("vast")
    assert target == "trainorch_jupyter.providers.vast:VastProvider", "pyproject.toml lacks the vast entry point"
