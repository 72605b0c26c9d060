"""The runner (PROTOCOL.md section 2) as a real subprocess on loopback, spoken to over raw HTTP."""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runner_fixtures import (
    PY,
    RUNNER_PY,
    RunningRunner,
    group_pids,
    pid_alive,
    py_command,
    running,
    start_runner,
    wait_exited,
    wait_for,
)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[RunningRunner]:
    with running(tmp_path / "state") as r:
        yield r


@pytest.fixture
def client(runner: RunningRunner) -> Iterator[httpx.Client]:
    with runner.client() as c:
        yield c


def raw_get(runner: RunningRunner, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET with the path sent exactly as given (httpx would normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=30)
    try:
        conn.request("GET", path, headers={**runner.headers(), **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start(client: httpx.Client, command: list[str], **kwargs: object) -> dict:
    r = client.post("/v1/start", json={"command": command, **kwargs})
    assert r.status_code == 200, r.text
    return r.json()


def read_all_logs(client: httpx.Client, offset: int = 0, limit: int | None = None) -> tuple[bytes, list[bytes]]:
    chunks: list[bytes] = []
    while True:
        params: dict[str, object] = {"offset": offset, "wait": 5}
        if limit:
            params["limit"] = limit
        r = client.get("/v1/logs", params=params)
        assert r.status_code == 200, r.text
        chunks.append(r.content)
        assert int(r.headers["X-Next-Offset"]) == offset + len(r.content)
        offset = int(r.headers["X-Next-Offset"])
        if r.headers["X-Log-Complete"] == "1":
            return b"".join(chunks), chunks


# ------------------------------------------------------------------------------------ startup, auth


def test_refuses_to_start_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRAINORCH_RUNNER_TOKEN"}
    proc = subprocess.run([PY, str(RUNNER_PY), "--state-dir", str(tmp_path / "s")], env=env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"TRAINORCH_RUNNER_TOKEN" in proc.stderr
    assert not (tmp_path / "s" / "runner.json").exists()


def test_runner_json_health_and_layout(runner: RunningRunner, client: httpx.Client) -> None:
    info = json.loads((runner.state_dir / "runner.json").read_text())
    assert info["pid"] == runner.proc.pid and info["host"] == "127.0.0.1" and info["port"] > 0
    assert info["url"] == f"http://127.0.0.1:{info['port']}"
    assert client.get("/v1/health").json() == {"ok": True, "version": "1", "state": "idle",
                                               "max_upload_bytes": 64 << 30}
    for d in ("inputs", "output", "work"):
        assert (runner.state_dir / d).is_dir()
    st = client.get("/v1/status").json()
    assert st["state"] == "idle" and st["pid"] is None and st["exit_code"] is None
    assert client.get("/v1/manifest").status_code == 409
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json() == {"error": "not found"}


def test_module_entry_point(tmp_path: Path) -> None:
    with running(tmp_path / "m", module=True) as r, r.client() as c:
        assert c.get("/v1/health").json()["ok"] is True


ENDPOINTS = [
    ("GET", "/v1/health"), ("GET", "/v1/status"), ("PUT", "/v1/inputs/x"), ("POST", "/v1/start"),
    ("GET", "/v1/logs?offset=0"), ("GET", "/v1/metrics?offset=0"), ("POST", "/v1/cancel"),
    ("GET", "/v1/manifest"), ("GET", "/v1/files/a.bin"), ("POST", "/v1/shutdown"), ("GET", "/nope"),
    ("GET", "/v1/files/../../etc/passwd"), ("DELETE", "/v1/status"),
]


def test_auth_required_on_every_endpoint(runner: RunningRunner) -> None:
    bads: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {runner.token}x"},
        {"Authorization": f"Basic {runner.token}"},
        {"Authorization": runner.token},
        {"Authorization": "Bearer"},
    ]
    with httpx.Client(base_url=runner.url, timeout=30) as c:
        for method, path in ENDPOINTS:
            for headers in bads:
                r = c.request(method, path, headers={**headers, "X-Sha256": "0" * 64},
                              content=b'{"command": ["true"]}' if method != "GET" else None)
                assert r.status_code == 401, (method, path, headers)
                assert r.json() == {"error": "unauthorized"}
    # nothing happened: no input, no start, still serving
    with runner.client() as c:
        assert c.get("/v1/health").json()["state"] == "idle"
    assert not any((runner.state_dir / "inputs").iterdir())
    assert runner.token not in runner.stderr_path.read_text()


# ------------------------------------------------------------------------------------ inputs


def test_upload_good_and_bad_hash(runner: RunningRunner, client: httpx.Client) -> None:
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    r = client.put("/v1/inputs/train.jsonl", content=data, headers={"X-Sha256": sha})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "train.jsonl", "size": len(data), "sha256": sha}
    assert (runner.state_dir / "inputs" / "train.jsonl").read_bytes() == data

    # wrong hash: 400, nothing replaced, no temp file left
    r = client.put("/v1/inputs/train.jsonl", content=b"other", headers={"X-Sha256": sha})
    assert r.status_code == 400 and "sha256" in r.json()["error"]
    assert (runner.state_dir / "inputs" / "train.jsonl").read_bytes() == data
    r = client.put("/v1/inputs/new.bin", content=b"other", headers={"X-Sha256": "ab" * 32})
    assert r.status_code == 400
    assert not (runner.state_dir / "inputs" / "new.bin").exists()
    assert not list((runner.state_dir / "tmp").iterdir())
    # missing / malformed header
    assert client.put("/v1/inputs/a", content=b"x").status_code == 400
    assert client.put("/v1/inputs/a", content=b"x", headers={"X-Sha256": "xyz"}).status_code == 400
    # a chunked body (no Content-Length) works too
    body = [b"hello ", b"chunked ", b"world"]
    r = client.put("/v1/inputs/chunked.txt", content=iter(body),
                   headers={"X-Sha256": hashlib.sha256(b"".join(body)).hexdigest()})
    assert r.status_code == 200, r.text
    assert (runner.state_dir / "inputs" / "chunked.txt").read_bytes() == b"hello chunked world"
    # the connection is still usable after all these errors
    assert client.get("/v1/health").status_code == 200


@pytest.mark.parametrize("name", ["..", ".", "a%2Fb", "%2e%2e", "..%2Fx", "%00", "a%5Cb", "sub/x"])
def test_upload_rejects_bad_names(runner: RunningRunner, name: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=30)
    try:
        conn.request("PUT", f"/v1/inputs/{name}", body=b"x",
                     headers={**runner.headers(), "X-Sha256": hashlib.sha256(b"x").hexdigest()})
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (400, 404, 405), resp.status
    finally:
        conn.close()
    assert not any(p.name != "inputs" for p in (runner.state_dir / "inputs").iterdir())
    assert sorted(p.name for p in runner.state_dir.iterdir()) == [
        "inputs", "output", "runner.json", "runner.lock", "tmp", "work"]


# ------------------------------------------------------------------------------------ start


def test_start_env_cwd_and_409(runner: RunningRunner, client: httpx.Client) -> None:
    data = b"input data\n"
    assert client.put("/v1/inputs/in.txt", content=data,
                      headers={"X-Sha256": hashlib.sha256(data).hexdigest()}).status_code == 200
    code = (
        "import os, sys, json\n"
        "print(json.dumps({'cwd': os.getcwd(), 'out': os.environ['TRAINORCH_OUTPUT_DIR'],\n"
        " 'in': os.environ['TRAINORCH_INPUT_DIR'], 'mine': os.environ.get('MY_VAR'),\n"
        " 'unbuf': os.environ.get('PYTHONUNBUFFERED'), 'stdin': sys.stdin.read(),\n"
        " 'input': open(os.path.join(os.environ['TRAINORCH_INPUT_DIR'], 'in.txt')).read(),\n"
        " 'env': dict(os.environ), 'pgid': os.getpgid(0), 'pid': os.getpid()}))\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    res = start(client, py_command(code), env={"MY_VAR": "hello", "PYTHONUNBUFFERED": "0"})
    assert res["state"] == "running" and isinstance(res["pid"], int)
    r = client.post("/v1/start", json={"command": ["true"]})
    assert r.status_code == 409 and "already" in r.json()["error"]
    r = client.put("/v1/inputs/late.txt", content=b"x", headers={"X-Sha256": hashlib.sha256(b"x").hexdigest()})
    assert r.status_code == 409
    st = wait_exited(client)
    assert st["exit_code"] == 0 and st["signal"] is None and st["cancelled"] is False and st["timed_out"] is False
    assert st["started_at"] <= st["ended_at"]
    log, _ = read_all_logs(client)
    first, second = log.decode().splitlines()
    info = json.loads(first)
    assert second == "to stderr"
    assert info["cwd"] == str(runner.state_dir / "work")
    assert info["out"] == str(runner.state_dir / "output") and info["in"] == str(runner.state_dir / "inputs")
    assert info["mine"] == "hello" and info["unbuf"] == "1" and info["stdin"] == ""
    assert info["input"] == "input data\n"
    assert info["pgid"] == info["pid"] == res["pid"]  # its own process group
    assert "TRAINORCH_RUNNER_TOKEN" not in info["env"]
    assert runner.token not in log.decode()
    assert runner.status_file() == {k: v for k, v in st.items()} | {"log_size": runner.status_file()["log_size"],
                                                                      "metrics_size": 0}
    assert client.post("/v1/start", json={"command": ["true"]}).status_code == 409


def test_start_expands_only_the_two_dir_placeholders(runner: RunningRunner, client: httpx.Client) -> None:
    code = "import sys\nprint(sys.argv[1:])"
    start(client, [*py_command(code), "${TRAINORCH_INPUT_DIR}/data.jsonl", "--out=${TRAINORCH_OUTPUT_DIR}",
                   "$HOME", "${PATH}"])
    assert wait_exited(client)["exit_code"] == 0
    log, _ = read_all_logs(client)
    args = eval(log.decode().strip())  # the list printed by the command
    assert args == [f"{runner.state_dir / 'inputs'}/data.jsonl", f"--out={runner.state_dir / 'output'}",
                    "$HOME", "${PATH}"]


def test_progress_bar_carriage_returns_are_readable_live(runner: RunningRunner, client: httpx.Client) -> None:
    code = ("import sys, time\nfor i in range(3):\n    sys.stdout.write(f'progress {i}/3\\r'); sys.stdout.flush()\n"
            "sys.stdout.write('half a line'); sys.stdout.flush()\ntime.sleep(30)")
    start(client, py_command(code))
    got = b""
    offset = 0
    deadline = time.monotonic() + 15
    while b"progress 2/3\r" not in got and time.monotonic() < deadline:
        r = client.get("/v1/logs", params={"offset": offset, "wait": 2})
        got += r.content
        offset = int(r.headers["X-Next-Offset"])
    # Every redraw arrives while the command runs; the unfinished "half a line" waits for its end.
    assert got == b"progress 0/3\rprogress 1/3\rprogress 2/3\r"
    client.post("/v1/cancel", json={"grace_s": 1})
    wait_exited(client)


def test_start_validation_and_failure(runner: RunningRunner, client: httpx.Client) -> None:
    for body in ({}, {"command": []}, {"command": "true"}, {"command": [1]}, {"command": ["true"], "env": {"A": 1}},
                 {"command": ["true"], "max_runtime_s": -1}, {"command": ["true"], "grace_s": "x"}):
        r = client.post("/v1/start", json=body)
        assert r.status_code == 400, body
    assert client.post("/v1/start", content=b"not json").status_code == 400
    assert client.get("/v1/status").json()["state"] == "idle"
    # a command that cannot be started: 400, then the job is over with exit code 127
    r = client.post("/v1/start", json={"command": ["/nonexistent/definitely-not-here"]})
    assert r.status_code == 400 and "could not start" in r.json()["error"]
    st = client.get("/v1/status").json()
    assert st["state"] == "exited" and st["exit_code"] == 127 and "could not start" in st["error"]
    log, _ = read_all_logs(client)
    assert b"could not start" in log
    assert client.get("/v1/manifest").json() == {"files": [], "total_size": 0, "exit_code": 127}


def test_failing_command_exit_code(client: httpx.Client, runner: RunningRunner) -> None:
    start(client, py_command("import sys; print('bye'); sys.exit(3)"))
    st = wait_exited(client)
    assert st["exit_code"] == 3 and st["signal"] is None and st["error"] is None
    assert runner.status_file()["exit_code"] == 3
    assert client.get("/v1/health").json()["state"] == "exited"
    assert client.get("/v1/manifest").json()["exit_code"] == 3


# ------------------------------------------------------------------------------------ logs


N_LINES = 20_000
FLOOD = (
    "import sys, time\nw = sys.stdout.write\n"
    f"for i in range({N_LINES}):\n"
    "    w('line %05d ' % i + 'x' * (i % 37) + '\\n')\n"
    "    if i % 2500 == 2499: sys.stdout.flush(); time.sleep(0.03)\n"
)


def expected_flood() -> bytes:
    return b"".join(b"line %05d " % i + b"x" * (i % 37) + b"\n" for i in range(N_LINES))


def test_20000_lines_each_exactly_once_with_reconnect(runner: RunningRunner) -> None:
    with runner.client() as c1:
        start(c1, py_command(FLOOD))
        got: list[bytes] = []
        offset = 0
        # follow while it runs, a few chunks on the first connection...
        for _ in range(5):
            r = c1.get("/v1/logs", params={"offset": offset, "wait": 5, "limit": 4096})
            assert r.status_code == 200 and r.headers["X-Log-Complete"] == "0"
            data = r.content
            assert 0 < len(data) <= 4096
            assert data.endswith(b"\n")
            got.append(data)
            offset = int(r.headers["X-Next-Offset"])
    # ...then "reconnect" with a new connection from the last offset
    with runner.client() as c2:
        rest, chunks = read_all_logs(c2, offset, limit=8192)
        for ch in chunks[:-1]:
            assert ch.endswith(b"\n")
        log = b"".join(got) + rest
    assert log == expected_flood()
    assert (runner.state_dir / "job.log").read_bytes() == log
    st = runner.status_file()
    assert st["exit_code"] == 0 and st["log_size"] == len(log)


def test_long_poll_wakes_on_data_and_times_out_without(runner: RunningRunner, client: httpx.Client) -> None:
    start(client, py_command("import time, sys\ntime.sleep(1.0)\nprint('hello')\ntime.sleep(60)"), grace_s=2)
    t0 = time.monotonic()
    r = client.get("/v1/logs", params={"offset": 0, "wait": 20})
    woke = time.monotonic() - t0
    assert r.content == b"hello\n" and r.headers["X-Next-Offset"] == "6" and r.headers["X-Log-Complete"] == "0"
    assert 0.5 < woke < 15  # it waited for the line and came back once it arrived, well before 20 s
    t0 = time.monotonic()
    r = client.get("/v1/logs", params={"offset": 6, "wait": 1})
    waited = time.monotonic() - t0
    assert r.content == b"" and r.headers["X-Next-Offset"] == "6" and r.headers["X-Log-Complete"] == "0"
    assert 0.8 < waited < 10
    # wait=0 answers at once; the metrics long-poll times out the same way
    r = client.get("/v1/metrics", params={"offset": 0, "wait": 0.5})
    assert r.json() == {"metrics": [], "next_offset": 0, "complete": False}
    assert client.get("/v1/logs", params={"offset": 10_000}).status_code == 400
    assert client.get("/v1/logs", params={"offset": -1}).status_code == 400
    client.post("/v1/cancel")
    wait_exited(client)
    r = client.get("/v1/logs", params={"offset": 6, "wait": 20})
    assert r.content == b"" and r.headers["X-Log-Complete"] == "1"


def test_partial_and_huge_lines(runner: RunningRunner, client: httpx.Client) -> None:
    code = (
        "import sys, time, os\n"
        "sys.stdout.write('x' * (3 * 1024 * 1024 + 5)); sys.stdout.flush()\n"
        "sys.stdout.write('\\nend without newline'); sys.stdout.flush()\n"
        "open(os.path.join(os.environ['TRAINORCH_OUTPUT_DIR'], 'ready'), 'w').close()\n"
        "time.sleep(1.5)\n"
    )
    start(client, py_command(code))
    wait_for(lambda: (runner.state_dir / "output" / "ready").exists(), what="the huge line")
    offset = 0
    pieces = []
    while offset < 3 * 1024 * 1024:
        r = client.get("/v1/logs", params={"offset": offset, "wait": 5})
        assert r.headers["X-Log-Complete"] == "0"
        pieces.append(r.content)
        offset = int(r.headers["X-Next-Offset"])
    # a line longer than the limit comes in limit-sized pieces; then the rest of it with its newline
    assert [len(p) for p in pieces[:3]] == [1 << 20] * 3
    r = client.get("/v1/logs", params={"offset": offset, "wait": 0})
    assert r.content == b"x" * 5 + b"\n"
    offset = int(r.headers["X-Next-Offset"])
    # the unfinished last line is held back while the command runs...
    r = client.get("/v1/logs", params={"offset": offset, "wait": 0.3})
    assert r.content == b"" and r.headers["X-Log-Complete"] == "0"
    wait_exited(client)
    # ...and given once it exited
    r = client.get("/v1/logs", params={"offset": offset, "wait": 0})
    assert r.content == b"end without newline" and r.headers["X-Log-Complete"] == "1"


# ------------------------------------------------------------------------------------ metrics


def test_metrics_parsing(runner: RunningRunner, client: httpx.Client) -> None:
    code = (
        "import json\n"
        "for i in range(3):\n"
        "    print('TRAINORCH_METRIC ' + json.dumps({'step': i, 'loss': 1.0 / (i + 1)}))\n"
        "    print('plain line', i)\n"
        "print('TRAINORCH_METRIC {not json')\n"
        "print('TRAINORCH_METRIC [1, 2]')\n"
        "print('say TRAINORCH_METRIC {\"step\": 99}')\n"
        "print('TRAINORCH_METRIC' + json.dumps({'step': 98}))\n"
        "print('TRAINORCH_METRIC ' + json.dumps({'kind': 'summary', 'text': 'h\u00e9'}), end='\\r\\n')\n"
    )
    start(client, py_command(code))
    wait_exited(client)
    r = client.get("/v1/metrics", params={"offset": 0})
    body = r.json()
    assert body["complete"] is True
    assert body["metrics"] == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 1 / 3},
                               {"kind": "summary", "text": "h\u00e9"}]
    assert body["next_offset"] == (runner.state_dir / "metrics.jsonl").stat().st_size
    log = (runner.state_dir / "job.log").read_bytes()
    assert b"TRAINORCH_METRIC {not json\n" in log and b"TRAINORCH_METRIC [1, 2]\n" in log
    assert log.count(b"TRAINORCH_METRIC ") == 7
    # by offset: start from the second metric
    lines = (runner.state_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    second = len(lines[0])
    body = client.get("/v1/metrics", params={"offset": second}).json()
    assert [m.get("step") for m in body["metrics"]] == [1, 2, None]
    assert client.get("/v1/metrics", params={"offset": second + 1}).status_code == 400
    end = client.get("/v1/metrics", params={"offset": body["next_offset"], "wait": 5}).json()
    assert end == {"metrics": [], "next_offset": body["next_offset"], "complete": True}


# ------------------------------------------------------------------------------------ cancel, timeouts

GROUP_CODE = (
    "import subprocess, sys, time, os, signal\n"
    "{pre}"
    "child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
    "print('pids', os.getpid(), child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _pids_from_log(client: httpx.Client) -> list[int]:
    def found() -> list[int] | None:
        r = client.get("/v1/logs", params={"offset": 0, "wait": 2})
        for line in r.content.decode().splitlines():
            if line.startswith("pids "):
                return [int(x) for x in line.split()[1:]]
        return None

    return wait_for(found, what="the pids line")


def test_cancel_sleeping_command_kills_the_whole_group(runner: RunningRunner, client: httpx.Client) -> None:
    code = GROUP_CODE.format(pre="", child="import time; time.sleep(60)")
    res = start(client, py_command(code), grace_s=5)
    pids = _pids_from_log(client)
    assert pids[0] == res["pid"]
    assert sorted(group_pids(res["pid"])) == sorted(pids)
    t0 = time.monotonic()
    st = client.post("/v1/cancel").json()
    assert st["cancelled"] is True
    st = wait_exited(client, timeout=30)
    assert time.monotonic() - t0 < 5 + 10  # within the grace period (plus generous slack)
    assert st["cancelled"] is True and st["timed_out"] is False
    assert st["exit_code"] == -signal.SIGTERM and st["signal"] == signal.SIGTERM
    for pid in pids:
        assert not pid_alive(pid), pid
    assert group_pids(res["pid"]) == []
    # idempotent
    again = client.post("/v1/cancel", json={"grace_s": 0}).json()
    assert again == client.get("/v1/status").json()
    assert again["exit_code"] == st["exit_code"] and again["cancelled"] is True


def test_sigterm_ignored_gets_sigkill_after_grace(runner: RunningRunner, client: httpx.Client) -> None:
    pre = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    res = start(client, py_command(GROUP_CODE.format(pre=pre, child=child)), grace_s=30)
    pids = _pids_from_log(client)
    t0 = time.monotonic()
    client.post("/v1/cancel", json={"grace_s": 1})  # the cancel's own grace wins
    time.sleep(0.3)
    assert all(pid_alive(p) for p in pids)  # SIGTERM ignored
    st = wait_exited(client, timeout=30)
    assert time.monotonic() - t0 >= 0.9
    assert st["exit_code"] == -signal.SIGKILL and st["cancelled"] is True
    assert not any(pid_alive(p) for p in pids)
    assert group_pids(res["pid"]) == []


def test_max_runtime_times_out(runner: RunningRunner, client: httpx.Client) -> None:
    start(client, py_command("import time; print('start', flush=True); time.sleep(60)"), max_runtime_s=1, grace_s=1)
    st = wait_exited(client, timeout=30)
    assert st["timed_out"] is True and st["cancelled"] is False
    assert st["exit_code"] == -signal.SIGTERM
    assert 0.9 <= st["ended_at"] - st["started_at"] < 20
    assert runner.status_file()["timed_out"] is True


def test_background_leftovers_are_killed_after_exit(runner: RunningRunner, client: httpx.Client) -> None:
    code = ("import subprocess, sys\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('pids', c.pid, flush=True)\n")
    res = start(client, py_command(code))
    st = wait_exited(client, timeout=30)
    assert st["exit_code"] == 0
    assert group_pids(res["pid"]) == []
    log, _ = read_all_logs(client)
    assert log.startswith(b"pids ")


def test_cancel_before_start(client: httpx.Client) -> None:
    st = client.post("/v1/cancel").json()
    assert st["state"] == "exited" and st["cancelled"] is True
    assert client.post("/v1/start", json={"command": ["true"]}).status_code == 409
    assert client.get("/v1/logs", params={"offset": 0}).headers["X-Log-Complete"] == "1"


# ------------------------------------------------------------------------------------ manifest, files

WRITE_OUTPUT = (
    "import os, sys, time\n"
    "out = os.environ['TRAINORCH_OUTPUT_DIR']\n"
    "os.makedirs(os.path.join(out, 'sub', 'deep'))\n"
    "open(os.path.join(out, 'adapter_model.safetensors'), 'wb').write(os.urandom(200_003))\n"
    "open(os.path.join(out, 'sub', 'deep', 'a b#c.json'), 'w').write('{\"x\": 1}')\n"
    "open(os.path.join(out, 'empty'), 'wb').close()\n"
    "os.symlink('/etc/passwd', os.path.join(out, 'evil'))\n"
    "os.symlink(os.path.join(out, 'empty'), os.path.join(out, 'inner_link'))\n"
    "os.symlink('/etc', os.path.join(out, 'evildir'))\n"
    "print('TRAINORCH_METRIC {\"step\": 1}')\n"
    "time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)\n"
)


def expected_manifest(out: Path) -> list[dict]:
    files = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            files.append({"path": p.relative_to(out).as_posix(), "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    return sorted(files, key=lambda f: f["path"])


def test_manifest_files_ranges_and_traversal(runner: RunningRunner, client: httpx.Client) -> None:
    start(client, [PY, "-c", WRITE_OUTPUT, "0.7"])
    assert client.get("/v1/manifest").status_code == 409
    assert client.get("/v1/files/empty").status_code == 409
    wait_exited(client)
    out = runner.state_dir / "output"
    manifest = client.get("/v1/manifest").json()
    files = expected_manifest(out)
    assert manifest == {"files": files, "total_size": sum(f["size"] for f in files), "exit_code": 0}
    assert [f["path"] for f in files] == ["adapter_model.safetensors", "empty", "sub/deep/a b#c.json"]
    assert json.loads((runner.state_dir / "manifest.json").read_text()) == manifest

    big = (out / "adapter_model.safetensors").read_bytes()
    r = client.get("/v1/files/adapter_model.safetensors")
    assert r.status_code == 200 and r.content == big
    assert r.headers["Accept-Ranges"] == "bytes" and r.headers["Content-Length"] == str(len(big))
    assert r.headers["ETag"] == f'"{hashlib.sha256(big).hexdigest()}"'
    r = client.head("/v1/files/adapter_model.safetensors")
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(big)) and r.content == b""
    r = client.get("/v1/files/sub/deep/a%20b%23c.json")
    assert r.status_code == 200 and r.content == b'{"x": 1}'
    r = client.get("/v1/files/empty")
    assert r.status_code == 200 and r.content == b""

    r = client.get("/v1/files/adapter_model.safetensors", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == big[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(big)}" and r.headers["Content-Length"] == "100"
    r = client.get("/v1/files/adapter_model.safetensors", headers={"Range": "bytes=150000-"})
    assert r.status_code == 206 and r.content == big[150000:]
    assert r.headers["Content-Range"] == f"bytes 150000-{len(big) - 1}/{len(big)}"
    r = client.get("/v1/files/adapter_model.safetensors", headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == big[-10:]
    r = client.get("/v1/files/adapter_model.safetensors", headers={"Range": f"bytes={len(big)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(big)}"
    r = client.get("/v1/files/empty", headers={"Range": "bytes=0-"})
    assert r.status_code == 416
    # the connection survives all of it
    assert client.get("/v1/health").status_code == 200

    outside = [
        "/v1/files/../status.json", "/v1/files/../../../etc/passwd", "/v1/files/%2e%2e/status.json",
        "/v1/files/%2E%2E%2Fstatus.json", "/v1/files/..%2f..%2fetc%2fpasswd", "/v1/files//etc/passwd",
        "/v1/files/%2Fetc%2Fpasswd", "/v1/files/evil", "/v1/files/evildir/passwd", "/v1/files/inner_link",
        "/v1/files/sub/../empty", "/v1/files/./empty", "/v1/files/sub//deep/a%20b%23c.json",
        "/v1/files/%252e%252e/status.json", "/v1/files/", "/v1/files/sub", "/v1/files/%ff",
        "/v1/files/empty%00", f"/v1/files/{runner.state_dir}/status.json",
    ]
    for path in outside:
        status, body = raw_get(runner, path)
        assert status == 404, (path, status, body)
        assert b"root:" not in body and b'"state"' not in body


def _range_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRunner, bytes]]:
    r = start_runner(tmp_path_factory.mktemp("range") / "state")
    try:
        with r.client() as c:
            start(c, py_command("import os\nopen(os.path.join(os.environ['TRAINORCH_OUTPUT_DIR'], 'f.bin'), 'wb')"
                                ".write(bytes(range(256)) * 20 + b'tail')"))
            wait_exited(c)
        yield r, bytes(range(256)) * 20 + b"tail"
    finally:
        r.stop()


range_runner = pytest.fixture(scope="module")(_range_runner)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.integers(0, 5200), last=st.one_of(st.none(), st.integers(0, 5200)), suffix=st.booleans())
def test_range_property(range_runner: tuple[RunningRunner, bytes], first: int, last: int | None,
                        suffix: bool) -> None:
    runner, data = range_runner
    size = len(data)
    if suffix:
        header = f"bytes=-{first}"
    else:
        header = f"bytes={first}-" + ("" if last is None else str(last))
    with httpx.Client(base_url=runner.url, headers=runner.headers(), timeout=30) as c:
        r = c.get("/v1/files/f.bin", headers={"Range": header})
    if suffix:
        if first == 0:
            assert r.status_code == 416
            return
        want = data[-first:]
        start_at = size - len(want)
    elif last is not None and last < first:
        assert r.status_code == 200 and r.content == data  # an invalid range is ignored
        return
    elif first >= size:
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
        return
    else:
        want = data[first:] if last is None else data[first : last + 1]
        start_at = first
    assert r.status_code == 206
    assert r.content == want
    assert r.headers["Content-Range"] == f"bytes {start_at}-{start_at + len(want) - 1}/{size}"
    assert int(r.headers["Content-Length"]) == len(want)


# ------------------------------------------------------------------------------------ restart, shutdown


def test_restart_serves_previous_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running(state) as r1, r1.client() as c:
        start(c, [PY, "-c", FLOOD + WRITE_OUTPUT])
        wait_exited(c)
        log1, _ = read_all_logs(c)
        metrics1 = c.get("/v1/metrics", params={"offset": 0}).json()
        manifest1 = c.get("/v1/manifest").json()
        status1 = c.get("/v1/status").json()
        c.post("/v1/shutdown")
        assert r1.proc.wait(20) == 0
    assert not (state / "runner.json").exists()
    with running(state) as r2, r2.client() as c:
        assert c.get("/v1/health").json()["state"] == "exited"
        assert c.get("/v1/status").json() == status1
        log2, _ = read_all_logs(c)
        assert log2 == log1 and log2.startswith(expected_flood())
        assert c.get("/v1/metrics", params={"offset": 0}).json() == metrics1 == {
            "metrics": [{"step": 1}], "next_offset": metrics1["next_offset"], "complete": True}
        assert c.get("/v1/manifest").json() == manifest1
        r = c.get("/v1/files/adapter_model.safetensors", headers={"Range": "bytes=0-9"})
        assert r.status_code == 206 and r.content == (state / "output" / "adapter_model.safetensors").read_bytes()[:10]
        assert c.post("/v1/start", json={"command": ["true"]}).status_code == 409


def test_second_runner_on_the_same_state_dir_refuses(runner: RunningRunner, client: httpx.Client) -> None:
    res = start(client, py_command("import time; time.sleep(60)"))
    env = dict(os.environ, TRAINORCH_RUNNER_TOKEN="other")
    proc = subprocess.run([PY, str(RUNNER_PY), "--state-dir", str(runner.state_dir)], env=env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 3 and b"another runner" in proc.stderr
    assert client.get("/v1/status").json()["state"] == "running"
    assert group_pids(res["pid"]) == [res["pid"]]
    assert json.loads((runner.state_dir / "runner.json").read_text())["pid"] == runner.proc.pid


def test_restart_after_runner_was_killed_mid_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r1 = start_runner(state)
    try:
        with r1.client() as c:
            res = start(c, py_command("import time; print('up', flush=True); time.sleep(60)"))
            wait_for(lambda: c.get("/v1/logs", params={"offset": 0, "wait": 1}).content == b"up\n")
        r1.proc.kill()
        r1.proc.wait(10)
        assert group_pids(res["pid"])  # orphaned, still there
        with running(state) as r2, r2.client() as c:
            st = c.get("/v1/status").json()
            assert st["state"] == "exited" and st["exit_code"] is None and "restarted" in st["error"]
            assert group_pids(res["pid"]) == []
            assert read_all_logs(c)[0] == b"up\n"
            assert c.get("/v1/manifest").status_code == 200
    finally:
        r1.job_pgids.append(res["pid"])
        r1.stop()


def test_shutdown_cancels_and_exits(runner: RunningRunner, client: httpx.Client) -> None:
    res = start(client, py_command("import time; time.sleep(60)"), grace_s=2)
    r = client.post("/v1/shutdown")
    assert r.status_code == 200
    assert runner.proc.wait(20) == 0
    assert group_pids(res["pid"]) == []
    st = runner.status_file()
    assert st["state"] == "exited" and st["cancelled"] is True
    assert not (runner.state_dir / "runner.json").exists()


def test_sigterm_to_runner_stops_the_command(runner: RunningRunner, client: httpx.Client) -> None:
    res = start(client, py_command("import time; time.sleep(60)"))
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.proc.wait(20) == 0
    assert group_pids(res["pid"]) == []


def test_idle_timeout_alone_still_bounds_the_time_after_exit(tmp_path: Path) -> None:
    """``--idle-timeout`` without ``--retention`` keeps its old meaning after the command exited."""
    with running(tmp_path / "state", args=("--idle-timeout", "8")) as r:
        with r.client() as c:
            start(c, ["true"])
            wait_exited(c)
        # No exit while a client keeps asking (the retention counts from the last request).
        assert r.proc.poll() is None
        with r.client() as c:
            assert c.get("/v1/manifest").status_code == 200
        assert r.proc.wait(60) == 0
        assert r.status_file()["runner_exit_reason"] == "retention-expired"
        assert r.token not in r.stderr_path.read_text()


# ------------------------------------------------------------------------------------ the runner's life (issue 7.3)


def _hook(tmp_path: Path) -> tuple[str, Path]:
    """An --on-exit hook that records the reason and the token variable it saw."""
    out = tmp_path / "hook.txt"
    return f'echo "$TRAINORCH_EXIT_REASON ${{TRAINORCH_RUNNER_TOKEN:-no-token}}" >> {out}', out


def test_runner_that_never_gets_a_start_exits_after_the_idle_timeout(tmp_path: Path) -> None:
    """Issue 7.3: a runner whose kernel died during provisioning must not live (and bill) for ever."""
    cmd, hook_out = _hook(tmp_path)
    r = start_runner(tmp_path / "state", args=("--idle-timeout", "2", "--retention", "600", "--on-exit", cmd))
    try:
        assert r.proc.wait(60) == 0
        st = r.status_file()
        assert st["state"] == "idle" and st["runner_exit_reason"] == "idle-before-start"
        assert not (r.state_dir / "runner.json").exists()
        assert hook_out.read_text() == "idle-before-start no-token\n"  # once, without the token
        assert "idle-before-start" in r.stderr_path.read_text()
    finally:
        r.stop()


def test_requests_keep_an_idle_runner_alive(tmp_path: Path) -> None:
    with running(tmp_path / "state", args=("--idle-timeout", "4")) as r, r.client() as c:
        for _ in range(12):  # 6 s of requests every 0.5 s: longer than the idle timeout
            assert c.get("/v1/health").status_code == 200
            time.sleep(0.5)
        assert r.proc.poll() is None
        assert r.proc.wait(60) == 0
        assert r.status_file()["runner_exit_reason"] == "idle-before-start"


def test_retention_after_exit_then_the_on_exit_hook(tmp_path: Path) -> None:
    """After the command exited the files stay served for the retention time (from the last request), then
    the runner exits by itself and runs its dead-man hook once, with the reason."""
    cmd, hook_out = _hook(tmp_path)
    r = start_runner(tmp_path / "state", args=("--idle-timeout", "600", "--retention", "2", "--on-exit", cmd))
    try:
        with r.client() as c:
            start(c, py_command("import os; open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/a.txt', 'w').write('a')"))
            wait_exited(c)
            assert c.get("/v1/files/a.txt").content == b"a"
        assert r.proc.wait(60) == 0
        st = r.status_file()
        assert st["state"] == "exited" and st["exit_code"] == 0 and st["runner_exit_reason"] == "retention-expired"
        assert hook_out.read_text() == "retention-expired no-token\n"
        assert "retention-expired" in r.stderr_path.read_text()
    finally:
        r.stop()


def test_retention_counts_from_the_exit_not_from_an_old_request(tmp_path: Path) -> None:
    """A job that ran longer than the retention, with nobody asking meanwhile, still gets its retention."""
    r = start_runner(tmp_path / "state", args=("--idle-timeout", "600", "--retention", "4"))
    try:
        with r.client() as c:
            start(c, py_command("import time; time.sleep(5)"))
        time.sleep(5.5)  # no request while the command runs, longer than the retention
        with r.client() as c:
            st = wait_exited(c)
            assert st["exit_code"] == 0
            assert c.get("/v1/manifest").status_code == 200
        assert r.proc.wait(60) == 0
    finally:
        r.stop()


def test_sigterm_ends_the_runner_without_the_hook_and_shutdown_runs_it(tmp_path: Path) -> None:
    """Decided: a SIGTERM comes from whoever is taking the machine down already (a provider's terminate):
    no hook. POST /v1/shutdown is the runner's life ending on request: the hook runs."""
    cmd, hook_out = _hook(tmp_path)
    r = start_runner(tmp_path / "a", args=("--on-exit", cmd))
    try:
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(30) == 0
        assert r.status_file()["runner_exit_reason"] == "signal"
        assert not hook_out.exists()
    finally:
        r.stop()
    r = start_runner(tmp_path / "b", args=("--on-exit", cmd))
    try:
        with r.client() as c:
            assert c.post("/v1/shutdown").status_code == 200
        assert r.proc.wait(30) == 0
        assert r.status_file()["runner_exit_reason"] == "shutdown-request"
        assert hook_out.read_text() == "shutdown-request no-token\n"
    finally:
        r.stop()


# ------------------------------------------------------------------------------------ metrics after "\r" (issue 7.7)

PROGRESS_THEN_METRICS = r"""
import json, sys, time
from tqdm import tqdm

def metric(step):
    print('TRAINORCH_METRIC ' + json.dumps({'step': step}), flush=True)

# 1. a real tqdm bar on stderr, a metric line printed on stdout after each frame (one pipe for both)
for i in tqdm(range(3), file=sys.stderr, mininterval=0, miniters=1):
    time.sleep(0.01)
    metric(i)
# 2. a hand-drawn frame "\r<bar>" (no line end) on stderr, then the metric on stdout
sys.stderr.write('\r 40%|####      | 2/5'); sys.stderr.flush()
metric(10)
# 3. "\r" within the same stream: a frame ended by "\r", then the metric line
sys.stdout.write('step 4/5\r'); sys.stdout.flush()
metric(11)
# 4. several frames and the metric in one write
sys.stdout.write('\rframe a\rframe b\rTRAINORCH_METRIC {"step": 12}\n'); sys.stdout.flush()
# still not a metric: a line that merely mentions the prefix
print('say TRAINORCH_METRIC {"step": 99}')
"""


def test_metric_lines_after_carriage_return_progress_output(runner: RunningRunner, client: httpx.Client) -> None:
    """Issue 7.7: a tqdm frame on stderr before print("TRAINORCH_METRIC ...") hid the metric."""
    pytest.importorskip("tqdm")
    start(client, py_command(PROGRESS_THEN_METRICS))
    st = wait_exited(client)
    log = (runner.state_dir / "job.log").read_bytes()
    assert st["exit_code"] == 0, log
    body = client.get("/v1/metrics", params={"offset": 0}).json()
    assert [m["step"] for m in body["metrics"]] == [0, 1, 2, 10, 11, 12]
    assert log.count(b"TRAINORCH_METRIC ") == 7  # and every line stays in the log


# ------------------------------------------------------------------------------------ the token and the state dir (issue 7.15)

TOKEN_PROBE = r"""
import json, os, sys
token = sys.argv[1].encode()
try:
    with open(f'/proc/{os.getppid()}/environ', 'rb') as f:
        parent_env = f.read()
    readable = True
except OSError:
    parent_env, readable = b'', False
own = b'\0'.join(f'{k}={v}'.encode() for k, v in os.environ.items())
print(json.dumps({'readable': readable, 'in_parent': token in parent_env, 'in_own': token in own,
                  'parent_has_path': b'PATH=' in parent_env}))
"""


@pytest.mark.parametrize("token_via", ["file", "env"])
def test_the_job_cannot_read_the_token_from_the_runner(tmp_path: Path, token_via: str) -> None:
    """Issue 7.15: popping os.environ does not clear /proc/<runner pid>/environ. With --token-file the token
    is never in the runner's environment; given the legacy way (env), the runner restarts itself without it."""
    with running(tmp_path / "state", token_via=token_via) as r, r.client() as c:
        assert not list(tmp_path.glob("token-*")) and not list(r.state_dir.glob(".runner-token-*"))
        start(c, [*py_command(TOKEN_PROBE), r.token])
        assert wait_exited(c)["exit_code"] == 0
        log, _ = read_all_logs(c)
        probe = json.loads(log)
        if Path("/proc/self/environ").exists():
            # Not vacuous: the job could read the runner's environment (same user), and the token is not there.
            assert probe["readable"] and probe["parent_has_path"]
        assert probe == {**probe, "in_parent": False, "in_own": False}
        info = json.loads((r.state_dir / "runner.json").read_text())
        assert info["pid"] == r.proc.pid  # the restart (exec) keeps the pid the provider knows


def test_token_file_must_be_private_and_is_deleted(tmp_path: Path) -> None:
    loose = tmp_path / "loose-token"
    loose.write_text("secret-token-value\n")
    loose.chmod(0o644)
    proc = subprocess.run([PY, str(RUNNER_PY), "--state-dir", str(tmp_path / "s"), "--token-file", str(loose)],
                          capture_output=True, timeout=30, env={k: v for k, v in os.environ.items()
                                                                if k != "TRAINORCH_RUNNER_TOKEN"})
    assert proc.returncode == 2 and b"0600" in proc.stderr and b"secret-token-value" not in proc.stderr
    assert not loose.exists()  # a token that may have leaked is not left lying around either
    proc = subprocess.run([PY, str(RUNNER_PY), "--state-dir", str(tmp_path / "s"), "--token-file",
                           str(tmp_path / "missing")], capture_output=True, timeout=30)
    assert proc.returncode == 2 and b"token file" in proc.stderr


def test_state_dir_is_private(tmp_path: Path) -> None:
    """Issue 7.15: the state dir holds the job's log and outputs: 0700 dirs, 0600 files."""
    with running(tmp_path / "state") as r, r.client() as c:
        data = b"input\n"
        assert c.put("/v1/inputs/in.txt", content=data,
                     headers={"X-Sha256": hashlib.sha256(data).hexdigest()}).status_code == 200
        start(c, py_command("print('TRAINORCH_METRIC {\"step\": 1}')"))
        wait_exited(c)
        modes = {p.relative_to(r.state_dir).as_posix(): p.stat().st_mode & 0o777
                 for p in [r.state_dir, *r.state_dir.rglob("*")]}
    assert {p for p, m in modes.items() if m != 0o700 and (r.state_dir / p).is_dir()} == set()
    files = {"job.log", "metrics.jsonl", "status.json", "manifest.json", "runner.lock", "inputs/in.txt"}
    assert files <= set(modes)
    assert {p: modes[p] for p in files} == dict.fromkeys(files, 0o600)
    assert modes["."] == 0o700


# ------------------------------------------------------------------------------------ untrusted clients (issue 7.16)


def test_upload_over_the_cap_gets_a_clear_413(tmp_path: Path) -> None:
    with running(tmp_path / "state", args=("--max-upload-bytes", "1000")) as r, r.client() as c:
        assert c.get("/v1/health").json()["max_upload_bytes"] == 1000
        ok = b"x" * 1000
        assert c.put("/v1/inputs/ok.bin", content=ok,
                     headers={"X-Sha256": hashlib.sha256(ok).hexdigest()}).status_code == 200
        big = b"y" * 200_000
        r1 = c.put("/v1/inputs/big.bin", content=big, headers={"X-Sha256": hashlib.sha256(big).hexdigest()})
        assert r1.status_code == 413 and "at most 1000 bytes" in r1.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while the body streams
            for _ in range(200):
                yield b"z" * 1000

        r2 = c.put("/v1/inputs/chunked.bin", content=chunks(),
                   headers={"X-Sha256": hashlib.sha256(b"z" * 200_000).hexdigest()})
        assert r2.status_code == 413 and "1000 bytes" in r2.json()["error"]
        assert sorted(p.name for p in (r.state_dir / "inputs").iterdir()) == ["ok.bin"]
        assert list((r.state_dir / "tmp").iterdir()) == []
        assert c.get("/v1/health").status_code == 200


def _closed_by_server(sock: socket.socket, trickle: bytes, timeout: float) -> bool:
    """Send ``trickle`` one byte every 0.2 s (then nothing); True once the server closes the connection."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    i = 0
    while time.monotonic() < deadline:
        try:
            if i < len(trickle):
                sock.send(trickle[i : i + 1])
                i += 1
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_unauthenticated_slow_connections_cannot_hold_a_thread(tmp_path: Path) -> None:
    """Issue 7.16: a client that sends nothing, or a request head one byte at a time, is closed at the auth
    deadline (per-read timeouts alone let a trickle hold a thread for ever); an authenticated long-poll
    may still wait longer than that."""
    with running(tmp_path / "state", args=("--auth-timeout", "1")) as r:
        silent = socket.create_connection(("127.0.0.1", r.port))
        trickling = socket.create_connection(("127.0.0.1", r.port))
        try:
            head = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
            assert _closed_by_server(trickling, head, timeout=30)
            assert _closed_by_server(silent, b"", timeout=30)
        finally:
            silent.close()
            trickling.close()
        with r.client() as c:
            res = c.get("/v1/logs", params={"offset": 0, "wait": 3})  # idle runner: waits the whole 3 s
            assert res.status_code == 200 and res.headers["X-Log-Complete"] == "0"


# ------------------------------------------------------------------------------------ Python 3.9


def _python39() -> str | None:
    candidates = [shutil.which("python3.9"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))]
    for exe in candidates:
        if not exe:
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.stdout.strip() == "True":
            return exe
    return None


def test_runner_runs_a_job_on_python_39(tmp_path: Path) -> None:
    """runner.py is shipped alone to bare images, some with an old Python: it must run on 3.9."""
    exe = _python39()
    if exe is None:
        pytest.skip("no Python 3.9 interpreter here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYENV_")}
    with running(tmp_path / "state", python=exe, env=env) as r, r.client() as c:
        code = ("import os, sys; print('TRAINORCH_METRIC {\"step\": 1}'); sys.stderr.write('\\rbar');"
                "print('TRAINORCH_METRIC {\"step\": 2}');"
                "open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/o.txt', 'w').write('o')")
        start(c, [PY, "-c", code], max_runtime_s=60, grace_s=5)
        assert wait_exited(c)["exit_code"] == 0
        assert [m["step"] for m in c.get("/v1/metrics", params={"offset": 0}).json()["metrics"]] == [1, 2]
        assert c.get("/v1/files/o.txt").content == b"o"
        assert c.post("/v1/cancel", json={"grace_s": 1}).status_code == 200
