"""The Jupyter server extension (issue 10, items 1, 2 and 5): REST + events over the workspace's store, the
server as a driver (jobs submitted through the API, jobs whose kernel is gone), auth and XSRF.

Real parts: a real ``jupyter_server`` (pytest-jupyter's ``jp_fetch`` and its HTTP client), the real local
provider's runner subprocess, a real SQLite store, and a real second process whose orchestrator is SIGKILLed
mid-job. Every response checked here is validated against ``docs/server-api.yaml`` with openapi-core.

pytest-jupyter's fixtures are imported into this module only (not ``pytest_plugins``, which would put its
autouse server clean-up on every test of the suite); its async-test hook is not loaded either, so each test
runs its coroutine on the server's loop itself (``run``).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from pytest_jupyter.jupyter_core import *  # noqa: F403  (the fixtures: jp_environ, jp_asyncio_loop, ...)
from pytest_jupyter.jupyter_server import *  # noqa: F403  (jp_serverapp, jp_fetch, http_server_client, ...)
from traitlets.config import Config
from werkzeug.datastructures import Headers, ImmutableMultiDict

from trainorch_jupyter.model import JobState, SpecError
from trainorch_jupyter.orchestrator import Orchestrator
from trainorch_jupyter.server.driver import DRAFT_OWNER
from trainorch_jupyter.server.handlers import routes
from trainorch_jupyter.store import Store

from .helpers import pid_alive, py_command

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "server-api.yaml"
EXTENSION_CONFIG = ROOT / "jupyter-config" / "server-config" / "trainorch_jupyter.json"
SPEC = OpenAPI.from_file_path(str(API_DOC))
BASE = "/a%40b/"  # pytest-jupyter's base_url: every URL here must respect it

#: A job that prints numbered lines (slowly, when asked) and writes one output file.
PRINTER = textwrap.dedent("""
    import os, sys, time
    n, pause = int(sys.argv[1]), float(sys.argv[2])
    for i in range(n):
        print(f"line {i:05d} " + "x" * 30, flush=True)
        if i % 10 == 0:
            print('TRAINORCH_METRIC {"step": %d, "total_steps": %d, "loss": %f}' % (i, n, 1.0 / (i + 1)), flush=True)
        time.sleep(pause)
    with open(os.path.join(os.environ["TRAINORCH_OUTPUT_DIR"], "adapter.bin"), "wb") as fh:
        fh.write(bytes(range(256)) * 4096)
""")


def printer(n: int, pause: float) -> list[str]:
    return [*py_command(PRINTER), str(n), str(pause)]


def expected_log(n: int) -> str:
    out = []
    for i in range(n):
        out.append(f"line {i:05d} " + "x" * 30)
        if i % 10 == 0:
            out.append(f'TRAINORCH_METRIC {{"step": {i}, "total_steps": {n}, "loss": {1.0 / (i + 1):f}}}')
    return "".join(line + "\n" for line in out)


# --------------------------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------------------------


@pytest.fixture
def jp_server_config(request: pytest.FixtureRequest) -> Config:
    """The extension enabled by the very file shipped in the wheel, on a server that refuses anonymous users
    (unless a test asks for the permissive default: ``indirect`` parametrization)."""
    shipped = json.loads(EXTENSION_CONFIG.read_text())
    assert shipped["ServerApp"]["jpserver_extensions"] == {"trainorch_jupyter.server": True}
    config = Config(shipped)
    config.ServerApp.allow_unauthenticated_access = getattr(request, "param", False)
    config.TrainorchServerApp.adopt_interval = 0.3
    config.TrainorchServerApp.watch_interval = 0.2
    config.TrainorchServerApp.ping_interval = 0.5
    return config


@pytest.fixture
def workspace(jp_root_dir: Path) -> Path:
    return jp_root_dir  # the extension's default workspace: the server's root_dir


def run(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> Any:
    """Run a test's coroutine on the server's loop (the server answers meanwhile)."""
    return loop.run_until_complete(asyncio.wait_for(coro, 240))


@dataclass
class Answer:
    code: int
    body: bytes
    headers: Any

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """Requests to the server under test, each response validated against the OpenAPI document."""

    def __init__(self, client: Any, token: str) -> None:
        self.client = client
        self.token = token
        self.checked: list[tuple[str, str, int]] = []

    async def call(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                   params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                   auth: bool = True, check: bool = True) -> Answer:
        hdrs = dict(headers or {})
        if auth:
            hdrs.setdefault("Authorization", f"token {self.token}")
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        query = ("?" + urlencode(params)) if params else ""
        url = f"{BASE}api/training{path}{query}"
        r = await self.client.fetch(url, method=method, headers=hdrs, raise_error=False, request_timeout=120,
                                    body=data if data is not None else (b"" if method == "POST" else None),
                                    allow_nonstandard_methods=True)
        answer = Answer(r.code, r.body or b"", r.headers)
        if check:
            validate(method, path, params or {}, hdrs, data, answer)
            self.checked.append((method, path, r.code))
        return answer


@dataclass
class _Request:
    host_url: str
    path: str
    method: str
    body: bytes | None
    content_type: str
    parameters: RequestParameters


@dataclass
class _Response:
    status_code: int
    data: bytes
    headers: Headers
    content_type: str


def validate(method: str, path: str, params: dict[str, Any], headers: dict[str, str], body: bytes | None,
             answer: Answer) -> None:
    """openapi-core's verdict on a real answer (raises on a mismatch with docs/server-api.yaml)."""
    request = _Request("http://localhost", "/api/training" + path, method.lower(), body,
                       headers.get("Content-Type", "application/json"),
                       RequestParameters(query=ImmutableMultiDict({k: str(v) for k, v in params.items()}),
                                         header=Headers(headers), cookie=ImmutableMultiDict()))
    resp_headers = Headers([(k, v) for k, v in answer.headers.get_all()])
    ctype = (answer.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if not answer.body and ctype == "text/plain" and answer.code == 200:
        # openapi-core reads any empty body as missing data (its _get_data_value); an empty slice of a log is
        # a real answer: check its headers by hand.
        assert {"X-Next-Offset", "X-Log-Complete", "X-Log-Size"} <= set(answer.headers), answer.headers
        assert int(answer.headers["X-Next-Offset"]) >= 0 and answer.headers["X-Log-Complete"] in ("0", "1")
        return
    SPEC.validate_response(request, _Response(answer.code, answer.body, resp_headers, ctype))


@pytest.fixture
def api(jp_serverapp: Any, http_server_client: Any) -> Api:
    return Api(http_server_client, jp_serverapp.identity_provider.token)


async def until(probe: Callable[[], Awaitable[Any]], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def state_of(api: Api, job_id: str) -> str:
    r = await api.call("GET", f"/jobs/{job_id}/status")
    assert r.code == 200, r.body
    return str(r.json()["state"])


async def wait_state(api: Api, job_id: str, states: set[str], timeout: float = 90) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        r = await api.call("GET", f"/jobs/{job_id}/status")
        return r.json() if r.json()["state"] in states else None

    return await until(probe, timeout, f"job {job_id} to reach {states}")  # type: ignore[no-any-return]


def service_of(serverapp: Any) -> Any:
    return serverapp.web_app.settings["trainorch_service"]


# --------------------------------------------------------------------------------------------
# The document itself
# --------------------------------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_covers_every_route() -> None:
    from openapi_spec_validator import validate as validate_spec
    from openapi_spec_validator.readers import read_from_filename

    doc, _ = read_from_filename(str(API_DOC))
    validate_spec(doc)
    documented = {p.replace("{job_id}", "ID") for p in doc["paths"]}
    served = set()
    for pattern, _handler in routes():
        path = pattern.replace("/api/training", "").replace("/?", "")
        served.add(path.split("(?P<job_id>")[0] + ("ID" + path.split(")", 1)[1] if "(?P<job_id>" in path else ""))
    assert served == documented


# --------------------------------------------------------------------------------------------
# item 1 + 2: every endpoint on one job created and driven to COMPLETED through the API
# --------------------------------------------------------------------------------------------


def test_a_job_created_through_the_api_is_driven_to_completed_with_verified_files(
        api: Api, jp_serverapp: Any, workspace: Path, jp_asyncio_loop: Any) -> None:
    async def main() -> None:
        r = await api.call("GET", "/jobs")
        assert r.code == 200 and r.json()["jobs"] == []
        first_now = r.json()["now"]

        r = await api.call("POST", "/jobs", body={"name": "api-job", "command": printer(60, 0.01)})
        assert r.code == 201, r.body
        created = r.json()
        job_id = created["id"]
        assert created["state"] == "PENDING" and created["draft"] is True and created["live"] is True
        assert r.headers["Location"].endswith(f"/api/training/jobs/{job_id}/status")
        await asyncio.sleep(1.0)  # a created job is not started by anybody: not the server, not its adopter
        assert await state_of(api, job_id) == "PENDING"
        assert Store(workspace).owner(job_id) == DRAFT_OWNER

        r = await api.call("GET", "/jobs", params={"since": first_now})
        assert [j["id"] for j in r.json()["jobs"]] == [job_id]
        r = await api.call("GET", "/jobs", params={"since": r.json()["now"]})
        assert r.json()["jobs"] == []  # nothing changed since the last look
        r = await api.call("GET", "/jobs", params={"state": "pending", "provider": "local"})
        assert [j["id"] for j in r.json()["jobs"]] == [job_id]
        r = await api.call("GET", "/jobs", params={"provider": "runpod"})
        assert r.json()["jobs"] == []

        r = await api.call("POST", f"/jobs/{job_id}/submit")
        assert r.code == 202, r.body
        assert r.json()["draft"] is False
        r = await api.call("POST", f"/jobs/{job_id}/submit")
        assert r.code == 409 and "submitted already" in r.json()["error"]

        done = await wait_state(api, job_id, {"COMPLETED", "FAILED", "CANCELLED"})
        assert done["state"] == "COMPLETED", done["record"]["error"]
        assert done["step"] == 50 and done["total_steps"] == 60 and done["last_loss"] == pytest.approx(1 / 51, abs=1e-6)
        assert done["progress"] == pytest.approx(50 / 60)
        assert done["display"]["state_label"] == "\u2714 COMPLETED"
        assert done["display"]["progress_text"] == "step 50/60 \u00b7 83%"
        assert done["artifacts_dir"] == f"artifacts/{job_id}"
        assert [h[0] for h in Store(workspace).state_history(job_id)] == [
            "PENDING", "PROVISIONING", "RUNNING", "DOWNLOADING", "COMPLETED"]

        # the log, whole, by byte offset in small slices
        text, offset = b"", 0
        while True:
            r = await api.call("GET", f"/jobs/{job_id}/logs", params={"offset": offset, "limit": 500})
            assert r.code == 200 and r.headers["Content-Type"].startswith("text/plain")
            text += r.body
            offset = int(r.headers["X-Next-Offset"])
            if r.headers["X-Log-Complete"] == "1":
                break
        assert text.decode() == expected_log(60)
        r = await api.call("GET", f"/jobs/{job_id}/logs", params={"offset": offset})
        assert r.body == b"" and r.headers["X-Log-Complete"] == "1"

        # the verified file
        r = await api.call("POST", f"/jobs/{job_id}/download-artifact")
        assert r.code == 200, r.body
        files = r.json()["files"]
        assert [f["name"] for f in files] == ["adapter.bin"]
        data = (workspace / files[0]["path"]).read_bytes()
        assert files[0]["path"] == f"artifacts/{job_id}/adapter.bin"
        assert data == bytes(range(256)) * 4096
        assert files[0]["hash_sha256"] == hashlib.sha256(data).hexdigest() and files[0]["verified"] is True
        assert files[0]["size_bytes"] == len(data)

        r = await api.call("GET", "/summary")
        assert r.json()["running"] == 0 and r.json()["text"] == "0 running \u00b7 $0.00"

        r = await api.call("POST", f"/jobs/{job_id}/cancel")  # ended: left as it is
        assert r.code == 202 and r.json()["state"] == "COMPLETED"
        r = await api.call("POST", f"/jobs/{job_id}/submit")
        assert r.code == 409 and "has ended" in r.json()["error"]
        for method, path in (("GET", "/jobs/nope-1/status"), ("POST", "/jobs/nope-1/submit"),
                             ("POST", "/jobs/nope-1/cancel"), ("POST", "/jobs/nope-1/download-artifact"),
                             ("GET", "/jobs/nope-1/logs")):
            r = await api.call(method, path)
            assert r.code == 404 and "nope-1" in r.json()["error"], (method, path)

    run(jp_asyncio_loop, main())
    assert {(m, p.split("/")[-1]) for m, p, _ in api.checked} >= {
        ("GET", "jobs"), ("POST", "jobs"), ("POST", "submit"), ("GET", "status"), ("GET", "logs"),
        ("POST", "download-artifact"), ("GET", "summary"), ("POST", "cancel")}


# --------------------------------------------------------------------------------------------
# item 1: the event stream
# --------------------------------------------------------------------------------------------


class EventStream:
    """A raw HTTP client of ``/api/training/events`` (EventSource's wire format), on the test's loop."""

    def __init__(self, port: int, token: str, query: str = "") -> None:
        self.port, self.token, self.query = port, token, query
        self.events: list[tuple[str, str, str]] = []  # (event, id, data)
        self.comments: list[str] = []
        self.headers: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write((f"GET {BASE}api/training/events{self.query} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                           f"Authorization: token {self.token}\r\nAccept: text/event-stream\r\n\r\n").encode())
        await self.writer.drain()
        status = (await self.reader.readline()).decode()
        assert " 200 " in status, status
        while (line := (await self.reader.readline()).decode().strip()):
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        chunked = self.headers.get("transfer-encoding") == "chunked"
        buf = ""
        while True:
            if chunked:
                size = int((await self.reader.readline()).strip() or b"0", 16)
                if size == 0:
                    return
                data = await self.reader.readexactly(size + 2)
                buf += data[:-2].decode()
            else:
                data = await self.reader.read(65536)
                if not data:
                    return
                buf += data.decode()
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                event, eid, data_lines = "message", "", []
                for line in block.split("\n"):
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("id: "):
                        eid = line[4:]
                    elif line.startswith("data: "):
                        data_lines.append(line[6:])
                if data_lines:
                    self.events.append((event, eid, "\n".join(data_lines)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(d) for e, _, d in self.events if e == kind]

    async def close(self) -> None:
        self.writer.close()
        if self._task is not None:
            self._task.cancel()


def test_the_event_stream_carries_states_progress_and_the_whole_log(
        api: Api, jp_serverapp: Any, jp_http_port: int, jp_asyncio_loop: Any) -> None:
    async def main() -> None:
        token = jp_serverapp.identity_provider.token
        stream = EventStream(jp_http_port, token)
        quiet = EventStream(jp_http_port, token, "?logs=")
        await stream.open()
        await quiet.open()
        assert stream.headers["content-type"].startswith("text/event-stream")  # not APIHandler's JSON
        job_id = (await api.call("POST", "/jobs", body={"name": "sse", "command": printer(120, 0.005)})).json()["id"]
        await api.call("POST", f"/jobs/{job_id}/submit")
        await until(lambda: _ended(stream, job_id), 90, "the job's end on the stream")
        await until(lambda: _log_done(stream, job_id, len(expected_log(120).encode())), 30, "the whole log")
        states = [e["state"] for e in stream.of("job") if e["id"] == job_id]
        assert states[0] == "PENDING" and states[-1] == "COMPLETED"
        assert "RUNNING" in states  # (changes within one watch interval come as one event: PROVISIONING may not)
        assert any(e["step"] for e in stream.of("job") if e["id"] == job_id)  # progress came live
        logs = [e for e in stream.of("log") if e["job_id"] == job_id]
        assert logs[0]["offset"] == 0
        assert all(a["next_offset"] == b["offset"] for a, b in itertools.pairwise(logs))  # no gap
        assert "".join(e["text"] for e in logs) == expected_log(120)
        await until(lambda: _async(bool(stream.comments)), 5, "a ping")
        assert ": ping" in stream.comments
        assert quiet.of("log") == [] and [e["state"] for e in quiet.of("job")][-1] == "COMPLETED"
        ids = [eid for e, eid, _ in stream.events if e == "job"]
        await stream.close()
        await quiet.close()

        # a reconnecting EventSource sends its last id back and gets what changed since
        again = EventStream(jp_http_port, token, "?" + urlencode({"since": ids[0], "logs": ""}))
        await again.open()
        await until(lambda: _async(bool(again.of("job"))), 5, "the catch-up")
        assert again.of("job")[-1]["state"] == "COMPLETED"
        await again.close()
        r = await api.call("GET", "/events", params={"since": "yesterday"})
        assert r.code == 400 and r.json()["field"] == "since"
        await asyncio.sleep(0.3)
        assert not service_of(jp_serverapp)._subscribers  # closed streams are let go

    run(jp_asyncio_loop, main())


async def _async(value: Any) -> Any:
    return value


async def _ended(stream: EventStream, job_id: str) -> bool:
    return any(e["id"] == job_id and e["state"] == "COMPLETED" for e in stream.of("job"))


async def _log_done(stream: EventStream, job_id: str, size: int) -> bool:
    return any(e["job_id"] == job_id and e["next_offset"] == size for e in stream.of("log"))


def test_the_store_is_read_off_the_servers_event_loop(api: Api, jp_asyncio_loop: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A store read that waits (SQLite busy behind another process's write) must not stall the server."""
    from trainorch_jupyter.server.storeview import StoreView

    rows = StoreView.rows
    windows: list[tuple[float, float]] = []

    def slow_rows(self: StoreView) -> Any:
        start = time.monotonic()
        time.sleep(2.0)
        windows.append((start, time.monotonic()))
        return rows(self)

    async def main() -> None:
        await api.call("GET", "/jobs")  # started
        monkeypatch.setattr(StoreView, "rows", slow_rows)
        ticks: list[float] = []

        async def probe() -> None:
            for _ in range(300):
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        await asyncio.gather(api.call("GET", "/jobs"), api.call("GET", "/summary"), probe())
        assert windows  # the reads really waited
        start, end = windows[0]
        inside = [t for t in ticks if start < t < end]
        assert len(inside) >= 20, len(inside)  # the loop kept turning while a read waited
        lags = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(lags) < 1.0, max(lags)  # (blocked, it would stand still for 2 s)

    run(jp_asyncio_loop, main())


def test_polling_is_activity_only_while_a_job_is_live(api: Api, jp_serverapp: Any, jp_asyncio_loop: Any) -> None:
    """An open JupyterLab polling an idle workspace must not keep the server from being culled."""
    settings = jp_serverapp.web_app.settings

    async def main() -> None:
        await api.call("GET", "/jobs")
        before = settings.get("api_last_activity")
        for path in ("/jobs", "/summary"):
            await api.call("GET", path)
        assert settings.get("api_last_activity") == before
        r = await api.call("POST", "/jobs", body={"name": "busy", "command": py_command("import time; time.sleep(30)")})
        job_id = r.json()["id"]
        await api.call("POST", f"/jobs/{job_id}/submit")  # a POST is the user's act: activity
        assert settings.get("api_last_activity") != before
        await wait_state(api, job_id, {"RUNNING"})
        mark = settings["api_last_activity"]
        await asyncio.sleep(0.01)
        await api.call("GET", "/summary")
        assert settings["api_last_activity"] > mark  # a live job: polling keeps the server up
        assert jp_serverapp.extension_manager.any_activity()  # and the server drives a job
        await api.call("POST", f"/jobs/{job_id}/cancel")
        await wait_state(api, job_id, {"CANCELLED"}, 30)

    run(jp_asyncio_loop, main())


# --------------------------------------------------------------------------------------------
# item 1: auth, XSRF, bad input
# --------------------------------------------------------------------------------------------

ENDPOINTS = [("GET", "/jobs"), ("POST", "/jobs"), ("POST", "/jobs/x-1/submit"), ("GET", "/jobs/x-1/status"),
             ("POST", "/jobs/x-1/cancel"), ("POST", "/jobs/x-1/download-artifact"), ("GET", "/jobs/x-1/logs"),
             ("GET", "/events"), ("GET", "/summary")]


@pytest.mark.parametrize("jp_server_config", [False, True], ids=["anonymous-refused", "anonymous-allowed"],
                         indirect=True)
def test_every_endpoint_refuses_a_request_without_a_user(jp_server_config: Config, jp_serverapp: Any, api: Api,
                                                         jp_asyncio_loop: Any, workspace: Path) -> None:
    """403 without a token or a session: on a server that refuses anonymous users, and on one left at the
    permissive default (there only the handlers' own ``@web.authenticated`` stands in the way)."""
    assert jp_serverapp.web_app.settings["allow_unauthenticated_access"] is jp_server_config.ServerApp.allow_unauthenticated_access

    async def main() -> None:
        for method, path in ENDPOINTS:
            body = {"name": "anon", "command": ["true"]} if path == "/jobs" and method == "POST" else None
            r = await api.call(method, path, body=body, auth=False)
            assert r.code == 403, (method, path, r.code, r.body)
        r = await api.call("GET", "/jobs", headers={"Authorization": "token wrong"}, auth=False)
        assert r.code == 403

    run(jp_asyncio_loop, main())
    assert Store(workspace).list_jobs() == []  # nothing was created


def test_a_post_from_a_cookie_session_needs_the_xsrf_token(api: Api, jp_asyncio_loop: Any) -> None:
    async def main() -> None:
        r = await api.call("GET", "/jobs", params={"token": api.token}, auth=False, check=False)
        assert r.code == 200
        jar = SimpleCookie()
        for header in r.headers.get_list("Set-Cookie"):
            jar.load(header)
        login = await api.client.fetch(f"{BASE}login", raise_error=False, follow_redirects=False)
        for header in login.headers.get_list("Set-Cookie"):
            jar.load(header)
        assert "_xsrf" in jar and any(k.startswith("username-") for k in jar)
        session = "; ".join(f"{k}={v.value}" for k, v in jar.items() if k != "_xsrf")
        r = await api.call("GET", "/jobs", headers={"Cookie": session}, auth=False)
        assert r.code == 200  # the session is a user
        body = {"name": "xsrf", "command": ["true"]}
        r = await api.call("POST", "/jobs", body=body, headers={"Cookie": session}, auth=False)
        assert r.code == 403, r.body  # no XSRF token: refused
        both = session + f"; _xsrf={jar['_xsrf'].value}"
        r = await api.call("POST", "/jobs", body=body, headers={"Cookie": both, "X-XSRFToken": "forged"}, auth=False)
        assert r.code == 403
        r = await api.call("POST", "/jobs", body=body, headers={"Cookie": both, "X-XSRFToken": jar["_xsrf"].value},
                           auth=False)
        assert r.code == 201, r.body

    run(jp_asyncio_loop, main())


def _submit_field(body: dict[str, Any], workspace: Path) -> str:
    """The field ``%%train submit`` names for this spec: the magic itself, run with the spec as its cell, in a
    kernel's place (its folder and workspace: ``workspace``)."""
    import yaml

    from trainorch_jupyter.magics import TrainMagics
    from trainorch_jupyter.orchestrator import reset_orchestrator

    cwd, env = os.getcwd(), os.environ.get("TRAINORCH_WORKSPACE")
    os.chdir(workspace)
    os.environ["TRAINORCH_WORKSPACE"] = str(workspace)
    try:
        TrainMagics(shell=None)._dispatch("submit", yaml.safe_dump(body))
    except SpecError as exc:
        return exc.field
    finally:
        reset_orchestrator()
        os.chdir(cwd)
        if env is None:
            os.environ.pop("TRAINORCH_WORKSPACE", None)
        else:
            os.environ["TRAINORCH_WORKSPACE"] = env
    raise AssertionError(f"%%train submit took {body}")


def test_bad_input_is_400_naming_the_field_as_train_submit_does(api: Api, workspace: Path,
                                                                 jp_asyncio_loop: Any) -> None:
    (workspace / "data.jsonl").write_text('{"text": "hi"}\n')
    (workspace / "empty.jsonl").write_text("")
    bad_specs = [
        {"name": "x", "train": {"model": "tiny", "data": "empty.jsonl"}},  # the checks before billing
        {"name": "x", "train": {"model": "./no-such-model", "data": "data.jsonl"}},
        {"name": "x", "train": {"model": "tiny", "data": "data.jsonl", "lora_r": 0}},
        {"name": "x", "train": {"model": "tiny", "data": "missing.jsonl"}},
        {"name": "x", "train": {"model": "tiny"}},
        {"name": "Bad Name", "command": ["true"]},
        {"name": "x", "command": ["true"], "provider": "nowhere"},
        {"name": "x", "command": ["true"], "bogus": 1},
        {"name": "x", "command": ["true"], "resources": {"gpu_count": 99}},
        {"name": "x", "command": ["true"], "env": {"TRAINORCH_X": "1"}},
        {"name": "x", "command": ["true"], "max_runtime": "forever"},
        {"name": "x"},
    ]

    async def main() -> None:
        for spec in bad_specs:
            r = await api.call("POST", "/jobs", body=spec)
            assert r.code == 400, (spec, r.body)
            expected = await asyncio.to_thread(_submit_field, spec, workspace)
            assert r.json()["field"] == expected, (spec, r.json(), expected)
            assert expected.split(".")[0].split("[")[0] in r.json()["error"]
        for raw, field in ((b"not json", "spec"), (b"[1, 2]", "spec"), (b"", "spec"),
                           (b'{"name": "x", "train": "tiny"}', "train")):
            r = await api.call("POST", "/jobs", raw=raw, check=raw != b"not json" and raw != b"")
            assert r.code == 400 and r.json()["field"] == field, (raw, r.body)
        for params, field in (({"state": "BOGUS"}, "state"), ({"since": "yesterday"}, "since")):
            r = await api.call("GET", "/jobs", params=params)
            assert r.code == 400 and r.json()["field"] == field
        r = await api.call("POST", "/jobs", body={"name": "ok", "command": ["true"]})
        job_id = r.json()["id"]
        for params, field in (({"offset": -1}, "offset"), ({"offset": "x"}, "offset"), ({"limit": 0}, "limit")):
            r = await api.call("GET", f"/jobs/{job_id}/logs", params=params, check=False)
            assert r.code == 400 and r.json()["field"] == field

    run(jp_asyncio_loop, main())
    assert [j.spec.name for j in Store(workspace).list_jobs()] == ["ok"]  # nothing else was written


def test_relative_paths_of_a_spec_are_taken_from_the_workspace(api: Api, workspace: Path,
                                                               jp_asyncio_loop: Any) -> None:
    (workspace / "in.txt").write_text("payload")

    async def main() -> None:
        r = await api.call("POST", "/jobs", body={"name": "rel", "inputs": ["in.txt"], "command": py_command(
            "import os; print(open(os.path.join(os.environ['TRAINORCH_INPUT_DIR'], 'in.txt')).read())")})
        assert r.code == 201, r.body
        job_id = r.json()["id"]
        await api.call("POST", f"/jobs/{job_id}/submit")
        done = await wait_state(api, job_id, {"COMPLETED", "FAILED"})
        assert done["state"] == "COMPLETED", done["record"]["error"]
        assert done["record"]["spec"]["inputs"] == [str(workspace / "in.txt")]
        log = (await api.call("GET", f"/jobs/{job_id}/logs")).body
        assert log == b"payload\n"

    run(jp_asyncio_loop, main())


# --------------------------------------------------------------------------------------------
# item 2 + 5: cancel from the API, from a kernel, of a draft; one driver per job
# --------------------------------------------------------------------------------------------


def test_cancel_through_the_api_stops_a_running_job_and_its_machine(api: Api, workspace: Path,
                                                                     jp_asyncio_loop: Any) -> None:
    async def main() -> None:
        job_id = (await api.call("POST", "/jobs", body={
            "name": "long", "command": py_command("import time; print('up', flush=True); time.sleep(120)")})).json()["id"]
        await api.call("POST", f"/jobs/{job_id}/submit")
        running = await wait_state(api, job_id, {"RUNNING"})
        pid = int(running["record"]["machine_id"])
        r = await api.call("POST", f"/jobs/{job_id}/cancel")
        assert r.code == 202
        done = await wait_state(api, job_id, {"CANCELLED", "FAILED", "COMPLETED"}, 30)
        assert done["state"] == "CANCELLED"
        await until(lambda: _async(not pid_alive(pid)), 30, "the runner to be gone")

    run(jp_asyncio_loop, main())


def test_a_cancel_recorded_by_a_kernel_is_honoured_by_the_server(api: Api, workspace: Path,
                                                                  jp_asyncio_loop: Any) -> None:
    """Item 5: the panel's Cancel (``Orchestrator.cancel`` in the kernel) only writes the request to the store:
    the server that drives the job ends it, whatever the kernel is busy with."""

    async def main() -> None:
        job_id = (await api.call("POST", "/jobs", body={
            "name": "kcancel", "command": py_command("import time; print('up', flush=True); time.sleep(120)")})).json()["id"]
        await api.call("POST", f"/jobs/{job_id}/submit")
        await wait_state(api, job_id, {"RUNNING"})
        kernel = Orchestrator(workspace, reattach=False)  # as a notebook's kernel has it
        try:
            assert kernel.reattach() == []  # the server drives it: the kernel cannot take it
            started = time.monotonic()
            await asyncio.to_thread(kernel.cancel, job_id)
            assert time.monotonic() - started < 5  # recorded, not waited for
        finally:
            await asyncio.to_thread(kernel.close)
        done = await wait_state(api, job_id, {"CANCELLED", "FAILED", "COMPLETED"}, 30)
        assert done["state"] == "CANCELLED"

    run(jp_asyncio_loop, main())


def test_a_draft_is_started_by_nobody_and_a_kernels_cancel_ends_it(api: Api, workspace: Path,
                                                                    jp_asyncio_loop: Any) -> None:
    async def main() -> None:
        job_id = (await api.call("POST", "/jobs", body={"name": "draft", "command": ["true"]})).json()["id"]
        kernel = Orchestrator(workspace)  # re-attaches on start, as %load_ext does
        try:
            assert job_id not in kernel._tasks  # a draft is not the kernel's to start
            await asyncio.to_thread(kernel.cancel, job_id)  # %train cancel
        finally:
            await asyncio.to_thread(kernel.close)
        done = await wait_state(api, job_id, {"CANCELLED"}, 10)
        assert done["error"] == "cancelled before it was submitted"
        assert done["record"]["machine_id"] is None  # nothing was ever started
        r = await api.call("POST", f"/jobs/{job_id}/submit")
        assert r.code == 409
        other = (await api.call("POST", "/jobs", body={"name": "draft2", "command": ["true"]})).json()["id"]
        r = await api.call("POST", f"/jobs/{other}/cancel")
        assert r.code == 202 and r.json()["state"] == "CANCELLED"
        r = await api.call("GET", "/summary")
        assert r.json()["drafts"] == 0 and r.json()["live"] == 0

    run(jp_asyncio_loop, main())


def test_the_server_never_takes_a_job_a_live_kernel_drives(api: Api, jp_serverapp: Any, workspace: Path,
                                                           jp_asyncio_loop: Any) -> None:
    async def main() -> None:
        kernel = Orchestrator(workspace, reattach=False)
        try:
            handle = await asyncio.to_thread(kernel.submit, {"name": "kernels", "command": printer(40, 0.1)})
            store = Store(workspace)
            rounds = 0
            while handle.status.is_live:  # many adoption rounds while the kernel drives it
                await asyncio.sleep(0.3)
                owner = store.owner(handle.id)
                if handle.status.is_live:
                    assert owner == kernel.owner
                    rounds += 1
                assert handle.id not in service_of(jp_serverapp).driven
            assert rounds >= 5
            store.close()
            final = await asyncio.to_thread(handle.wait, 60)
            assert final.state is JobState.COMPLETED
            r = await api.call("GET", f"/jobs/{handle.id}/logs")
            assert r.body.decode() == expected_log(40)  # a kernel's job is served like any other
        finally:
            await asyncio.to_thread(kernel.close)

    run(jp_asyncio_loop, main())


# --------------------------------------------------------------------------------------------
# item 2: a job whose kernel was killed is adopted by the server and finished
# --------------------------------------------------------------------------------------------

KERNEL = textwrap.dedent("""
    import json, sys, time
    from trainorch_jupyter.orchestrator import Orchestrator
    orch = Orchestrator(sys.argv[1])
    job = orch.submit({"name": "orphan", "command": json.loads(sys.argv[2])})
    print(job.id, flush=True)
    time.sleep(600)
""")


def test_a_job_whose_kernel_is_killed_is_adopted_and_finished_with_its_whole_log(
        api: Api, jp_serverapp: Any, workspace: Path, jp_asyncio_loop: Any) -> None:
    n = 400
    proc = subprocess.Popen([sys.executable, "-c", KERNEL, str(workspace), json.dumps(printer(n, 0.01))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip()
        store = Store(workspace)
        owner = store.owner(job_id)
        assert owner is not None and f":{proc.pid}:" in owner

        async def main() -> None:
            await until(lambda: _async(store.log_offset(job_id) > 2000), 60, "the kernel to follow some log")
            proc.send_signal(signal.SIGKILL)  # the kernel dies mid-job, without a word
            await asyncio.to_thread(proc.wait, 10)
            assert await state_of(api, job_id) in ("RUNNING", "DOWNLOADING")
            await until(lambda: _async(job_id in service_of(jp_serverapp).driven), 30, "the server to adopt it")
            new_owner = store.owner(job_id)
            assert new_owner == service_of(jp_serverapp).orch.owner
            done = await wait_state(api, job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 90)
            assert done["state"] == "COMPLETED", done["record"]["error"]
            r = await api.call("GET", f"/jobs/{job_id}/logs", params={"limit": 8 * 1024 * 1024})
            assert r.body.decode() == expected_log(n)  # whole: nothing lost, nothing twice
            assert r.headers["X-Log-Complete"] == "1"
            assert done["step"] == 390 and done["total_steps"] == n
            files = (await api.call("POST", f"/jobs/{job_id}/download-artifact")).json()["files"]
            data = (workspace / files[0]["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == files[0]["hash_sha256"] and len(data) == 256 * 4096
            # the kernel that comes back sees the job where the server left it, and cannot take it again
            back = Orchestrator(workspace)
            try:
                assert back.get(job_id).state is JobState.COMPLETED
                assert back.logs(job_id) == expected_log(n)
            finally:
                await asyncio.to_thread(back.close)

        run(jp_asyncio_loop, main())
        store.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_when_the_server_stops_its_jobs_run_on_and_the_next_server_finishes_them(
        api: Api, jp_serverapp: Any, workspace: Path, jp_asyncio_loop: Any) -> None:
    from trainorch_jupyter.server.service import TrainingService

    n = 300

    async def main() -> None:
        job_id = (await api.call("POST", "/jobs", body={"name": "stops", "command": printer(n, 0.01)})).json()["id"]
        await api.call("POST", f"/jobs/{job_id}/submit")
        running = await wait_state(api, job_id, {"RUNNING"})
        pid = int(running["record"]["machine_id"])
        store = Store(workspace)
        await until(lambda: _async(store.log_offset(job_id) > 1000), 30, "some log")
        await service_of(jp_serverapp).stop()  # what the server's shutdown does (stop_extension)
        assert store.get(job_id).state.is_live and store.owner(job_id) is None  # let go, not ended
        assert pid_alive(pid)  # the job runs on
        nxt = TrainingService(workspace, workspace, adopt_interval=0.3, watch_interval=0.2)
        jp_serverapp.web_app.settings["trainorch_service"] = nxt  # the next server on the same workspace
        try:
            await nxt.start()
            await nxt.ready()
            await until(lambda: _async(job_id in nxt.driven), 10, "the next server to adopt it")
            done = await wait_state(api, job_id, {"COMPLETED", "FAILED", "CANCELLED"}, 90)
            assert done["state"] == "COMPLETED", done["record"]["error"]
            r = await api.call("GET", f"/jobs/{job_id}/logs", params={"limit": 8 * 1024 * 1024})
            assert r.body.decode() == expected_log(n)
        finally:
            await nxt.stop()
            store.close()

    run(jp_asyncio_loop, main())


# --------------------------------------------------------------------------------------------
# item 4 + 5: the panel and the sidebar say the same; the panel's Cancel is marked for the lab extension
# --------------------------------------------------------------------------------------------


def test_the_panel_says_what_the_api_says(api: Api, jp_serverapp: Any, workspace: Path,
                                          jp_asyncio_loop: Any) -> None:
    from trainorch_jupyter.widgets import JobPanel, _Scheduler

    async def main() -> None:
        job_id = (await api.call("POST", "/jobs", body={"name": "same", "command": printer(30, 0.0)})).json()["id"]
        await api.call("POST", f"/jobs/{job_id}/submit")
        summary = await wait_state(api, job_id, {"COMPLETED", "FAILED"})
        assert summary["state"] == "COMPLETED"
        orch = service_of(jp_serverapp).orch
        panel = await asyncio.to_thread(JobPanel, orch, job_id, scheduler=_Scheduler(autostart=False),
                                        route_clicks=False)
        try:
            header = panel.header.value
            shown = summary["display"]
            assert shown["progress_text"] == "step 20/30 \u00b7 67%"
            for text in (shown["state_label"], shown["progress_text"], shown["cost_text"], shown["loss_text"]):
                assert text in header, (text, header)
            assert shown["state_color"] in header
            assert f"data-job-id='{job_id}'" in header  # where the lab extension finds the job of a panel
            assert "trainorch-cancel" in panel.cancel_button._dom_classes
            assert "trainorch-cancel-confirm" in panel.confirm_button._dom_classes
        finally:
            panel.close()

    run(jp_asyncio_loop, main())
