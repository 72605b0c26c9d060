"""The fake RunPod REST v2 API: spec shapes, auth, status progression, real start commands, rate
limits, faults and its bookkeeping. Every response it gives is validated against RunPod's OpenAPI
spec (``tests/specs/runpod-rest-v2.openapi.json``, a copy of ``../shared/providers/specs``) by
openapi-core; a test fails on any mismatch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainorch_jupyter.fakes import RunPodFake, make_fake
from trainorch_jupyter.fakes.base import OpenAPIValidator, RateWindow
from trainorch_jupyter.fakes.runpod import CAPACITY_DETAIL

SPEC = Path(__file__).resolve().parent / "specs" / "runpod-rest-v2.openapi.json"
KEY = "rp_test_account_key_0123456789"
GPU = "NVIDIA GeForce RTX 4090"
PY = sys.executable


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process of group ``pgid`` is left."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            return True
    return False


@pytest.fixture(scope="module")
def validator() -> OpenAPIValidator:
    assert SPEC.exists(), f"RunPod's spec is missing at {SPEC}"
    return OpenAPIValidator.cached(SPEC)


class Fakes:
    """Starts fakes with fast settings; on teardown checks every response against the spec."""

    def __init__(self, validator: OpenAPIValidator) -> None:
        self.validator = validator
        self.started: list[RunPodFake] = []
        self.allow_bad_requests = False

    def __call__(self, **kw: Any) -> RunPodFake:
        opts: dict[str, Any] = {"api_keys": {KEY}, "provision_s": 0.05, "start_s": 0.05, "ports_delay_s": 0.05,
                                "restart_delay_s": 0.1, "kill_grace_s": 0.5, "rate_limits": [], "validator": self.validator}
        opts.update(kw)
        fake = RunPodFake(**opts).start()
        self.started.append(fake)
        return fake

    def check(self) -> None:
        for fake in self.started:
            assert fake.ledger.spec_mismatches("response") == []
            assert fake.ledger.spec_mismatches("fake-crash") == []
            if not self.allow_bad_requests:
                assert fake.ledger.spec_mismatches("request") == []


@pytest.fixture
def fakes(validator: OpenAPIValidator) -> Iterator[Fakes]:
    f = Fakes(validator)
    try:
        yield f
        f.check()
    finally:
        for fake in f.started:
            fake.stop()


def client(fake: RunPodFake, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=fake.base_url, headers=headers, timeout=10.0)


def wait_status(c: httpx.Client, pod_id: str, status: str, *, ports: bool = False) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        pod = c.get(f"/v2/pods/{pod_id}").json()
        if pod["status"] != status:
            return None
        if ports and not (pod["runtime"] or {}).get("ports"):
            return None
        return pod
    return wait_for(ready, what=f"pod {pod_id} {status}")


def pod_body(name: str = "job-1", **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
                            "gpu": {"id": GPU, "count": 1}}
    body.update(kw)
    return body


SERVER_SCRIPT = textwrap.dedent("""
    import http.server, json, os, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    print("serving", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(os.environ["RUNPOD_TCP_PORT_8765"])), H).serve_forever()
""")


def test_pod_runs_its_start_command_with_runpods_environment(fakes: Fakes, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "host-canary-key-must-not-leak")
    fake = fakes(extra_env={"TJ_FROM_FAKE": "1", "RUNPOD_POD_ID": "overridden-by-runpod"})
    script = tmp_path / "serve.py"
    script.write_text(SERVER_SCRIPT)
    with client(fake) as c:
        r = c.post("/v2/pods", json=pod_body(ports=["8765/tcp", "8888/http"], env={"JOB_ID": "j-1"},
                                              args=f"bash -c '{PY} {script} extra-arg'"))
        assert r.status_code == 201, r.text
        pod = r.json()
        assert pod["status"] == "PROVISIONING" and pod["runtime"] is None and pod["ssh"]["direct"] is None
        assert pod["cost"] == pytest.approx(0.69) and pod["env"] == {"JOB_ID": "j-1"}
        assert "RateLimit-Policy" not in r.headers  # rate limits off: "omitted for rate-limit-exempt callers"
        seen = set()

        def running_with_ports() -> dict[str, Any] | None:
            p = c.get(f"/v2/pods/{pod['id']}").json()
            seen.add(p["status"])
            if p["status"] != "RUNNING":
                assert p["runtime"] is None  # the spec: null when the pod is not RUNNING
            return p if p["status"] == "RUNNING" and (p["runtime"] or {}).get("ports") else None

        running = wait_for(running_with_ports, what="RUNNING with ports")
        assert seen <= {"PROVISIONING", "STARTING", "RUNNING"}
        assert running["startedAt"] and running["dataCenterId"] and running["actions"] == ["stop", "restart", "terminate"]
        ports = {p["private"]: p for p in running["runtime"]["ports"]}
        assert ports[8765]["type"] == "tcp" and ports[8765]["ip"] == "127.0.0.1"
        assert ports[8888] == {"private": 8888, "public": None, "type": "http", "ip": None}
        public = ports[8765]["public"]

        info = wait_for(lambda: _try_get(f"http://127.0.0.1:{public}/"), what="the pod's server")
        env = info["env"]
        assert env["RUNPOD_POD_ID"] == pod["id"] and env["RUNPOD_PUBLIC_IP"] == "127.0.0.1"
        assert env["RUNPOD_TCP_PORT_8765"] == str(public) and "RUNPOD_TCP_PORT_8888" not in env
        assert env["JOB_ID"] == "j-1" and env["RUNPOD_GPU_COUNT"] == "1" and env["RUNPOD_DC_ID"]
        assert env["TJ_FROM_FAKE"] == "1" and env["HOME"] == info["cwd"]
        assert env["RUNPOD_API_KEY"] not in (KEY, "host-canary-key-must-not-leak")  # a pod-scoped key
        assert info["argv"][1:] == ["extra-arg"] and Path(info["cwd"]) == fake.pod_dir(pod["id"])

        listed = c.get("/v2/pods").json()["pods"]
        assert [p["id"] for p in listed] == [pod["id"]]
        assert c.get("/_fake/state").json()["machines_billing"] == 1

        pgid = fake.pod_process(pod["id"]).pid
        assert c.delete(f"/v2/pods/{pod['id']}").status_code == 204
        gone = c.get(f"/v2/pods/{pod['id']}")
        assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
        assert gone.json() == {"title": "Not Found", "status": 404, "detail": "pod not found"}
        assert c.get("/v2/pods").json() == {"pods": []}
        wait_for(lambda: not group_alive(pgid), what="the pod's processes to end")
        state = c.get("/_fake/state").json()
        assert state["machines_billing"] == 0 and state["billing"] == []
        assert state["machines"][0]["gone_reason"] == "deleted"


def _try_get(url: str) -> Any:
    try:
        return httpx.get(url, timeout=2.0).json()
    except httpx.HTTPError:
        return None


def test_auth_and_the_pod_scoped_key(fakes: Fakes, tmp_path: Path) -> None:
    fakes.allow_bad_requests = True  # a request without a key is outside the spec on purpose
    fake = fakes()
    with client(fake, key=None) as anon:
        r = anon.get("/v2/pods")
        assert r.status_code == 401 and r.json() == {"title": "Unauthorized", "status": 401,
                                                      "detail": "missing bearer token"}
        assert "RateLimit" not in r.headers  # only authenticated answers carry them
    with client(fake, key="wrong") as bad:
        assert bad.get("/v2/pods").status_code == 401
    # A pod that deletes itself with its own key, as the runner's dead-man switch will.
    script = tmp_path / "self_delete.py"
    script.write_text(textwrap.dedent("""
        import os, time, urllib.request
        base, pod, key = os.environ["FAKE_URL"], os.environ["RUNPOD_POD_ID"], os.environ["RUNPOD_API_KEY"]
        def call(method, path):
            req = urllib.request.Request(base + path, method=method, headers={"Authorization": "Bearer " + key})
            try:
                return urllib.request.urlopen(req).status
            except urllib.error.HTTPError as e:
                return e.code
        open("probe.txt", "w").write(f"{call('GET', '/v2/pods')} {call('GET', '/v2/pods/' + pod)}")
        os.replace("probe.txt", "probe.done")
        while not os.path.exists("go"):
            time.sleep(0.02)
        call("DELETE", "/v2/pods/" + pod)
        time.sleep(30)
    """))
    with client(fake) as c:
        other = c.post("/v2/pods", json=pod_body("other", args="sleep 30")).json()
        pod = c.post("/v2/pods", json=pod_body("self", env={"FAKE_URL": fake.base_url}, args=f"{PY} {script}")).json()
        probe = wait_for(lambda: _read(fake.pod_dir(pod["id"]) / "probe.done"), what="the pod's probe")
        assert probe == "403 403"  # the pod key may not list or read, even its own pod
        pod_key = fake.scoped_key(pod["id"])
        assert pod_key
        with client(fake, key=pod_key) as pk:
            assert pk.delete(f"/v2/pods/{other['id']}").status_code == 403
            assert pk.post(f"/v2/pods/{other['id']}/action", json={"action": "stop"}).status_code == 403
        (fake.pod_dir(pod["id"]) / "go").write_text("")
        wait_for(lambda: c.get(f"/v2/pods/{pod['id']}").status_code == 404, what="the self-delete")
        state = c.get("/_fake/state").json()
        assert {m["id"]: m["gone_reason"] for m in state["machines"]}[pod["id"]] == "deleted by its pod-scoped key"
        assert [m["id"] for m in state["billing"]] == [other["id"]]
        with client(fake, key=pod_key) as pk:
            assert pk.delete(f"/v2/pods/{pod['id']}").status_code == 401  # the key died with its pod
        assert c.delete(f"/v2/pods/{other['id']}").status_code == 204
        state_text = c.get("/_fake/state").text
        assert KEY not in state_text and pod_key not in state_text  # the bookkeeping never holds a key
        assert {r["auth"] for r in json.loads(state_text)["requests"]} == {"none", "account-key", "pod-key"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def test_create_checks_the_contract_like_runpod(fakes: Fakes) -> None:
    fakes.allow_bad_requests = True
    fake = fakes()
    with client(fake) as c:
        def create(body: Any) -> httpx.Response:
            return c.post("/v2/pods", json=body)

        r = create(pod_body(bogus=1, gpuTypeIds=[GPU]))  # v1 names are unknown fields in v2
        assert r.status_code == 422 and r.json()["detail"] == "Request validation failed."
        assert set(r.json()["errors"]) == {"$: additional properties 'bogus' not allowed",
                                           "$: additional properties 'gpuTypeIds' not allowed"}
        assert create({"image": "x", "gpu": {"id": GPU}}).json()["errors"] == ["$: missing property 'name'"]
        assert create(pod_body(env={"A": 1})).json()["errors"] == ["$.env.A: expected string"]
        assert create(pod_body(args=["sleep", "1"])).status_code == 422  # one string in v2, not an argv
        assert create(pod_body(cpu={"id": "cpu3c", "vcpuCount": 2})).status_code == 400  # gpu and cpu
        assert "unknown GPU type" in create(pod_body(gpu={"id": "RTX 4090"})).json()["detail"]
        assert create(pod_body(templateId="t1")).status_code == 404
        assert create(pod_body(ports=["8000/udp"])).status_code == 400
        r = create(pod_body(gpu={"id": GPU, "allowedCudaVersions": ["11.8"]}))  # no host has it
        assert r.status_code == 400 and r.json()["detail"] == CAPACITY_DETAIL
        r = create(pod_body(gpu={"id": "NVIDIA H100 80GB HBM3"}, cloud="COMMUNITY"))  # not offered there
        assert r.json()["detail"] == CAPACITY_DETAIL
        assert c.get("/_fake/state").json()["machines"] == []  # nothing was created, nothing bills


def test_status_progression_actions_and_exit_policy(fakes: Fakes) -> None:
    fake = fakes(on_exit="exited")
    with client(fake) as c:
        pod = c.post("/v2/pods", json=pod_body(ports=["22/tcp"], args="sleep 30")).json()
        running = wait_status(c, pod["id"], "RUNNING", ports=True)
        direct = running["ssh"]["direct"]
        assert direct["host"] == "127.0.0.1" and direct["username"] == "root"
        first_port = running["runtime"]["ports"][0]["public"]
        pgid = fake.pod_process(pod["id"]).pid

        r = c.post(f"/v2/pods/{pod['id']}/action", json={"action": "start"})
        assert r.status_code == 409 and "not valid for a pod in status RUNNING" in r.json()["detail"]
        stopped = c.post(f"/v2/pods/{pod['id']}/action", json={"action": "stop"}).json()
        assert stopped["status"] == "EXITED" and stopped["cost"] == 0.0 and stopped["runtime"] is None
        assert stopped["actions"] == ["start", "terminate"]
        wait_for(lambda: not group_alive(pgid), what="the stopped pod's processes to end")
        assert c.get("/_fake/state").json()["machines_billing"] == 1  # a stopped pod still bills its disk
        c.post(f"/v2/pods/{pod['id']}/action", json={"action": "start"})
        again = wait_status(c, pod["id"], "RUNNING", ports=True)
        assert again["runtime"]["ports"][0]["public"] and first_port  # mapped again after the start
        assert c.post(f"/v2/pods/{pod['id']}/action", json={"action": "terminate"}).status_code == 204

        # The main process ends: with on_exit="exited" the pod goes EXITED (and keeps billing).
        short = c.post("/v2/pods", json=pod_body("short", args="sh -c 'echo bye; exit 3'")).json()
        exited = wait_status(c, short["id"], "EXITED")
        assert exited["cost"] == 0.0
        pods = {p["id"]: p for p in c.get("/_fake/state").json()["pods"]}
        assert pods[short["id"]]["exit_codes"] == [3]
        assert c.delete(f"/v2/pods/{short['id']}").status_code == 204


def test_a_pod_whose_main_process_ends_is_restarted(fakes: Fakes) -> None:
    fake = fakes()  # on_exit="restart", as RunPod does
    with client(fake) as c:
        pod = c.post("/v2/pods", json=pod_body(args="sh -c 'echo run; exit 1'")).json()
        wait_for(lambda: next(p for p in c.get("/_fake/state").json()["pods"])["restarts"] >= 2, what="restarts")
        assert c.get(f"/v2/pods/{pod['id']}").json()["status"] in ("STARTING", "RUNNING")
        assert c.get("/_fake/state").json()["machines_billing"] == 1  # restarting forever, billing forever
        c.delete(f"/v2/pods/{pod['id']}")


def test_list_ignores_query_parameters_and_has_no_paging(fakes: Fakes) -> None:
    fake = fakes()
    with client(fake) as c:
        ids = {c.post("/v2/pods", json=pod_body(f"p{i}", args="sleep 30")).json()["id"] for i in range(3)}
        r = c.get("/v2/pods", params={"name": "p0", "includeClusterPods": "false"})
        assert set(r.json()) == {"pods"} and {p["id"] for p in r.json()["pods"]} == ids
        for pod_id in ids:
            assert c.delete(f"/v2/pods/{pod_id}").status_code == 204


def test_rate_limits_answer_429_and_are_recorded(fakes: Fakes) -> None:
    fake = fakes(rate_limits=[RateWindow("burst", 3, 30.0)])  # long: no flake on a slow machine
    with client(fake) as c:
        answers = [c.get("/v2/pods") for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["RateLimit-Policy"] == '"burst";q=3;w=30'
        assert answers[2].headers["RateLimit"].startswith('"burst";r=0;t=')
        limited = answers[3]
        assert limited.json() == {"title": "Too Many Requests", "status": 429,
                                  "detail": "rate limit exceeded for the burst window"}
        assert 1 <= int(limited.headers["Retry-After"]) <= 30
        violations = c.get("/_fake/state").json()["rate_limit_violations"]  # /_fake/ is not rate-limited
        assert [(v["method"], v["path"], v["window"]) for v in violations] == [("GET", "/v2/pods", "burst")]


def test_faults_over_http(fakes: Fakes) -> None:
    fake = fakes()
    with client(fake) as c:
        def arm(**faults: Any) -> None:
            r = c.post("/_fake/faults", json=faults)
            assert r.status_code == 200, r.text

        arm(capacity_errors=1)
        r = c.post("/v2/pods", json=pod_body(args="sleep 30"))
        assert r.status_code == 400 and r.json()["detail"] == CAPACITY_DETAIL
        arm(insufficient_balance=1)
        assert c.post("/v2/pods", json=pod_body(args="sleep 30")).status_code == 402

        arm(fail_but_created=1)  # an error answer, but the pod exists and bills
        r = c.post("/v2/pods", json=pod_body("fbc", args="sleep 30"))
        assert r.status_code == 500 and r.json()["status"] == 500
        [made] = c.get("/v2/pods").json()["pods"]
        assert made["name"] == "fbc" and c.get("/_fake/state").json()["machines_billing"] == 1

        arm(terminate_failures=2)
        assert [c.delete(f"/v2/pods/{made['id']}").status_code for _ in range(3)] == [500, 500, 204]

        arm(server_errors={"count": 1, "method": "GET"}, drop_connections={"count": 1, "method": "DELETE"})
        assert c.post("/v2/pods", json=pod_body("x", args="sleep 30")).status_code == 201  # POST unaffected
        assert c.get("/v2/pods").status_code == 503
        with pytest.raises(httpx.RemoteProtocolError):
            c.delete("/v2/pods/whatever")
        assert c.post("/_fake/faults", json={"no_such_fault": 1}).status_code == 400

        arm(rate_limit_burst=1)
        r = c.get("/v2/pods")
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        [victim] = c.get("/v2/pods").json()["pods"]
        wait_status(c, victim["id"], "RUNNING")
        pgid = fake.pod_process(victim["id"]).pid
        arm(preempt=victim["id"])
        assert c.get(f"/v2/pods/{victim['id']}").status_code == 404
        wait_for(lambda: not group_alive(pgid), what="the preempted pod's processes to end")
        state = c.get("/_fake/state").json()
        assert state["machines_billing"] == 0
        assert {m["gone_reason"] for m in state["machines"]} == {"deleted", "preempted"}
        assert state["faults"] == {}


def test_preemption_after_running(fakes: Fakes) -> None:
    fake = fakes(faults={"preempt_after_running": {"count": 1, "seconds": 0.2, "mode": "error"}})
    with client(fake) as c:
        pod = c.post("/v2/pods", json=pod_body(args="sleep 30")).json()
        wait_status(c, pod["id"], "RUNNING")
        failed = wait_status(c, pod["id"], "ERROR")
        assert failed["runtime"] is None and failed["actions"] == ["start", "terminate"]
        assert c.delete(f"/v2/pods/{pod['id']}").status_code == 204


def test_catalog_follows_the_spec_rules(fakes: Fakes) -> None:
    fake = fakes(faults={"unavailable_gpus": ["NVIDIA A100 80GB PCIe"]})
    with client(fake) as c:
        gpus = c.get("/v2/catalog/gpus").json()["gpus"]
        assert GPU in {g["id"] for g in gpus} and all("availability" not in g for g in gpus)
        assert c.get("/v2/catalog/gpus", params={"include": "AVAILABILITY"}).status_code == 400
        assert c.get("/v2/catalog/gpus", params={"product": "POD"}).status_code == 400
        stock = {g["id"]: g for g in c.get("/v2/catalog/gpus",
                                          params={"include": "AVAILABILITY", "product": "POD"}).json()["gpus"]}
        assert stock[GPU]["availability"] == "HIGH" and stock[GPU]["dataCenters"]
        assert stock["NVIDIA A100 80GB PCIe"]["availability"] == "NONE"
        one = c.get(f"/v2/catalog/gpus/{GPU}")  # the id has spaces: percent-encoded in the path
        assert one.status_code == 200 and one.json()["price"]["secure"] > 0
        assert c.get("/v2/catalog/gpus/NOPE").status_code == 404
        r = c.post("/v2/pods", json=pod_body(gpu={"id": "NVIDIA A100 80GB PCIe"}))
        assert r.json()["detail"] == CAPACITY_DETAIL


def test_logs_stream_as_server_sent_events(fakes: Fakes) -> None:
    fake = fakes()
    with client(fake) as c:
        pod = c.post("/v2/pods", json=pod_body(args="sh -c 'echo line-one; echo line-two; sleep 30'")).json()
        wait_for(lambda: any(x.line == "line-two" for x in fake._pods[pod["id"]].log), what="the pod's output")
        events = []
        with c.stream("GET", f"/v2/pods/{pod['id']}/logs", params={"tail": 100}) as s:
            assert s.headers["content-type"] == "text/event-stream" and s.headers["cache-control"] == "no-cache"
            for line in s.iter_lines():
                if line.startswith(": live"):
                    break
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        container = [e["line"] for e in events if e["source"] == "container"]
        assert container == ["line-one", "line-two"]
        assert any(e["source"] == "system" and "container started" in e["line"] for e in events)
        c.delete(f"/v2/pods/{pod['id']}")


def test_cli_prints_its_url_and_serves_until_stopped(tmp_path: Path) -> None:
    proc = subprocess.Popen([PY, "-m", "trainorch_jupyter.fakes", "runpod", "--port", "0", "--api-key", KEY,
                             "--no-rate-limit", "--work-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        r = httpx.get(url + "/v2/pods", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json() == {"pods": []}
        assert httpx.get(url + "/_fake/state").json()["machines_billing"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_make_fake_names_the_available_fakes() -> None:
    assert isinstance(make_fake("runpod"), RunPodFake)
    with pytest.raises(ValueError, match=r"available: .*runpod"):
        make_fake("nope")
