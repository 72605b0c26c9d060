"""The fake Vast.ai API: spec shapes, the official CLI's calls, auth and instance keys, status progression, real
onstart commands with Vast's environment, ports, rate limits (plain-text 429s), faults and its bookkeeping.

Every request and every answer is validated against Vast's OpenAPI spec (``tests/specs/vast-ai.openapi.yaml``, a
copy of ``../shared/providers/specs``) with the errata the notes document (``fakes.vast.SPEC_ERRATA``); a test
fails on any mismatch it does not expect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainorch_jupyter.fakes import VastFake, make_fake
from trainorch_jupyter.fakes.base import RateWindow, free_port
from trainorch_jupyter.fakes.vast import SPEC_ERRATA, FakeMachine, VastSpecValidator

SPEC = Path(__file__).resolve().parent / "specs" / "vast-ai.openapi.yaml"
KEY = "vast_test_account_key_0123456789"
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


@pytest.fixture(scope="module")
def validator() -> VastSpecValidator:
    assert SPEC.exists(), f"Vast's spec is missing at {SPEC}"
    return VastSpecValidator.cached(SPEC)


class Fakes:
    """Starts fakes with fast settings; on teardown checks every request and answer against the spec."""

    def __init__(self, validator: VastSpecValidator) -> None:
        self.validator = validator
        self.started: list[VastFake] = []
        self.allow_bad_requests = False

    def __call__(self, **kw: Any) -> VastFake:
        opts: dict[str, Any] = {"api_keys": {KEY}, "provision_s": 0.05, "start_s": 0.05, "ports_delay_s": 0.05,
                                "kill_grace_s": 0.5, "rate_limits": [], "validator": self.validator}
        opts.update(kw)
        fake = VastFake(**opts).start()
        self.started.append(fake)
        return fake

    def check(self) -> None:
        for fake in self.started:
            assert fake.ledger.spec_mismatches("response") == []
            assert fake.ledger.spec_mismatches("fake-crash") == []
            if not self.allow_bad_requests:
                assert fake.ledger.spec_mismatches("request") == []


@pytest.fixture
def fakes(validator: VastSpecValidator) -> Iterator[Fakes]:
    f = Fakes(validator)
    try:
        yield f
        f.check()
    finally:
        for fake in f.started:
            fake.stop()


def client(fake: VastFake, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=fake.base_url, headers=headers, timeout=10.0)


def create(c: httpx.Client, ask: int = 20002, **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"image": "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime", "disk": 20.0, "label": "tj-1",
                            "runtype": "ssh"}
    body.update(kw)
    return c.put(f"/api/v0/asks/{ask}/", json=body)


def show(c: httpx.Client, iid: int) -> dict[str, Any] | None:
    r = c.get(f"/api/v0/instances/{iid}/")
    assert r.status_code == 200, r.text
    return r.json()["instances"]  # type: ignore[no-any-return]


def destroy(c: httpx.Client, iid: int) -> httpx.Response:
    return c.request("DELETE", f"/api/v0/instances/{iid}/", json={})


def wait_running(c: httpx.Client, iid: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        inst = show(c, iid)
        return inst if inst and inst["actual_status"] == "running" and "ports" in inst else None
    return wait_for(ready, what=f"instance {iid} running with ports")  # type: ignore[no-any-return]


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
    port = int(os.environ.get("VAST_TCP_PORT_70000") or sys.argv[1])
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


# --------------------------------------------------------------------------------------------
# the machine: onstart with Vast's environment, ports, status progression
# --------------------------------------------------------------------------------------------


def test_onstart_runs_with_vasts_environment_and_a_port_above_70000(fakes: Fakes, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_API_KEY", "host-canary-key-must-not-leak")
    fake = fakes(extra_env={"TJ_FROM_IMAGE": "1", "CONTAINER_ID": "overridden-by-vast"}, provision_s=0.5, start_s=0.5)
    script = tmp_path / "serve.py"
    script.write_text(SERVER_SCRIPT)
    with client(fake) as c:
        r = create(c, onstart=f"{PY} {script}", env="-e JOB_ID=j-1 -e TJDM0=abc+/= -p 70000:70000")
        assert r.status_code == 200, r.text
        answer = r.json()
        iid = answer["new_contract"]
        assert answer["success"] is True and answer["instance_api_key"] == fake.scoped_key(iid)
        seen = []
        inst = show(c, iid)
        while inst and not (inst["actual_status"] == "running" and "ports" in inst):
            seen.append(inst["actual_status"])
            assert "ports" not in inst  # filled in late, never before running
            time.sleep(0.02)
            inst = show(c, iid)
        assert inst is not None
        assert list(dict.fromkeys(seen)) in ([None, "loading"], [None, "loading", "running"])  # in this order
        assert inst["label"] == "tj-1" and inst["image_runtype"] == "ssh" and inst["public_ipaddr"] == "127.0.0.1"
        assert ["-p 70000:70000", "1"] in inst["extra_env"] and ["JOB_ID", "j-1"] in inst["extra_env"]
        (key, maps), = [(k, v) for k, v in inst["ports"].items() if k != "22/tcp"]
        port = int(maps[0]["HostPort"])
        assert key == f"{port}/tcp" and port == fake.port_of(iid, 70000)  # identical numbers above 65535
        got = wait_for(lambda: _get_json(f"http://127.0.0.1:{port}/"), what="the onstart's server")
        env = got["env"]
        assert env["CONTAINER_ID"] == str(iid) and env["CONTAINER_API_KEY"] == fake.scoped_key(iid)
        assert env["VAST_TCP_PORT_70000"] == str(port) and env["PUBLIC_IPADDR"] == "127.0.0.1"
        assert env["VAST_CONTAINERLABEL"] == f"C.{iid}" and env["JOB_ID"] == "j-1" and env["TJDM0"] == "abc+/="
        assert env["TJ_FROM_IMAGE"] == "1" and "VAST_API_KEY" not in env  # the host's key never reaches a machine
        assert Path(got["cwd"]) == fake.instance_dir(iid) and env["HOME"] == got["cwd"]
        billing = fake.state()["billing"]
        assert billing[0]["cost_per_hr"] == pytest.approx(0.28 + 0.15 * 20 / 720, abs=1e-4)
        assert destroy(c, iid).json()["success"] is True
        assert show(c, iid) is None
        r = destroy(c, iid)
        assert r.status_code == 404 and r.json()["error"] == "no_such_instance"
    assert fake.state()["machines_billing"] == 0
    assert fake.state()["machines"][0]["gone_reason"] == "destroyed"


def _get_json(url: str) -> Any:
    try:
        return httpx.get(url, timeout=2.0).json()
    except httpx.TransportError:
        return None


def test_a_low_port_is_mapped_from_a_random_external_port(fakes: Fakes, tmp_path: Path) -> None:
    fake = fakes()
    private = free_port()
    script = tmp_path / "serve.py"
    script.write_text(SERVER_SCRIPT)
    with client(fake) as c:
        iid = create(c, onstart=f"{PY} {script} {private}", env=f"-p {private}:{private}").json()["new_contract"]
        inst = wait_running(c, iid)
        public = int(inst["ports"][f"{private}/tcp"][0]["HostPort"])
        assert public != private
        got = wait_for(lambda: _get_json(f"http://127.0.0.1:{public}/"), what="the forwarded port")
        assert got["env"][f"VAST_TCP_PORT_{private}"] == str(public)
        destroy(c, iid)
    assert fake.state()["machines_billing"] == 0


def test_an_ended_onstart_keeps_an_ssh_instance_billing_and_args_end_it(fakes: Fakes) -> None:
    fake = fakes()
    with client(fake) as c:
        ssh = create(c, onstart="echo done").json()["new_contract"]
        args = create(c, runtype="args", args=[PY, "-c", "print('bye')"]).json()["new_contract"]
        wait_for(lambda: (show(c, args) or {}).get("actual_status") == "exited", what="the args container to exit")
        wait_for(lambda: fake.state()["instances"][0]["exit_codes"] == [0], what="onstart to end")
        time.sleep(0.2)
        assert show(c, ssh)["actual_status"] == "running"  # type: ignore[index]  # sshd keeps it up
        assert fake.state()["machines_billing"] == 2  # both bill (an exited one for its disk) until destroyed
        for iid in (ssh, args):
            destroy(c, iid)
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# offers
# --------------------------------------------------------------------------------------------


def test_search_offers_filters_orders_and_prices_the_disk(fakes: Fakes) -> None:
    fake = fakes()
    with client(fake, key=None) as anonymous, client(fake) as c, client(fake, key="wrong") as wrong:
        body = {"gpu_name": {"in": ["RTX 4090"]}, "num_gpus": {"eq": 1}, "verified": {"eq": True},
                "rentable": {"eq": True}, "order": [["dph_total", "asc"]], "allocated_storage": 50.0, "limit": 10}
        offers = anonymous.post("/api/v0/bundles/", json=body).json()["offers"]  # no key needed (gpuhunt)
        assert [(o["id"], o["dph_total"]) for o in offers] == [(20002, pytest.approx(0.28 + 0.15 * 50 / 720, abs=1e-5)),
                                                              (20003, pytest.approx(0.34 + 0.15 * 50 / 720, abs=1e-5))]
        o = offers[0]
        assert o["gpu_ram"] == 24564 and o["geolocation"] == "Quebec, CA" and o["direct_port_count"] >= 1
        assert o["reliability2"] == pytest.approx(0.992) and o["verification"] == "verified"
        # country codes, a price cap, reliability; an unverified machine only when asked for
        got = c.post("/api/v0/bundles/", json={"geolocation": {"in": ["US"]}, "dph_total": {"lte": 1.0},
                                               "reliability2": {"gte": 0.99}, "order": [["dph_total", "asc"]]})
        assert [o["id"] for o in got.json()["offers"]] == [20003, 20011, 20007]
        cheap = c.post("/api/v0/bundles/", json={"gpu_name": {"eq": "RTX 4090"}, "order": [["dph_total", "asc"]]})
        assert cheap.json()["offers"][0]["id"] == 20005 and cheap.json()["offers"][0]["verified"] is False
        bid = c.post("/api/v0/bundles/", json={"gpu_name": {"eq": "H100 SXM"}, "num_gpus": {"eq": 1}, "type": "bid",
                                               "allocated_storage": 0})
        assert bid.json()["offers"][0]["dph_total"] == pytest.approx(1.75 * 0.4)  # interruptible: the minimum bid
        # the spec's 404 for a wrong key here
        r = wrong.post("/api/v0/bundles/", json={})
        assert r.status_code == 404 and r.json()["msg"] == "Invalid user key"
        assert c.post("/api/v0/bundles/", json={"num_gpus": {"about": 1}}).status_code == 400


# --------------------------------------------------------------------------------------------
# create: limits, errors, the bid trap
# --------------------------------------------------------------------------------------------


def test_create_checks_vasts_limits(fakes: Fakes) -> None:
    fake = fakes()
    fakes.allow_bad_requests = True  # some bodies here break the spec on purpose
    with client(fake) as c:
        too_long = create(c, onstart="x" * 3000, runtype="args", args=["bash", "-c", "y" * 1100])
        assert too_long.status_code == 400 and "onstart + args are 4109 characters" in too_long.json()["msg"]
        assert too_long.json()["error"] == "invalid_args"
        assert create(c, onstart="x" * 4096).status_code == 200  # exactly the limit
        long_env = create(c, env="-e A=" + "v" * 255)
        assert long_env.status_code == 400 and "limit is 256" in long_env.json()["msg"]
        assert create(c, env={"A": "v" * 254, "-p 8000:8000": "1"}).status_code == 200  # the CLI's object form
        for body, said in (({"image": ""}, "'image' is required"), ({"disk": 4}, "at least 8"),
                           ({"runtype": "ssh_proxy telnet"}, "'runtype'"), ({"price": 500}, "'price'"),
                           ({"env": "-e A=1 --rm"}, "unexpected '--rm'"), ({"label": "l" * 257}, "'label'")):
            r = create(c, **body)
            assert r.status_code == 400 and said in r.json()["msg"], (body, r.text)
        gone = create(c, ask=99999)
        assert gone.status_code == 404 and "no_such_ask" in gone.json()["msg"]
        # a bid below the offer's minimum: a failure that still made the instance (stopped, billing its disk)
        low = create(c, ask=20009, price=0.1)
        assert low.status_code == 400 and low.json()["error"] == "invalid_price"
        iid = low.json()["new_contract"]
        inst = show(c, iid)
        assert inst is not None and inst["actual_status"] == "stopped" and inst["is_bid"] is True
        assert inst["cur_state"] == inst["intended_status"] == inst["next_state"] == "stopped"
        assert fake.state()["machines_billing"] == 3
        for i in fake.instance_ids():
            assert destroy(c, i).status_code == 200
    assert fake.state()["machines_billing"] == 0
    assert {m["direction"] for m in fake.ledger.spec_mismatches()} <= {"request"}  # our bad bodies only


def test_auth_and_the_instance_key_scope(fakes: Fakes) -> None:
    fake = fakes()
    fakes.allow_bad_requests = True  # requests without a key break the spec's security on purpose (checked below)
    with client(fake) as c, client(fake, key=None) as anonymous, client(fake, key="wrong") as wrong:
        for r in (anonymous.get("/api/v1/instances/"), wrong.get("/api/v0/instances/1/")):
            assert r.status_code == 401 and r.json() == {"success": False, "error": "auth_error",
                                                         "msg": "Invalid user key"}
        assert anonymous.get("/api/v0/users/current/", params={"api_key": KEY}).status_code == 200  # the older form
        mine, other = (create(c).json()["new_contract"] for _ in range(2))
        with client(fake, key=fake.scoped_key(mine)) as own:
            assert own.get(f"/api/v0/instances/{mine}/").json()["instances"]["id"] == mine
            for r in (own.get(f"/api/v0/instances/{other}/"), own.get("/api/v1/instances/"), create(own),
                      own.request("DELETE", f"/api/v0/instances/{other}/", json={}),
                      own.put(f"/api/v0/instances/{mine}/", json={"label": "x"})):
                assert r.status_code == 403 and r.json()["error"] == "not_authorized", r.request.url
            assert own.put(f"/api/v0/instances/{mine}/", json={"state": "stopped"}).json() == {"success": True}
            assert show(c, mine)["actual_status"] == "stopped"  # type: ignore[index]
            assert own.request("DELETE", f"/api/v0/instances/{mine}/", json={}).status_code == 200
            assert own.get(f"/api/v0/instances/{mine}/").status_code == 401  # the key died with its instance
        assert destroy(c, other).status_code == 200
    state = fake.state()
    assert state["machines_billing"] == 0
    reasons = sorted(m["gone_reason"] for m in state["machines"])
    assert reasons == ["destroyed", "destroyed by its own key (CONTAINER_API_KEY)"]
    assert {r["auth"] for r in state["requests"]} == {"none", "account-key", "instance-key"}
    assert KEY not in json.dumps(state)
    assert [m["path"] for m in fake.ledger.spec_mismatches("request")] == ["/api/v1/instances/", "/api/v0/users/current/"]
    assert all("Security" in e for m in fake.ledger.spec_mismatches("request") for e in m["errors"])


def test_the_v1_list_pages_filters_and_selects(fakes: Fakes) -> None:
    fake = fakes(machines=[FakeMachine(30001, "RTX 4090", 1, 24564, 0.3, "Texas, US", slots=40)])
    with client(fake) as c:
        made = [create(c, ask=30001, label=f"job-{i % 3}", target_state="stopped").json()["new_contract"]
                for i in range(7)]
        everything = c.get("/api/v1/instances/").json()  # 25 a page at most: all seven
        assert everything["instances_found"] == 7 and everything["next_token"] is None
        first = c.get("/api/v1/instances/", params={"limit": 5, "order_by": json.dumps([{"col": "id", "dir": "asc"}])})
        page = first.json()
        assert page["instances_found"] == 5 and page["total_instances"] == 7 and page["next_token"]
        assert page["label_counts"] == {"job-0": 3, "job-1": 2, "job-2": 2}
        rest = c.get("/api/v1/instances/", params={"limit": 5, "after_token": page["next_token"]}).json()
        assert [i["id"] for i in page["instances"] + rest["instances"]] == sorted(made) and rest["next_token"] is None
        some = c.get("/api/v1/instances/", params={"select_filters": json.dumps({"label": {"eq": "job-1"}}),
                                                   "select_cols": json.dumps(["id", "label", "nope"])}).json()
        assert some["total_instances"] == 2 and some["instances"][0] == {"id": made[1], "label": "job-1", "nope": None}
        by_id = c.get("/api/v1/instances/", params={"select_filters": json.dumps({"id": {"in": made[:2]}})}).json()
        assert [i["id"] for i in by_id["instances"]] == made[:2]
        computed = c.get("/api/v1/instances/", params={"select_filters": json.dumps({"dph_total": {"lt": 1}})})
        assert computed.status_code == 400 and "dph_total is not a valid search key" in computed.json()["msg"]
        token = c.get("/api/v1/instances/", params={"after_token": "not-a-token"})
        assert token.status_code == 400 and token.json()["error"] == "invalid_token"
        for iid in made:
            destroy(c, iid)
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# rate limits
# --------------------------------------------------------------------------------------------


def test_rate_limits_are_minimum_spacings_with_a_plain_text_429(fakes: Fakes) -> None:
    fake = fakes(rate_limits=None)  # Vast's own: create 4.5 s apart, show 2 s, search 10 a minute...
    with client(fake) as c:
        iid = create(c).json()["new_contract"]
        second = create(c)
        assert second.status_code == 429 and second.headers["content-type"] == "text/plain"
        assert second.text == "API requests too frequent endpoint threshold=4.5" and "retry-after" not in second.headers
        assert show(c, iid) is not None  # another endpoint: its own spacing
        assert c.get(f"/api/v0/instances/{iid}/").status_code == 429
        assert [c.post("/api/v0/bundles/", json={}).status_code for _ in range(11)] == [200] * 10 + [429]
        assert destroy(c, iid).status_code == 200
    violations = fake.ledger.rate_limit_violations()
    assert [(v["method"], v["window"]) for v in violations] == [("PUT", "create"), ("GET", "show"), ("POST", "search")]
    assert fake.state()["machines_billing"] == 0


# --------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------


def test_capacity_and_taken_offers(fakes: Fakes) -> None:
    fake = fakes(faults={"capacity_errors": {"count": 1, "status": 410}, "taken_asks": [20003]})
    with client(fake) as c:
        r = create(c)
        assert r.status_code == 410 and r.json()["error"] == "no_such_ask"
        offers = c.post("/api/v0/bundles/", json={"gpu_name": {"eq": "RTX 4090"}}).json()["offers"]
        assert 20003 not in [o["id"] for o in offers]
        assert create(c, ask=20003).status_code == 404
        fake.inject(capacity_errors=1)
        assert create(c).status_code == 404
        assert fake.state()["machines_billing"] == 0
        fake.inject(clear=True)
        iid = create(c, ask=20003).json()["new_contract"]
        destroy(c, iid)
    assert fake.state()["machines_billing"] == 0


def test_fail_but_created_timeouts_server_errors_and_dropped_connections(fakes: Fakes) -> None:
    fake = fakes(faults={"fail_but_created": 1})
    with client(fake) as c:
        r = create(c)
        assert r.status_code == 400 and r.json()["error"] == "invalid_price"
        stopped = r.json()["new_contract"]
        assert show(c, stopped)["actual_status"] == "stopped"  # type: ignore[index]
        fake.inject(fail_but_created={"count": 1, "status": 200, "state": "running"})
        r = create(c)
        assert r.status_code == 200 and r.json()["success"] is False
        running = r.json()["new_contract"]
        wait_running(c, running)
        fake.inject(create_timeout={"count": 1, "seconds": 2})
        with pytest.raises(httpx.ReadTimeout):
            c.put("/api/v0/asks/20002/", json={"image": "img", "label": "slow"}, timeout=0.3)
        slow = wait_for(lambda: [i["id"] for i in c.get("/api/v1/instances/").json()["instances"]
                                 if i["label"] == "slow"], what="the timed-out create's instance")[0]
        fake.inject(server_errors={"count": 1, "method": "PUT"}, drop_connections={"count": 1, "method": "GET"})
        r = create(c)
        assert r.status_code == 503 and r.json()["error"] == "server_error"
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(f"/api/v0/instances/{stopped}/")
        assert fake.state()["machines_billing"] == 3  # each of them bills until destroyed
        for iid in (stopped, running, slow):
            assert destroy(c, iid).json()["success"] is True
    assert fake.state()["machines_billing"] == 0


def test_terminate_failures_and_429_bursts(fakes: Fakes) -> None:
    fake = fakes(faults={"terminate_failures": 2, "rate_limit_burst": 1})
    with client(fake) as c:
        burst = c.get("/api/v0/users/current/")
        assert burst.status_code == 429 and burst.headers["content-type"] == "text/plain"
        iid = create(c).json()["new_contract"]
        first = destroy(c, iid)
        assert first.status_code == 200 and first.json() == {"success": False, "error": "server_error",
                                                             "msg": "failed to destroy the instance; try again"}
        fake.inject(terminate_failures={"count": 1, "status": 500})
        assert destroy(c, iid).status_code == 500
        assert fake.state()["machines_billing"] == 1
        assert destroy(c, iid).json()["success"] is True
    assert fake.ledger.rate_limit_violations() == []  # an injected burst is not the client's fault
    assert fake.state()["machines_billing"] == 0


@pytest.mark.parametrize("status", ["exited", "unknown", "offline", "oci"])
def test_bad_starts_never_reach_running(fakes: Fakes, status: str) -> None:
    fake = fakes(faults={"bad_start": {"count": 1, "status": status}})
    with client(fake) as c:
        iid = create(c).json()["new_contract"]
        want = "created" if status == "oci" else status
        inst = wait_for(lambda: (show(c, iid) or {}).get("actual_status") == want and show(c, iid),
                        what=f"status {want}")
        if status == "oci":
            assert "OCI runtime create failed" in inst["status_msg"]
        assert "ports" not in inst and fake.instance_process(iid) is None
        assert fake.state()["machines_billing"] == 1
        destroy(c, iid)
    assert fake.state()["machines_billing"] == 0


@pytest.mark.parametrize("mode", ["stopped", "exited", "unknown", "offline", "vanish"])
def test_preemption(fakes: Fakes, mode: str) -> None:
    fake = fakes()
    with client(fake) as c:
        iid = create(c, onstart="sleep 60").json()["new_contract"]
        wait_running(c, iid)
        proc = fake.instance_process(iid)
        assert proc is not None and proc.poll() is None
        assert fake.preempt(iid, mode)
        wait_for(lambda: proc.poll() is not None, what="the container's processes to die")
        inst = show(c, iid)
        if mode == "vanish":
            assert inst is None and fake.state()["machines_billing"] == 0
        else:
            assert inst is not None and inst["actual_status"] == mode and "ports" not in inst
            if mode == "stopped":
                assert inst["cur_state"] == inst["intended_status"] == inst["next_state"] == "stopped"
            assert fake.state()["machines_billing"] == 1  # its disk still bills
            destroy(c, iid)
        # armed for the next instance, some time after it runs
        fake.inject(preempt_after_running={"count": 1, "seconds": 0.1, "mode": mode})
        nxt = create(c).json()["new_contract"]
        wait_for(lambda: (show(c, nxt) or {"actual_status": mode}).get("actual_status") == mode,
                 what="the armed preemption")
        if mode != "vanish":
            destroy(c, nxt)
    assert fake.state()["machines_billing"] == 0


def test_faults_over_http_and_the_state(fakes: Fakes) -> None:
    fake = fakes()
    with client(fake) as c:
        r = c.post("/_fake/faults", json={"capacity_errors": 2, "taken_asks": [20001]})
        assert r.status_code == 200 and r.json()["faults"] == {"capacity_errors": {"count": 2}}
        assert c.post("/_fake/faults", json={"bogus": 1}).status_code == 400
        assert c.post("/_fake/faults", json={"bad_start": {"status": "sideways"}}).status_code == 400
        state = c.get("/_fake/state").json()
        assert state["provider"] == "vast" and state["taken_asks"] == [20001] and state["machines_billing"] == 0
        assert c.post("/_fake/faults", json={"clear": True}).json()["faults"] == {}


# --------------------------------------------------------------------------------------------
# the official CLI's calls (API_NOTES 3.9), replayed as captured, and the CLI itself where installed
# --------------------------------------------------------------------------------------------

CLI_HEADERS = {"Authorization": f"Bearer {KEY}", "User-Agent": "vastai-cli/1.9.1"}
CLI_SEARCH = {"verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True}, "gpu_ram": {"gte": 8000.0},
              "order": [["score", "desc"]], "type": "on-demand", "allocated_storage": 5.0}
CLI_CREATE = {"client_id": "me", "image": "pytorch/pytorch", "env": {}, "price": None, "disk": 20.0, "label": None,
              "extra": None, "onstart": None, "image_login": None, "python_utf8": False, "lang_utf8": False,
              "use_jupyter_lab": False, "jupyter_dir": None, "force": False, "cancel_unavail": False,
              "template_hash_id": None, "user": None, "runtype": "ssh"}
CLI_COLS = ["id", "actual_status", "label", "num_gpus", "gpu_name", "gpu_util", "disk_space", "disk_usage", "disk_util",
            "volume_info", "dph_total", "image_uuid", "start_date", "verification"]


def test_the_vastai_cli_calls_as_captured(fakes: Fakes) -> None:
    fake = fakes()
    fakes.allow_bad_requests = True  # the CLI's own bodies differ from the spec (checked below)
    with httpx.Client(base_url=fake.base_url, headers=CLI_HEADERS, timeout=10.0) as c:
        assert c.get("/api/v0/users/current").json()["id"] == 4242  # role detection (no trailing slash)
        offers = c.post("/api/v0/bundles/", json=CLI_SEARCH).json()["offers"]
        assert offers and all(o["gpu_ram"] >= 8000 and o["verified"] for o in offers)
        assert [o["score"] for o in offers] == sorted((o["score"] for o in offers), reverse=True)
        made = c.put(f"/api/v0/asks/{offers[0]['id']}/", json=CLI_CREATE).json()
        assert made["success"] is True and isinstance(made["new_contract"], int)
        assert c.get("/api/v0/instances/filters/").json()["filters"]
        params = {"select_filters": "{}", "order_by": '[{"col":"id","dir":"asc"}]', "limit": 25,
                  "select_cols": json.dumps(CLI_COLS)}
        rows = c.get("/api/v1/instances/", params=params).json()
        assert rows["next_token"] is None and set(rows["instances"][0]) == set(CLI_COLS)
        assert c.get(f"/api/v0/instances/{made['new_contract']}/", params={"owner": "me"}).json()["instances"]
        assert c.request("DELETE", f"/api/v0/instances/{made['new_contract']}/", json={}).json()["success"] is True
    assert [(r["method"], r["path"], r["status"]) for r in fake.ledger.requests()] == [
        ("GET", "/api/v0/users/current", 200), ("POST", "/api/v0/bundles/", 200),
        ("PUT", f"/api/v0/asks/{offers[0]['id']}/", 200), ("GET", "/api/v0/instances/filters/", 200),
        ("GET", "/api/v1/instances/", 200), ("GET", f"/api/v0/instances/{made['new_contract']}/", 200),
        ("DELETE", f"/api/v0/instances/{made['new_contract']}/", 200)]
    # where the CLI parts from the spec (the notes' 3.3/3.9): 'on-demand', an env object, nulls for strings
    mismatches = {m["path"]: m["errors"] for m in fake.ledger.spec_mismatches("request")}
    assert mismatches["/api/v0/bundles/"] == ["$.type: 'on-demand' is not one of ['ondemand', 'bid', 'reserved']"]
    create_errors = mismatches[f"/api/v0/asks/{offers[0]['id']}/"]
    assert "$.env: {} is not of type 'string'" in create_errors
    assert {e.split(":")[0] for e in create_errors} <= {"$.env", "$.price", "$.label", "$.onstart", "$.image_login",
                                                       "$.jupyter_dir", "$.template_hash_id", "$.user"}
    assert fake.state()["machines_billing"] == 0


def _vastai_cli() -> str | None:
    return os.environ.get("TRAINORCH_VASTAI_CLI") or shutil.which("vastai")


@pytest.mark.skipif(_vastai_cli() is None, reason="the official `vastai` CLI is not installed (pip install vastai; "
                    "or point TRAINORCH_VASTAI_CLI at it)")
def test_the_official_vastai_cli_against_the_fake(fakes: Fakes, tmp_path: Path) -> None:
    fake = fakes()
    fakes.allow_bad_requests = True
    cli = str(_vastai_cli())
    env = {**os.environ, "HOME": str(tmp_path), "NO_COLOR": "1"}

    def vastai(*args: str) -> str:
        out = subprocess.run([cli, "--url", fake.base_url, "--api-key", KEY, *args], capture_output=True, text=True,
                             env=env, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    assert "RTX_4090" in vastai("search", "offers", "gpu_ram>=8") or "RTX 4090" in vastai("search", "offers", "--raw")
    assert "new_contract" in vastai("create", "instance", "20002", "--image", "pytorch/pytorch", "--disk", "20")
    (iid,) = fake.instance_ids()
    assert str(iid) in vastai("show", "instances", "--raw")
    vastai("destroy", "instance", str(iid), "-y")
    assert fake.state()["machines_billing"] == 0
    assert fake.ledger.spec_mismatches("response") == []


# --------------------------------------------------------------------------------------------
# the module's entry point, the spec errata
# --------------------------------------------------------------------------------------------


def test_python_m_fakes_vast_serves_until_stopped(tmp_path: Path) -> None:
    proc = subprocess.Popen([PY, "-m", "trainorch_jupyter.fakes", "vast", "--port", "0", "--api-key", KEY,
                             "--no-rate-limit", "--work-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/_fake/state").json()["provider"] == "vast"
        assert httpx.get(url + "/api/v0/users/current/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
    assert make_fake("vast").provider == "vast"


def test_each_spec_erratum_is_needed(validator: VastSpecValidator) -> None:
    """The errata are not slack: the spec as published refuses what Vast (and its own CLI) really do."""
    assert len(SPEC_ERRATA) == 9
    strict = VastSpecValidator(SPEC, errata=False)
    req = ("GET", "/api/v0/instances/5/", "", {"Authorization": "Bearer k"}, None)
    as_json = {"Content-Type": "application/json"}
    cases = [
        (200, as_json, json.dumps({"instances": None}).encode()),
        (200, as_json, json.dumps({"instances": {"id": 5, "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "1"}]}}}).encode()),
        (429, {"Content-Type": "text/plain"}, b"API requests too frequent endpoint threshold=2.0"),
        (403, as_json, json.dumps({"success": False, "error": "not_authorized", "msg": "x"}).encode()),
        (503, as_json, json.dumps({"success": False, "error": "server_error", "msg": "x"}).encode()),
    ]
    for status, headers, body in cases:
        assert strict.check_response(*req, status, headers, body), (status, body)  # the spec as it is: refused
        assert validator.check_response(*req, status, headers, body) == [], (status, body)  # with the errata: fine
    search = ("POST", "/api/v0/bundles/", "", {"Content-Type": "application/json"},
              json.dumps({"order": [["dph_total", "asc"]]}).encode())
    assert strict.check_request(*search) and validator.check_request(*search) == []  # no key, and 'order'
    signed = (*search[:3], {**search[3], "Authorization": "Bearer k"}, search[4])
    assert strict.check_request(*signed) and validator.check_request(*signed) == []  # 'order' alone
    assert validator.check_request("GET", "/api/v0/instances/filters/", "", {}, None) == []  # not in the spec
    windows = [RateWindow("x", 1, 1.0)]
    assert VastFake._limiters(windows).keys() >= {"search", "create", "destroy", "show", "list", "manage"}
