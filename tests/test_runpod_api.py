"""The RunPod REST v2 client against the fake RunPod: calls, pacing, retries, error classes and key
hygiene. Every request the client sends is validated against RunPod's OpenAPI spec by an httpx event
hook, and every answer of the fake by the fake itself (openapi-core); a test fails on any mismatch."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from trainorch_jupyter.fakes import RunPodFake
from trainorch_jupyter.fakes.base import OpenAPIValidator, RateWindow, free_port
from trainorch_jupyter.model import CapacityError, ProviderError
from trainorch_jupyter.providers.runpod_api import (
    API_KEY_ENV,
    PacingTooLong,
    Pod,
    RateLimitPacer,
    RunPodAPI,
    RunPodAuthError,
    RunPodError,
    RunPodInsufficientBalance,
    RunPodInvalidRequest,
    RunPodNoCapacity,
    RunPodNotFound,
    RunPodRateLimited,
    RunPodUnavailable,
    pod_create_body,
)

SPEC = Path(__file__).resolve().parent / "specs" / "runpod-rest-v2.openapi.json"
KEY = "rp_canary_KEY_5f2c9a0e7d1b"  # a canary: must never show outside the Authorization header
GPU = "NVIDIA GeForce RTX 4090"
IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def validator() -> OpenAPIValidator:
    assert SPEC.exists(), f"RunPod's spec is missing at {SPEC}"
    return OpenAPIValidator.cached(SPEC)


class Env:
    """A fake RunPod plus clients whose every request is checked against the spec (and whose URLs and
    bodies are checked for the key)."""

    def __init__(self, validator: OpenAPIValidator) -> None:
        self.validator = validator
        self.fakes: list[RunPodFake] = []
        self.mismatches: list[tuple[str, list[str]]] = []
        self.sent: list[httpx.Request] = []
        self.allow_bad_requests = False

    def fake(self, **kw: Any) -> RunPodFake:
        opts: dict[str, Any] = {"api_keys": {KEY}, "provision_s": 0.05, "start_s": 0.05, "ports_delay_s": 0.05,
                                "kill_grace_s": 0.5, "rate_limits": [], "validator": self.validator}
        opts.update(kw)
        fake = RunPodFake(**opts).start()
        self.fakes.append(fake)
        return fake

    def api(self, fake: RunPodFake | None = None, *, base_url: str | None = None, key: str = KEY,
            **kw: Any) -> RunPodAPI:
        async def on_request(request: httpx.Request) -> None:
            self.sent.append(request)
            errors = self.validator.check_request(request.method, request.url.raw_path.decode().split("?")[0],
                                                  request.url.query.decode(), dict(request.headers), request.content)
            if errors:
                self.mismatches.append((f"{request.method} {request.url.path}", errors))

        http = httpx.AsyncClient(event_hooks={"request": [on_request]})
        opts: dict[str, Any] = {"backoff_s": 0.01, "timeout_s": 5.0}
        opts.update(kw)
        return RunPodAPI(key, base_url=base_url or (fake.base_url if fake else None), http=http, **opts)

    def check(self) -> None:
        for request in self.sent:
            assert KEY not in str(request.url) and KEY.encode() not in request.content
        for fake in self.fakes:
            assert fake.ledger.spec_mismatches("response") == []
            assert fake.ledger.spec_mismatches("fake-crash") == []
        if not self.allow_bad_requests:
            assert self.mismatches == []
            for fake in self.fakes:
                assert fake.ledger.spec_mismatches("request") == []


@pytest.fixture
def env(validator: OpenAPIValidator) -> Iterator[Env]:
    e = Env(validator)
    try:
        yield e
        e.check()
    finally:
        for fake in e.fakes:
            fake.stop()


def gpu_body(name: str = "tj-job-1", **kw: Any) -> dict[str, Any]:
    return pod_create_body(name=name, image=IMAGE, gpu_id=GPU, **kw)


def requests_to(fake: RunPodFake, method: str, path: str | None = None) -> list[dict[str, Any]]:
    return [r for r in fake.ledger.requests() if r["method"] == method and (path is None or r["path"] == path)]


async def until(fn: Callable[[], Coroutine[Any, Any, T | None]], timeout: float = 10.0) -> T:
    async with asyncio.timeout(timeout):
        while True:
            value = await fn()
            if value:
                return value
            await asyncio.sleep(0.05)


def test_create_poll_list_delete_round_trip(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        async with env.api(fake) as api:
            body = gpu_body(ports=["8765/tcp", "22/tcp"], env={"TJ_JOB": "j1"}, cloud="SECURE", disk_gb=20,
                            volume_gb=20, args="sleep 30")
            pod = await api.create_pod(body)
            assert pod.status == "PROVISIONING" and pod.name == "tj-job-1" and pod.gpu_id == GPU
            assert pod.cost_per_hr == pytest.approx(0.69) and pod.tcp_endpoint(8765) is None

            async def up() -> Pod | None:
                p = await api.get_pod(pod.id)
                return p if p.tcp_endpoint(8765) else None

            ready = await until(up)
            ip, port = ready.tcp_endpoint(8765)  # type: ignore[misc]
            assert ip == "127.0.0.1" and port == fake._pods[pod.id].port_map[8765]
            assert "j1" not in repr(ready)  # env stays out of the repr

            [found] = await api.list_pods(name="tj-job-1")
            assert found.id == pod.id
            assert await api.list_pods(name="tj-job-") == []
            assert [p.id for p in await api.list_pods(name_prefix="tj-job-")] == [pod.id]

            assert await api.delete_pod(pod.id) is True
            assert await api.delete_pod(pod.id) is False  # already gone is not an error
            assert await api.find_pod(pod.id) is None
            await api.terminate_pod(pod.id)  # idempotent
            with pytest.raises(RunPodNotFound, match=r"deleted .* or never existed"):
                await api.get_pod(pod.id)

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_the_key_goes_only_in_the_header(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = env.fake(api_keys={"another-key"})

    async def go() -> None:
        async with env.api(fake) as api:
            assert KEY not in repr(api) and KEY not in str(vars(api).get("base_url"))
            with pytest.raises(RunPodAuthError) as err:
                await api.list_pods()
            assert API_KEY_ENV in str(err.value) and KEY not in str(err.value) and err.value.status == 401
            assert KEY not in repr(err.value) and err.value.__cause__ is None

    run(go())
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in env.sent)
    assert KEY not in caplog.text and KEY not in str(fake.state())

    # A server echoing the key back in its error text: the exception shows it redacted.
    def echo(request: httpx.Request) -> httpx.Response:
        said = request.headers["authorization"]
        return httpx.Response(400, json={"title": "Bad Request", "status": 400, "detail": f"bad header {said}"},
                              headers={"content-type": "application/problem+json"})

    async def echoed() -> None:
        api = RunPodAPI(KEY, base_url="https://api.runpod.io", http=httpx.AsyncClient(transport=httpx.MockTransport(echo)))
        with pytest.raises(RunPodInvalidRequest) as err:
            await api.list_pods()
        assert KEY not in str(err.value) and "Bearer ***" in str(err.value)

    run(echoed())


def test_pacing_follows_the_ratelimit_headers_so_nothing_is_refused(env: Env) -> None:
    fake = env.fake(rate_limits=[RateWindow("second", 4, 1.0)])

    async def go() -> RunPodAPI:
        async with env.api(fake) as api:
            for _ in range(6):
                await api.list_pods()
            return api

    api = run(go())
    assert fake.ledger.rate_limit_violations() == []  # paced: RunPod never had to refuse
    assert [r["status"] for r in fake.ledger.requests()] == [200] * 6
    assert api.pacer.waited_s > 0


def test_429_bursts_are_waited_out(env: Env) -> None:
    fake = env.fake(faults={"rate_limit_burst": 1})

    async def go() -> None:
        async with env.api(fake) as api:
            pod = await api.create_pod(gpu_body(args="sleep 30"))  # even a create: a 429 did nothing
            assert await api.delete_pod(pod.id)

    run(go())
    assert [r["status"] for r in requests_to(fake, "POST")] == [429, 201]
    assert fake.state()["machines_billing"] == 0


def test_429_that_does_not_end_is_rate_limited(env: Env) -> None:
    fake = env.fake(faults={"rate_limit_burst": 5})

    async def go() -> None:
        async with env.api(fake, max_attempts=2) as api:
            with pytest.raises(RunPodRateLimited) as err:
                await api.list_pods()
            assert err.value.retry_after == 1 and err.value.retryable
            assert "fewer API calls" in str(err.value)

    run(go())
    assert len(requests_to(fake, "GET")) == 2


def test_5xx_and_cut_connections_are_retried_for_idempotent_calls(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        async with env.api(fake) as api:
            pod = await api.create_pod(gpu_body(args="sleep 30"))
            fake.inject(server_errors={"count": 2, "method": "GET"})
            assert (await api.get_pod(pod.id)).id == pod.id
            fake.inject(drop_connections={"count": 1, "method": "GET"})
            assert len(await api.list_pods()) == 1
            fake.inject(terminate_failures=3)  # DELETE answers 500 three times, then works
            assert await api.delete_pod(pod.id) is True

    run(go())
    assert [r["status"] for r in requests_to(fake, "GET")] == [503, 503, 200, 0, 200]
    assert [r["status"] for r in requests_to(fake, "DELETE")] == [500, 500, 500, 204]
    assert fake.state()["machines_billing"] == 0


def test_terminate_that_keeps_failing_raises_and_the_pod_still_bills(env: Env) -> None:
    fake = env.fake(faults={"terminate_failures": 3})

    async def go() -> None:
        async with env.api(fake, max_attempts=2) as api:
            pod = await api.create_pod(gpu_body(args="sleep 30"))
            with pytest.raises(RunPodUnavailable, match="after 2 tries") as err:
                await api.terminate_pod(pod.id)
            assert not err.value.maybe_created and err.value.status == 500
            assert fake.state()["machines_billing"] == 1
            await api.terminate_pod(pod.id)  # the third failure, then 204, then a confirming 404

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_a_create_is_never_retried_blindly(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        async with env.api(fake, create_timeout_s=0.5) as api:
            # 5xx after the pod was made: one POST, an error that says to reconcile by name
            fake.inject(fail_but_created=1)
            with pytest.raises(RunPodUnavailable) as err:
                await api.create_pod(gpu_body("tj-a"))
            assert err.value.maybe_created and "list pods named 'tj-a'" in str(err.value)
            # an answer that never comes
            fake.inject(create_timeout={"count": 1, "seconds": 3})
            with pytest.raises(RunPodUnavailable, match="timed out") as err:
                await api.create_pod(gpu_body("tj-b"))
            assert err.value.maybe_created
            # a connection cut after the request went out
            fake.inject(drop_connections={"count": 1, "method": "POST"})
            with pytest.raises(RunPodUnavailable) as err:
                await api.create_pod(gpu_body("tj-c"))
            assert err.value.maybe_created
            # a 5xx before anything was made: still one POST (the client cannot know)
            fake.inject(server_errors={"count": 1, "method": "POST"})
            with pytest.raises(RunPodUnavailable):
                await api.create_pod(gpu_body("tj-d"))
            # reconcile: what exists under those names is found and deleted
            made = [p for p in await api.list_pods(name_prefix="tj-")]
            assert sorted(p.name for p in made) == ["tj-a", "tj-b"]
            for p in made:
                await api.terminate_pod(p.id)

    run(go())
    assert len(requests_to(fake, "POST", "/v2/pods")) == 4  # one per create call, never a second
    assert fake.state()["machines_billing"] == 0


def test_a_connection_that_never_opened_is_retried_even_for_a_create(env: Env) -> None:
    closed = f"http://127.0.0.1:{free_port()}"

    async def go() -> None:
        async with env.api(base_url=closed, max_attempts=2) as api:
            with pytest.raises(RunPodUnavailable) as err:
                await api.create_pod(gpu_body())
            assert not err.value.maybe_created  # nothing was sent, so nothing was made
            assert "TRAINORCH_RUNPOD_URL" in str(err.value)

    run(go())
    assert len(env.sent) == 2


def test_errors_are_classified_with_what_to_change(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        async with env.api(fake) as api:
            fake.inject(capacity_errors=1)
            with pytest.raises(RunPodNoCapacity, match="another GPU type, cloud") as no_cap:
                await api.create_pod(gpu_body())
            assert isinstance(no_cap.value, CapacityError) and no_cap.value.status == 400
            fake.inject(insufficient_balance=1)
            with pytest.raises(RunPodInsufficientBalance, match="Add funds"):
                await api.create_pod(gpu_body())
            with pytest.raises(RunPodInvalidRequest, match="unknown GPU type"):
                await api.create_pod(pod_create_body(name="x", image=IMAGE, gpu_id="RTX 4090"))
            with pytest.raises(RunPodNotFound, match="no pod 'nope'"):
                await api.get_pod("nope")
            pod = await api.create_pod(gpu_body(args="sleep 30"))
            with pytest.raises(RunPodInvalidRequest, match="allowed 'actions'") as conflict:
                await api.pod_action(pod.id, "start")  # 409: not valid while PROVISIONING
            assert conflict.value.status == 409
            stopped = await api.pod_action(pod.id, "stop")
            assert stopped is not None and stopped.status == "EXITED" and stopped.bad
            assert await api.pod_action(pod.id, "terminate") is None
        # the pod-scoped key may not list pods: 403
        async with env.api(fake) as api:
            other = await api.create_pod(gpu_body(args="sleep 30"))
            pod_key = fake.scoped_key(other.id)
            assert pod_key
            async with env.api(fake, key=pod_key) as scoped:
                with pytest.raises(RunPodAuthError, match="lacks the permission") as denied:
                    await scoped.list_pods()
                assert denied.value.status == 403
                assert await scoped.delete_pod(other.id) is True  # but may delete its own pod

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_invalid_body_is_a_422_listing_the_fields(env: Env) -> None:
    env.allow_bad_requests = True  # the request breaks the spec on purpose
    fake = env.fake()

    async def go() -> None:
        async with env.api(fake) as api:
            body = gpu_body()
            body["gpuTypeIds"] = [GPU]  # a v1 field
            with pytest.raises(RunPodInvalidRequest) as err:
                await api.create_pod(body)
            assert err.value.status == 422 and err.value.errors == ["$: additional properties 'gpuTypeIds' not allowed"]
            assert "gpuTypeIds" in str(err.value) and "fail the same way" in str(err.value)

    run(go())
    assert [m for m, _ in env.mismatches] == ["POST /v2/pods"]  # the hook saw it too


def test_gpu_catalog(env: Env) -> None:
    fake = env.fake(faults={"unavailable_gpus": ["NVIDIA A100 80GB PCIe"]})

    async def go() -> None:
        async with env.api(fake) as api:
            gpus = {g.id: g for g in await api.list_gpu_types()}
            rtx = gpus[GPU]
            assert rtx.memory_gb == 24 and rtx.price("SECURE", 2) == pytest.approx(1.38) and rtx.availability is None
            assert not gpus["NVIDIA H100 80GB HBM3"].offered("COMMUNITY")
            stock = {g.id: g for g in await api.list_gpu_types(availability=True, cloud="SECURE", gpu_count=1)}
            assert stock[GPU].availability == "HIGH" and stock[GPU].data_centers
            assert stock["NVIDIA A100 80GB PCIe"].availability == "NONE"
            one = await api.get_gpu_type(GPU, availability=True)
            assert one.id == GPU and ("12.8", True) in one.cuda_versions
            with pytest.raises(RunPodNotFound):
                await api.get_gpu_type("NVIDIA Nope")
            with pytest.raises(ValueError):
                await api.list_gpu_types(cloud="SECURE")  # a filter needs availability=True

    run(go())


def test_pod_logs_and_preemption(env: Env) -> None:
    fake = env.fake()

    async def go() -> None:
        async with env.api(fake) as api:
            pod = await api.create_pod(gpu_body(args="sh -c 'echo hello-from-pod; sleep 30'"))

            async def said_hello() -> list[str] | None:
                lines = [x.line for x in await api.pod_logs(pod.id, source="container", quiet_s=0.2, max_s=2.0)]
                return lines if "hello-from-pod" in lines else None

            assert await until(said_hello) == ["hello-from-pod"]
            fake.preempt(pod.id)  # the provider takes the machine away
            assert await api.find_pod(pod.id) is None

    run(go())
    assert fake.state()["machines_billing"] == 0


def test_create_bodies_follow_the_spec(validator: OpenAPIValidator) -> None:
    bodies = [
        gpu_body(),
        gpu_body(gpu_count=2, cloud="COMMUNITY", disk_gb=50, volume_gb=20, ports=["8765/tcp", "22/tcp"],
                 env={"A": "1"}, args="bash -c 'echo hi'", data_center_ids=["EU-RO-1"],
                 allowed_cuda_versions=["12.8"], start_ssh=False),
        gpu_body(min_cuda_version="12.4"),
        pod_create_body(name="cpu", image=IMAGE, cpu_id="cpu3c", vcpu_count=4),
    ]
    for body in bodies:
        assert validator.check_request("POST", "/v2/pods", "", {"Authorization": "Bearer x",
                                                                 "Content-Type": "application/json"},
                                       json.dumps(body).encode()) == []
    for bad in ({"gpu_id": None}, {"gpu_count": 0}, {"env": {"A": 1}}, {"volume_gb": 5}, {"cloud": "ALL"},
                {"allowed_cuda_versions": ["12.8"], "min_cuda_version": "12.4"}):
        with pytest.raises(ValueError):
            pod_create_body(**{"name": "x", "image": IMAGE, "gpu_id": GPU, **bad})


def test_base_url_and_key_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("http://api.runpod.io", "https://user:pw@api.runpod.io", "https://api.runpod.io?api_key=x", "ftp://x"):
        with pytest.raises(ValueError, match="TRAINORCH_RUNPOD_URL"):
            RunPodAPI(KEY, base_url=url)
    assert RunPodAPI(KEY, base_url="http://127.0.0.1:9/").base_url == "http://127.0.0.1:9"
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(RunPodAuthError, match="set RUNPOD_API_KEY"):
        RunPodAPI.from_env()
    api = RunPodAPI.from_env({"RUNPOD_API_KEY": KEY, "TRAINORCH_RUNPOD_URL": "https://fake.example"})
    assert api.base_url == "https://fake.example" and KEY not in repr(api)
    assert RunPodAPI.from_env({"RUNPOD_API_KEY": KEY}).base_url == "https://api.runpod.io"
    assert issubclass(RunPodError, ProviderError)


def test_pacer_reads_windows_and_retry_after() -> None:
    now = [100.0]
    pacer = RateLimitPacer(clock=lambda: now[0])
    policy = '"minute";q=60;w=60, "hour";q=3000;w=3600'
    pacer.observe({"RateLimit": '"minute";r=30;t=40, "hour";r=2000;t=900', "RateLimit-Policy": policy}, 200)
    assert pacer.delay() <= 0  # plenty left
    pacer.observe({"RateLimit": '"minute";r=0;t=12, "hour";r=1999;t=899', "RateLimit-Policy": policy}, 200)
    assert pacer.delay() == pytest.approx(12)  # the minute window is empty: wait for its reset
    now[0] += 12
    assert pacer.delay() <= 0
    pacer.observe({"Retry-After": "7"}, 429)
    assert pacer.delay() == pytest.approx(7)
    now[0] += 7
    pacer.observe({"RateLimit": '"minute";r=5;t=50', "RateLimit-Policy": policy}, 200)  # nearly empty
    run(pacer.acquire())  # takes one of the 5 at once, then spreads the other 4 over 50 s
    assert pacer.delay() == pytest.approx(50 / 4)
    # an exhausted hour window is not slept through: the client says how long instead
    pacer.observe({"RateLimit": '"hour";r=0;t=1800', "RateLimit-Policy": policy}, 200)
    with pytest.raises(PacingTooLong) as err:
        run(pacer.acquire())
    assert err.value.wait_s == pytest.approx(1800)


def test_an_exhausted_long_window_fails_fast_with_the_wait(env: Env) -> None:
    fake = env.fake(rate_limits=[RateWindow("hour", 2, 3600)])

    async def go() -> None:
        async with env.api(fake) as api:
            await api.list_pods()
            await api.list_pods()
            with pytest.raises(RunPodRateLimited, match=r"only in 360\d s") as err:
                await api.list_pods()
            assert err.value.retry_after == pytest.approx(3600, abs=2)

    run(go())
    assert fake.ledger.rate_limit_violations() == []  # the third call was never sent


def test_no_key_ever_reaches_a_pod_from_the_host(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)  # the user's own key in the kernel's environment
    fake = env.fake()
    out = tmp_path / "env.txt"

    async def go() -> None:
        async with env.api(fake) as api:
            pod = await api.create_pod(gpu_body(args=f"{sys.executable} -c \"import os; open({str(out)!r}, 'w')"
                                                f".write(os.environ['RUNPOD_API_KEY'])\""))
            async def written() -> str | None:
                return out.read_text() if out.exists() else None

            await until(written)
            assert out.read_text() not in ("", KEY)  # the pod sees its own scoped key only
            await api.terminate_pod(pod.id)

    run(go())
