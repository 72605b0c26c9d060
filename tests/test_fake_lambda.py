"""The fake Lambda Cloud API v1: spec shapes and envelopes, auth, status progression, user_data really run, the SSH
server that stands for port 22 (key auth, forwarding to the stage-0's port only), rate limits, faults, the machine's
``shutdown`` and its bookkeeping. Every request and response is validated against Lambda's OpenAPI spec
(``tests/specs/lambda-cloud-v1.8.3.openapi.json``, a copy of ``../shared/providers/specs``) by openapi-core; the only
mismatches allowed are the 429 and 5xx statuses Lambda answers but its spec does not list."""

from __future__ import annotations

import asyncio
import base64
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainorch_jupyter.fakes import FAKES, LambdaFake, make_fake
from trainorch_jupyter.fakes.base import OpenAPIValidator, RateWindow
from trainorch_jupyter.fakes.lambdacloud import RUNNER_PORT_ENV

asyncssh = pytest.importorskip("asyncssh")

SPEC = Path(__file__).resolve().parent / "specs" / "lambda-cloud-v1.8.3.openapi.json"
KEY = "secret_lambda_test_account_key_0123456789"
PY = sys.executable
UNDOCUMENTED = {429, 500, 503}
# A stand-in for the stage-0: an HTTP server on the port the fake gives (the machine's 8765).
SERVER_SCRIPT = "#!/bin/sh\nexec " + shlex.quote(PY) + " -c " + shlex.quote(
    "import http.server as h, os\n"
    "class H(h.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b = ('vm ' + os.environ['HOME']).encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers()\n"
    "        self.wfile.write(b)\n"
    "    def log_message(self, *a): pass\n"
    f"h.HTTPServer(('127.0.0.1', int(os.environ['{RUNNER_PORT_ENV}'])), H).serve_forever()\n") + "\n"


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
def validator() -> OpenAPIValidator:
    assert SPEC.exists(), f"Lambda's spec is missing at {SPEC}"
    return OpenAPIValidator.cached(SPEC)


class Fakes:
    """Starts fakes with fast settings; on teardown checks every request and response against the spec."""

    def __init__(self, validator: OpenAPIValidator) -> None:
        self.validator = validator
        self.started: list[LambdaFake] = []
        self.allow_bad_requests = False

    def __call__(self, **kw: Any) -> LambdaFake:
        opts: dict[str, Any] = {"api_keys": {KEY}, "boot_s": 0.05, "terminate_s": 0.1, "kill_grace_s": 0.5,
                                "rate_limit": False, "validator": self.validator}
        opts.update(kw)
        fake = LambdaFake(**opts).start()
        self.started.append(fake)
        return fake

    def check(self) -> None:
        for fake in self.started:
            if not fake.instance_ids():  # every VM gone: nothing of theirs may still run
                wait_for(lambda f=fake: not f.vm_pids(), what="no process of a gone VM")  # type: ignore[misc]
            assert fake.ledger.spec_mismatches("fake-crash") == []
            for m in fake.ledger.spec_mismatches("response"):
                assert m["status"] in UNDOCUMENTED and all(e.startswith("ResponseNotFound") for e in m["errors"]), m
            if not self.allow_bad_requests:
                assert fake.ledger.spec_mismatches("request") == []
            assert KEY not in str(fake.state())


@pytest.fixture
def fakes(validator: OpenAPIValidator) -> Iterator[Fakes]:
    f = Fakes(validator)
    try:
        yield f
        f.check()
    finally:
        for fake in f.started:
            fake.stop()


def client(fake: LambdaFake, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=fake.base_url + "/api/v1", headers=headers, timeout=10.0)


def new_key() -> tuple[Any, str]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key, key.export_public_key().decode().strip()


def add_key(c: httpx.Client, name: str, public: str) -> dict[str, Any]:
    r = c.post("/ssh-keys", json={"name": name, "public_key": public})
    assert r.status_code == 200, r.text
    return dict(r.json()["data"])


def launch(c: httpx.Client, key_name: str, **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10",
                            "ssh_key_names": [key_name], "name": "job-1"}
    body.update(kw)
    return c.post("/instance-operations/launch", json=body)


def wait_status(c: httpx.Client, iid: str, status: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        r = c.get(f"/instances/{iid}")
        inst = r.json()["data"] if r.status_code == 200 else None
        return inst if inst and inst["status"] == status else None
    return dict(wait_for(ready, what=f"instance {iid} {status}"))


def ssh_port(fake: LambdaFake, iid: str) -> int:
    def port() -> int | None:
        r = httpx.get(f"{fake.base_url}/_fake/ssh-port/{iid}")
        return int(r.json()["port"]) if r.status_code == 200 else None
    return int(wait_for(port, what="the SSH server"))


async def through_ssh(port: int, key: Any, *, dest: tuple[str, int] = ("127.0.0.1", 8765), user: str = "ubuntu",
                      known: Any = None) -> str:
    """GET / on the machine's ``dest`` through an SSH local port forward (what the provider does)."""
    async with asyncssh.connect("127.0.0.1", port, username=user, client_keys=[key], known_hosts=known, config=[],
                                agent_path=None) as conn:
        listener = await conn.forward_local_port("127.0.0.1", 0, *dest)
        try:
            async with httpx.AsyncClient() as http:
                for _ in range(100):
                    try:
                        return (await http.get(f"http://127.0.0.1:{listener.get_port()}/", timeout=5)).text
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)  # the server on the machine may still be starting
                raise AssertionError("the machine's server never answered")
        finally:
            listener.close()


# --------------------------------------------------------------------------------------------


def test_instance_types_auth_and_envelopes(fakes: Fakes) -> None:
    fake = fakes(faults={"unavailable_types": ["gpu_1x_a100_sxm4"]})
    with client(fake) as c:
        types = c.get("/instance-types").json()["data"]
        a10 = types["gpu_1x_a10"]
        assert a10["instance_type"]["price_cents_per_hour"] == 75 and a10["instance_type"]["specs"]["gpus"] == 1
        assert [r["name"] for r in a10["regions_with_capacity_available"]] == ["us-east-1", "us-west-1"]
        assert types["gpu_1x_a100_sxm4"]["regions_with_capacity_available"] == []
        assert c.get("/instances").json() == {"data": []}
        missing = c.get("/instances/0920582c7ff041399e34823a0be62549")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "global/object-does-not-exist"
    fakes.allow_bad_requests = True  # no (or a wrong) credential breaks the spec's security: that is the test
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Token " + KEY}):
        r = httpx.get(fake.base_url + "/api/v1/instances", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == {"code": "global/invalid-api-key", "message": "API key was invalid, expired, or "
                                     "deleted.", "suggestion": "Check your API key or create a new one, then try again."}
    basic = base64.b64encode(f"{KEY}:".encode()).decode()
    for value in (f"Basic {basic}", f"Basic {KEY}"):  # both Basic forms the spec allows
        assert httpx.get(fake.base_url + "/api/v1/instances", headers={"Authorization": value}).status_code == 200
    assert [r["auth"] for r in fake.ledger.requests()][-2:] == ["basic", "basic"]
    assert make_fake("lambda").provider == "lambda" and FAKES["lambda"] is LambdaFake


def test_launch_runs_user_data_and_port_22_forwards_to_the_stage0_only(fakes: Fakes, tmp_path: Path) -> None:
    fake = fakes(work_dir=tmp_path / "vms", keep_instance_dirs=True, boot_s=0.5)
    key, public = new_key()
    stranger, _ = new_key()
    with client(fake) as c:
        add_key(c, "job-key", public)
        r = launch(c, "job-key", user_data=SERVER_SCRIPT, tags=[{"key": "trainorch-job", "value": "j1"}])
        assert r.status_code == 200, r.text
        (iid,) = r.json()["data"]["instance_ids"]
        assert len(iid) == 32
        booting = c.get(f"/instances/{iid}").json()["data"]
        assert booting["status"] == "booting" and "ip" not in booting  # no usable IP while booting
        assert booting["tags"] == [{"key": "trainorch-job", "value": "j1"}] and booting["ssh_key_names"] == ["job-key"]
        assert booting["actions"]["restart"] == {"available": False, "reason_code": "vm-has-not-launched",
                                                 "reason_description": "The instance has not launched yet."}
        active = wait_status(c, iid, "active")
        assert active["ip"] == "127.0.0.1" and active["name"] == "job-1" and active["region"]["name"] == "us-east-1"
        assert fake.state()["machines_billing"] == 1 and fake.state()["billing"][0]["cost_per_hr"] == 0.75
        port = ssh_port(fake, iid)

        async def go() -> None:
            # the job's key reaches the machine's 8765, which is the stage-0's real port
            assert await through_ssh(port, key) == f"vm {fake.instance_dir(iid)}"
            assert await through_ssh(port, key, dest=("localhost", 8765)) == f"vm {fake.instance_dir(iid)}"
            with pytest.raises(asyncssh.PermissionDenied):  # another key
                await through_ssh(port, stranger)
            with pytest.raises(asyncssh.PermissionDenied):  # another user
                await through_ssh(port, key, user="root")
            async with asyncssh.connect("127.0.0.1", port, username="ubuntu", client_keys=[key], known_hosts=None,
                                        config=[]) as conn:
                for dest in (("127.0.0.1", 22), ("10.0.0.1", 8765), ("example.com", 443)):
                    with pytest.raises(asyncssh.ChannelOpenError):  # any other port or host: refused
                        await conn.open_connection(*dest)
                assert conn.get_server_host_key() is not None
            # the host key stays the same (a client records it) until the fake is told to change it
            async with asyncssh.connect("127.0.0.1", port, username="ubuntu", client_keys=[key], known_hosts=None,
                                        config=[]) as conn:
                host_key = conn.get_server_host_key()
            assert await through_ssh(port, key, known=([host_key], [], [])) == f"vm {fake.instance_dir(iid)}"
            assert fake.ssh_state(iid)["forwards"] == 3  # type: ignore[index]
            fake.change_host_key(iid)
            with pytest.raises(asyncssh.HostKeyNotVerifiable):
                await through_ssh(ssh_port(fake, iid), key, known=([host_key], [], []))

        asyncio.run(go())
        proc = fake.instance_process(iid)
        assert proc is not None and proc.poll() is None and proc.env["HOME"] == str(fake.instance_dir(iid))
        assert proc.env["PATH"].split(os.pathsep)[0].endswith(f"{iid}.bin")  # the fake's sudo and shutdown first
        assert KEY not in str(proc.env)

        t = c.post("/instance-operations/terminate", json={"instance_ids": [iid]})
        assert t.status_code == 200 and t.json()["data"]["terminated_instances"][0]["status"] == "terminating"
        assert t.json()["data"]["terminated_instances"][0]["actions"]["terminate"]["available"] is False
        wait_for(lambda: c.get(f"/instances/{iid}").status_code == 404, what="the instance to be gone")
        assert c.get("/instances").json()["data"] == []
        assert c.post("/instance-operations/terminate", json={"instance_ids": [iid]}).status_code == 404
    wait_for(lambda: proc.poll() is not None, what="the machine's process to die")
    assert httpx.get(f"{fake.base_url}/_fake/ssh-port/{iid}").status_code == 404
    assert fake.state()["machines_billing"] == 0
    assert fake.state()["machines"][0]["gone_reason"] == "terminated"


def test_a_terminated_vm_leaves_no_process_behind_even_in_another_session(fakes: Fakes, tmp_path: Path) -> None:
    """The user_data returns at once, leaving its work in the background (as the provider's script does), and that
    work starts a process in a session of its own (as the runner starts a job's command): a terminate ends them all,
    as a VM's end would."""
    fake = fakes(work_dir=tmp_path / "vms")
    _, public = new_key()
    child = "import subprocess, sys; subprocess.Popen(['sleep', '300'], start_new_session=True); print('ok')"
    script = f"#!/bin/sh\nnohup sh -c {shlex.quote(PY + ' -c ' + shlex.quote(child) + '; sleep 300')} >/dev/null 2>&1 &\n"
    with client(fake) as c:
        add_key(c, "k", public)
        iid = launch(c, "k", user_data=script).json()["data"]["instance_ids"][0]
        wait_status(c, iid, "active")
        wait_for(lambda: len(fake.vm_pids(iid)) >= 3, what="the background work and its own session")
        assert fake.state()["instances"][0]["exit_codes"] == [0]  # the script itself returned
        assert c.post("/instance-operations/terminate", json={"instance_ids": [iid]}).status_code == 200
    wait_for(lambda: not fake.vm_pids(iid), what="every process of the VM to end")


def test_restart_reboots_without_running_user_data_again(fakes: Fakes, tmp_path: Path) -> None:
    fake = fakes(work_dir=tmp_path / "vms")
    _, public = new_key()
    with client(fake) as c:
        add_key(c, "k", public)
        iid = launch(c, "k", user_data="#!/bin/sh\necho ran >> \"$HOME/runs\"\nsleep 60\n").json()["data"]["instance_ids"][0]
        wait_status(c, iid, "active")
        wait_for(lambda: (fake.instance_dir(iid) / "runs").exists(), what="the user_data to run")
        first = fake.instance_process(iid)
        r = c.post("/instance-operations/restart", json={"instance_ids": [iid]})
        assert r.status_code == 200 and r.json()["data"]["restarted_instances"][0]["status"] == "booting"
        wait_status(c, iid, "active")
        ssh_port(fake, iid)  # the SSH server is back
        assert first is not None and wait_for(lambda: first.poll() is not None, what="the old process to die") is not None
        assert fake.instance_process(iid) is None  # cloud-init runs user_data once per instance
        assert (fake.instance_dir(iid) / "runs").read_text() == "ran\n"
        assert c.post("/instance-operations/terminate", json={"instance_ids": [iid]}).status_code == 200
    wait_for(lambda: fake.state()["machines_billing"] == 0, what="nothing billing")


def test_launch_refusals_follow_the_spec(fakes: Fakes) -> None:
    fake = fakes(faults={"unavailable_types": ["gpu_1x_a6000"]})
    _, public = new_key()
    with client(fake) as c:
        add_key(c, "k1", public)
        too_many = launch(c, "k1", quantity=2)
        assert too_many.status_code == 400 and too_many.json()["error"] == {
            "code": "global/invalid-parameters", "message": "Requested too many instances.",
            "suggestion": "Check the request body against the API documentation."}
        assert launch(c, "k1", ssh_key_names=["k1", "k1"]).json()["error"]["code"] == "global/invalid-parameters"
        unknown_key = launch(c, "nobody")
        assert unknown_key.status_code == 404 and "SSH key 'nobody'" in unknown_key.json()["error"]["message"]
        assert launch(c, "k1", instance_type_name="gpu_9x_nothing").status_code == 404
        no_cap = launch(c, "k1", region_name="europe-central-1")  # listed nowhere there
        assert no_cap.status_code == 400
        assert no_cap.json()["error"]["code"] == "instance-operations/launch/insufficient-capacity"
        assert no_cap.json()["error"]["message"] == "Not enough capacity to fulfill launch request."
        assert launch(c, "k1", region_name="us-west-1", instance_type_name="gpu_1x_a6000").json()["error"]["code"] \
            == "instance-operations/launch/insufficient-capacity"
        fakes.allow_bad_requests = True  # the next bodies break the spec on purpose
        assert launch(c, "k1", name="x" * 65).json()["error"]["code"] == "global/invalid-parameters"
        assert launch(c, "k1", tags=[{"key": "Bad Key", "value": "v"}]).status_code == 400
        assert launch(c, "k1", region_name="mars-1").status_code == 400
    assert fake.state()["machines"] == [] and fake.state()["machines_billing"] == 0


def test_ssh_keys_and_the_firewall(fakes: Fakes) -> None:
    fake = fakes()
    _, public = new_key()
    with client(fake) as c:
        mine = add_key(c, "mine", public)
        assert mine["name"] == "mine" and mine["public_key"] == public and "private_key" not in mine
        generated = c.post("/ssh-keys", json={"name": "generated"}).json()["data"]
        assert generated["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert c.post("/ssh-keys", json={"name": "mine", "public_key": public}).status_code == 400  # name in use
        assert c.post("/ssh-keys", json={"name": "bad", "public_key": "not a key"}).status_code == 400
        assert sorted(k["name"] for k in c.get("/ssh-keys").json()["data"]) == ["generated", "mine"]
        assert c.delete(f"/ssh-keys/{mine['id']}").json() == {"data": {}}
        gone = c.delete(f"/ssh-keys/{mine['id']}")
        assert gone.status_code == 400 and "does not exist" in gone.json()["error"]["message"]
        assert fake.ssh_key_names() == ["generated"]
        rules = c.get("/firewall-rules").json()["data"]
        assert rules == [{"protocol": "tcp", "port_range": [22, 22], "source_network": "0.0.0.0/0",
                          "description": "Allow SSH from anywhere"}]  # only SSH is open by default
        assert fake.state()["firewall_changes"] == 0
        assert c.put("/firewall-rules", json={"data": rules}).status_code == 200
        assert fake.state()["firewall_changes"] == 1  # account-wide: a client must never do this unasked


def test_rate_limits_answer_cloudflares_429_and_are_counted(fakes: Fakes) -> None:
    fake = fakes(rate_limit=True)  # the defaults: ~1 request/s (a burst of 2), one launch per 12 s
    with client(fake) as c:
        statuses = [c.get("/instances").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        r = c.get("/instances")
        assert r.status_code == 429 and r.text == "error code: 1015" and r.headers["content-type"].startswith("text/plain")
        assert "retry-after" not in r.headers
    assert [v["window"] for v in fake.ledger.rate_limit_violations()] == ["request", "request"]

    fast = fakes(rate_limit=True, request_rate=100.0, request_burst=100.0)  # launches only
    _, public = new_key()
    with client(fast) as c:
        add_key(c, "k", public)
        assert launch(c, "k").status_code == 200
        assert launch(c, "k", name="job-2").status_code == 429  # within 12 s of the first
    assert [v["window"] for v in fast.ledger.rate_limit_violations()] == ["launch"]
    assert fast.state()["machines_billing"] == 1

    cli = LambdaFake(rate_limits=[RateWindow("second", 5, 1.0), RateWindow("launch", 1, 3.0)])  # the CLI's options
    assert (cli.requests_bucket.rate, cli.launch_bucket.rate) == (5.0, pytest.approx(1 / 3))
    assert LambdaFake(rate_limits=[]).rate_limit is False


def test_faults_each_leave_the_ledger_right(fakes: Fakes) -> None:
    fake = fakes(faults={"fail_but_created": 1})
    _, public = new_key()
    with client(fake) as c:
        add_key(c, "k", public)
        ghost = launch(c, "k")
        assert ghost.status_code == 500 and ghost.json()["error"]["code"] == "global/internal-error"
        (ghost_id,) = fake.instance_ids()  # made anyway, and billing
        assert fake.state()["machines_billing"] == 1

        fake.inject(capacity_errors=1, quota_errors=1)
        assert launch(c, "k").json()["error"]["code"] == "global/quota-exceeded"
        assert launch(c, "k").json()["error"]["code"] == "instance-operations/launch/insufficient-capacity"

        fake.inject(terminate_failures=1)
        failed = c.post("/instance-operations/terminate", json={"instance_ids": [ghost_id]})
        assert failed.status_code == 500 and fake.state()["machines_billing"] == 1  # it stays

        fake.inject(server_errors={"count": 1, "method": "GET"}, rate_limit_burst=1)
        assert c.get("/instances").status_code == 429
        down = c.get("/instances")
        assert down.status_code == 503 and down.json()["error"]["code"] == "provider/internal-unavailable"
        fake.inject(drop_connections={"count": 1})
        with pytest.raises(httpx.TransportError):
            c.get("/instances")

        # preemption: vanish (gone, no bill), preempted (status, no bill), unhealthy (still bills)
        ids = []
        for name in ("p1", "p2", "p3"):
            ids.append(launch(c, "k", name=name).json()["data"]["instance_ids"][0])
        for iid in ids:
            wait_status(c, iid, "active")
        assert fake.preempt(ids[0], "vanish") and c.get(f"/instances/{ids[0]}").status_code == 404
        assert fake.preempt(ids[1], "preempted")
        assert c.get(f"/instances/{ids[1]}").json()["data"]["status"] == "preempted"
        assert fake.preempt(ids[2], "unhealthy")
        assert c.get(f"/instances/{ids[2]}").json()["data"]["status"] == "unhealthy"
        billing = {m["id"] for m in fake.state()["billing"]}
        assert billing == {ghost_id, ids[2]}
        wait_for(lambda: c.get(f"/instances/{ids[1]}").status_code == 404, what="the preempted one to go")

        fake.inject(preempt_after_active={"count": 1, "seconds": 0.1, "mode": "vanish"})
        late = launch(c, "k", name="late").json()["data"]["instance_ids"][0]
        wait_for(lambda: c.get(f"/instances/{late}").status_code == 404, what="the late preemption")

        for iid in (ghost_id, ids[2]):
            assert c.post("/instance-operations/terminate", json={"instance_ids": [iid]}).status_code == 200
    wait_for(lambda: fake.state()["machines_billing"] == 0, what="nothing billing")
    reasons = sorted(m["gone_reason"] for m in fake.state()["machines"])
    assert reasons == ["preempted", "preempted", "preempted", "terminated", "terminated"]


def test_faults_can_be_armed_over_http(fakes: Fakes) -> None:
    fake = fakes()
    r = httpx.post(f"{fake.base_url}/_fake/faults", json={"capacity_errors": 2, "unavailable_types": ["gpu_1x_a10"]})
    assert r.status_code == 200 and r.json()["faults"] == {"capacity_errors": {"count": 2}}
    assert fake.state()["unavailable_types"] == ["gpu_1x_a10"]
    bad = httpx.post(f"{fake.base_url}/_fake/faults", json={"meteor": 1})
    assert bad.status_code == 400 and "unknown faults" in bad.json()["error"]
    assert httpx.post(f"{fake.base_url}/_fake/faults", json={"clear": True}).json()["faults"] == {}


@pytest.mark.parametrize("mode", ["halt", "terminate"])
def test_shutdown_on_the_machine_halts_it_and_a_halted_vm_still_bills(fakes: Fakes, tmp_path: Path, mode: str) -> None:
    """Lambda has no stop: ``sudo shutdown -h now`` halts the VM but does not end its bill (``halt``, the
    default); ``shutdown="terminate"`` rehearses a provider where it would."""
    fake = fakes(shutdown=mode, work_dir=tmp_path / "vms")
    _, public = new_key()
    script = "#!/bin/sh\nsleep 0.3\nsudo -n shutdown -h now\nsleep 60\n"
    with client(fake) as c:
        add_key(c, "k", public)
        iid = launch(c, "k", user_data=script).json()["data"]["instance_ids"][0]
        wait_status(c, iid, "active")
        proc = fake.instance_process(iid)
        assert proc is not None
        if mode == "halt":
            wait_status(c, iid, "unhealthy")
            wait_for(lambda: proc.poll() is not None, what="the machine's processes to die")
            assert fake.state()["machines_billing"] == 1  # halted, and still billing
            assert fake.state()["instances"][0]["halted"] is True
            assert httpx.get(f"{fake.base_url}/_fake/ssh-port/{iid}").status_code == 404
            c.post("/instance-operations/terminate", json={"instance_ids": [iid]})
        wait_for(lambda: c.get(f"/instances/{iid}").status_code == 404, what="the instance to be gone")
    assert fake.state()["machines_billing"] == 0
    # another machine's token is refused
    assert httpx.post(f"{fake.base_url}/_fake/instances/{iid}/shutdown", headers={"X-Fake-Token": "x"}).status_code == 403


def test_the_cli_serves_a_lambda_fake(tmp_path: Path) -> None:
    proc = subprocess.Popen([PY, "-m", "trainorch_jupyter.fakes", "lambda", "--port", "0", "--no-rate-limit",
                             "--work-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        r = httpx.get(url + "/api/v1/instance-types", headers={"Authorization": "Bearer any"})
        assert r.status_code == 200 and "gpu_1x_a10" in r.json()["data"]
        assert httpx.get(url + "/_fake/state").json()["provider"] == "lambda"
    finally:
        proc.terminate()
        proc.wait(10)
