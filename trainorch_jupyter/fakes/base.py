"""What every provider fake shares: a real HTTP server on loopback, a ledger of machines that bill,
rate-limit windows, fault counters, machine processes, and an optional spec validator.

A fake is a local stand-in for a provider's HTTP API. It answers with the provider's shapes and
status codes, and its "create machine" really starts the machine's start command as a process in a
temporary directory standing in for the machine. Its own bookkeeping is served outside the
provider's paths:

- ``GET  /_fake/state``   JSON: machines still billing, every machine seen, requests seen (method,
  path and status; never a header or a query string, so never a key), rate-limit violations, spec
  mismatches and the faults still armed.
- ``POST /_fake/faults``  JSON: arm faults (what each fake understands is in its docstring).

Nothing here imports the rest of the package beyond the standard library, so a fake can run
anywhere the package is installed. :class:`OpenAPIValidator` needs ``openapi-core`` (a dev
dependency) and imports it only when built.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "FakeRequest",
    "FakeResponse",
    "FakeServer",
    "Faults",
    "Ledger",
    "MachineProcess",
    "OpenAPIValidator",
    "RateLimiter",
    "RateWindow",
    "SpecValidator",
    "free_port",
    "iso_now",
    "json_response",
]


def iso_now(t: float | None = None) -> str:
    """RFC 3339 UTC time with a ``Z``, to the second, as provider APIs write it."""
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Requests and responses
# --------------------------------------------------------------------------------------------


@dataclass
class FakeRequest:
    method: str  # upper case
    path: str  # the raw (still percent-encoded) path, without the query string
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    raw_query: str = ""

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None

    @property
    def bearer(self) -> str | None:
        """The bearer token of the ``Authorization`` header, or None."""
        value = self.headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    def q(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class FakeResponse:
    status: int
    body: bytes = b""
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    #: a body produced while it is sent (server-sent events); the connection closes at its end
    stream: Iterator[bytes] | None = None
    #: close the connection without answering (a network fault)
    drop: bool = False
    #: wait this long before answering (a hung upstream; the client should time out first)
    delay_s: float = 0.0


def json_response(status: int, obj: Any, *, content_type: str = "application/json",
                  headers: Mapping[str, str] | None = None) -> FakeResponse:
    return FakeResponse(status, json.dumps(obj).encode(), content_type, dict(headers or {}))


# --------------------------------------------------------------------------------------------
# Ledger: what the fake has seen and what still costs money
# --------------------------------------------------------------------------------------------


@dataclass
class _MachineEntry:
    id: str
    name: str
    created: float
    cost_per_hr: float
    status: str = ""
    gone: float | None = None
    gone_reason: str = ""
    accrued_usd: float = 0.0
    _since: float = 0.0  # start of the current cost segment

    def accrue(self, now: float) -> None:
        self.accrued_usd += self.cost_per_hr * max(0.0, now - self._since) / 3600.0
        self._since = now


class Ledger:
    """Thread-safe bookkeeping. A machine bills from its creation until it is gone (deleted by the
    client, by its own pod-scoped key, or preempted by the provider): a stopped machine still bills
    for its disk, so it stays on the list."""

    def __init__(self, max_requests: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._machines: dict[str, _MachineEntry] = {}
        self._requests: deque[dict[str, Any]] = deque(maxlen=max_requests)
        self._violations: list[dict[str, Any]] = []
        self._spec: list[dict[str, Any]] = []

    def machine_created(self, machine_id: str, name: str, cost_per_hr: float, status: str = "") -> None:
        now = time.time()
        with self._lock:
            self._machines[machine_id] = _MachineEntry(machine_id, name, now, cost_per_hr, status, _since=now)

    def machine_update(self, machine_id: str, *, cost_per_hr: float | None = None, status: str | None = None) -> None:
        with self._lock:
            m = self._machines.get(machine_id)
            if m is None or m.gone is not None:
                return
            if cost_per_hr is not None and cost_per_hr != m.cost_per_hr:
                m.accrue(time.time())
                m.cost_per_hr = cost_per_hr
            if status is not None:
                m.status = status

    def machine_gone(self, machine_id: str, reason: str) -> None:
        now = time.time()
        with self._lock:
            m = self._machines.get(machine_id)
            if m is None or m.gone is not None:
                return
            m.accrue(now)
            m.gone = now
            m.gone_reason = reason

    def billing(self) -> list[dict[str, Any]]:
        """Machines that still exist, so still cost money."""
        return [m for m in self.machines() if m["gone_at"] is None]

    def machines(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        with self._lock:
            for m in self._machines.values():
                accrued = m.accrued_usd
                if m.gone is None:
                    accrued += m.cost_per_hr * max(0.0, now - m._since) / 3600.0
                out.append({
                    "id": m.id, "name": m.name, "status": m.status, "cost_per_hr": m.cost_per_hr,
                    "created_at": iso_now(m.created), "gone_at": None if m.gone is None else iso_now(m.gone),
                    "gone_reason": m.gone_reason or None, "accrued_usd": round(accrued, 6),
                })
        return out

    def record_request(self, method: str, path: str, status: int, who: str) -> None:
        with self._lock:
            self._requests.append({"t": round(time.time(), 3), "method": method, "path": path,
                                   "status": status, "auth": who})

    def record_rate_limit_violation(self, method: str, path: str, window: str, retry_after: int) -> None:
        with self._lock:
            self._violations.append({"t": round(time.time(), 3), "method": method, "path": path,
                                     "window": window, "retry_after": retry_after})

    def record_spec_mismatch(self, direction: str, method: str, path: str, status: int | None,
                             errors: list[str]) -> None:
        with self._lock:
            self._spec.append({"direction": direction, "method": method, "path": path, "status": status,
                               "errors": errors})

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def rate_limit_violations(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._violations)

    def spec_mismatches(self, direction: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self._spec if direction is None or m["direction"] == direction]


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateWindow:
    """``quota`` requests per fixed window of ``seconds`` (the window starts at its first request)."""

    name: str
    quota: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> RateWindow:
        """``minute=60/60`` -> 60 requests per 60 s window named minute."""
        name, _, rest = text.partition("=")
        quota, _, seconds = rest.partition("/")
        if not name or not quota or not seconds:
            raise ValueError(f"rate window {text!r}: expected NAME=QUOTA/SECONDS, e.g. minute=60/60")
        return cls(name.strip(), int(quota), float(seconds))


@dataclass
class RateDecision:
    allowed: bool
    headers: dict[str, str]
    window: str = ""  # the exhausted window when not allowed
    retry_after: int = 0


class RateLimiter:
    """Per-principal fixed windows; a request counts in every window, and any exhausted window
    refuses it (the refused request itself does not count). Headers follow the IETF
    ratelimit-headers draft as RunPod sends them: ``RateLimit-Policy: "minute";q=60;w=60`` and
    ``RateLimit: "minute";r=59;t=60``."""

    def __init__(self, windows: Iterable[RateWindow]) -> None:
        self.windows = list(windows)
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str], tuple[float, int]] = {}  # (principal, window) -> (start, count)

    def policy_header(self) -> str:
        return ", ".join(f'"{w.name}";q={w.quota};w={math.ceil(w.seconds)}' for w in self.windows)

    def check(self, principal: str) -> RateDecision:
        if not self.windows:
            return RateDecision(True, {})
        now = time.monotonic()
        with self._lock:
            current: list[tuple[RateWindow, float, int]] = []
            for w in self.windows:
                start, count = self._state.get((principal, w.name), (now, 0))
                if now >= start + w.seconds:
                    start, count = now, 0
                current.append((w, start, count))
            exhausted = [(w, start) for w, start, count in current if count >= w.quota]
            if not exhausted:
                for w, start, count in current:
                    self._state[(principal, w.name)] = (start, count + 1)
                current = [(w, start, count + 1) for w, start, count in current]
            parts = []
            for w, start, count in current:
                reset = max(1, math.ceil(start + w.seconds - now))
                parts.append(f'"{w.name}";r={max(0, w.quota - count)};t={reset}')
            headers = {"RateLimit": ", ".join(parts), "RateLimit-Policy": self.policy_header()}
            if not exhausted:
                return RateDecision(True, headers)
            window, start = max(exhausted, key=lambda e: e[1] + e[0].seconds)
            retry_after = max(1, math.ceil(start + window.seconds - now))
            return RateDecision(False, headers, window.name, retry_after)

    def reset(self) -> None:
        with self._lock:
            self._state.clear()


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


class Faults:
    """Named fault counters and their parameters, armed from a test or ``POST /_fake/faults``.

    A counter ``n`` makes the next ``n`` matching events fail; ``take(name)`` consumes one.
    Parameters (a dict per fault) ride along, e.g. ``{"count": 2, "method": "GET"}``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._params: dict[str, dict[str, Any]] = {}

    def arm(self, name: str, count: int, **params: Any) -> None:
        with self._lock:
            self._counts[name] = max(0, int(count))
            self._params[name] = params

    def take(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        """Consume one occurrence of ``name`` (when ``match`` accepts its params); its params, or None."""
        with self._lock:
            if self._counts.get(name, 0) <= 0:
                return None
            params = self._params.get(name, {})
            if match is not None and not match(params):
                return None
            self._counts[name] -= 1
            return dict(params)

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self._params.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: {"count": v, **self._params.get(k, {})} for k, v in self._counts.items() if v > 0}


# --------------------------------------------------------------------------------------------
# Machine processes
# --------------------------------------------------------------------------------------------


class MachineProcess:
    """A machine's start command, running in its own session (process group) in a directory that
    stands in for the machine, its output appended to ``log_path``. ``kill()`` ends the whole group."""

    def __init__(self, argv: list[str], *, cwd: Path, env: Mapping[str, str], log_path: Path) -> None:
        self.argv = argv
        self.cwd = cwd
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawn_error: str | None = None
        self._exit_code: int | None = None

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            try:
                self.proc = subprocess.Popen(
                    self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:  # the image has no such program: the container exits at once
                self.spawn_error = f"exec {self.argv[0] if self.argv else '?'}: {exc.strerror or exc}"
                out.write((self.spawn_error + "\n").encode())
                self._exit_code = 127

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def poll(self) -> int | None:
        """The exit code once the main process has ended, else None."""
        if self.proc is None:
            return self._exit_code
        return self.proc.poll()

    def kill(self, grace_s: float = 1.0, *, wait: bool = True) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace_s``. With ``wait=False`` the SIGKILL
        follows from a background thread (so a request made by the machine itself can be answered)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # the leader of its own session
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        if wait:
            self._finish(pgid, grace_s)
        else:
            threading.Thread(target=self._finish, args=(pgid, grace_s), daemon=True).start()

    def _finish(self, pgid: int, grace_s: float) -> None:
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # the group's stragglers too, even when the leader left
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)


# --------------------------------------------------------------------------------------------
# Spec validation (optional)
# --------------------------------------------------------------------------------------------


class SpecValidator(Protocol):
    """Checks traffic against a provider's spec; each method returns a list of mismatches."""

    def request_errors(self, req: FakeRequest) -> list[str]: ...

    def response_errors(self, req: FakeRequest, resp: FakeResponse, body: bytes) -> list[str]: ...


class OpenAPIValidator:
    """Validate requests and responses against an OpenAPI 3.x document with ``openapi-core``.

    ``server_url`` is the spec's server the traffic stands for (the fake's own host differs).
    Paths outside the spec (``/_fake/...``) are not checked. Also usable outside a fake:
    :meth:`check_request` / :meth:`check_response` take plain values (e.g. from httpx event hooks).
    """

    def __init__(self, spec_path: str | Path, *, server_url: str | None = None) -> None:
        from openapi_core import OpenAPI
        from openapi_core.configurations import Config

        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        self.server_url = (server_url or spec.get("servers", [{}])[0].get("url", "")).rstrip("/")
        config = Config(
            spec_validator_cls=None,  # the spec is a given: checking the document itself costs seconds
            extra_media_type_deserializers={
                "application/problem+json": lambda b: json.loads(b),
                "text/event-stream": lambda b: b.decode("utf-8") if isinstance(b, bytes) else b,
            },
        )
        self._api = OpenAPI.from_dict(spec, config=config)
        self._lock = threading.Lock()  # openapi-core's caches are not documented as thread-safe

    @classmethod
    def cached(cls, spec_path: str | Path, *, server_url: str | None = None) -> OpenAPIValidator:
        """One validator per spec file and process (building one takes a while)."""
        return _cached_validator(str(Path(spec_path).resolve()), server_url)

    # ---- plain-value API

    def check_request(self, method: str, path: str, query: str, headers: Mapping[str, str],
                      body: bytes | None) -> list[str]:
        req = self._request(method, path, query, headers, body)
        return self._run(lambda: self._api.validate_request(req))

    def check_response(self, method: str, path: str, query: str, req_headers: Mapping[str, str],
                       req_body: bytes | None, status: int, headers: Mapping[str, str], body: bytes) -> list[str]:
        from werkzeug.datastructures import Headers

        req = self._request(method, path, query, req_headers, req_body)
        resp = _OAResponse(status, body, _content_type(headers), Headers(list(headers.items())))
        return self._run(lambda: self._api.validate_response(req, resp))

    def in_spec(self, path: str) -> bool:
        return not path.startswith("/_fake/")

    # ---- SpecValidator

    def request_errors(self, req: FakeRequest) -> list[str]:
        if not self.in_spec(req.path):
            return []
        return self.check_request(req.method, req.path, req.raw_query, dict(req.headers.items()), req.body)

    def response_errors(self, req: FakeRequest, resp: FakeResponse, body: bytes) -> list[str]:
        if not self.in_spec(req.path):
            return []
        headers = dict(resp.headers)
        if resp.content_type:
            headers["Content-Type"] = resp.content_type
        return self.check_response(req.method, req.path, req.raw_query, dict(req.headers.items()), req.body,
                                   resp.status, headers, body)

    # ---- internals

    def _request(self, method: str, path: str, query: str, headers: Mapping[str, str],
                 body: bytes | None) -> _OARequest:
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        pairs = [(k, v) for k, vs in parse_qs(query, keep_blank_values=True).items() for v in vs]
        params = RequestParameters(query=ImmutableMultiDict(pairs), header=Headers(list(headers.items())))
        return _OARequest(self.server_url, path, method.lower(), params, body or None, _content_type(headers))

    def _run(self, fn: Callable[[], Any]) -> list[str]:
        with self._lock:
            try:
                fn()
            except Exception as exc:
                return _describe(exc)
        return []


@functools.lru_cache(maxsize=8)
def _cached_validator(spec_path: str, server_url: str | None) -> OpenAPIValidator:
    return OpenAPIValidator(spec_path, server_url=server_url)


def _content_type(headers: Mapping[str, str]) -> str:
    for k, v in headers.items():
        if k.lower() == "content-type":
            return v.lower()
    return ""


@dataclass
class _OARequest:
    host_url: str
    path: str
    method: str
    parameters: Any
    body: bytes | None
    content_type: str


@dataclass
class _OAResponse:
    status_code: int
    data: bytes | None
    content_type: str
    headers: Any


def _describe(exc: BaseException) -> list[str]:
    """Short messages for an openapi-core error (its str() embeds the whole schema)."""
    out: list[str] = []
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        for se in getattr(e, "schema_errors", None) or ():
            out.append(f"{getattr(se, 'json_path', '$')}: {getattr(se, 'message', se)}")
        for sub in getattr(e, "errors", None) or ():  # grouped errors (parameters, headers)
            if isinstance(sub, BaseException):
                stack.append(sub)
        if e.__cause__ is not None:
            stack.append(e.__cause__)
    if not out:
        out.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    return out


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        req = FakeRequest(self.command.upper(), split.path, parse_qs(split.query, keep_blank_values=True),
                          self.headers, body, split.query)
        resp = fake.dispatch(req)
        if resp.delay_s > 0:
            fake.sleep(resp.delay_s)
        if resp.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if resp.content_type:
            self.send_header("Content-Type", resp.content_type)
        if resp.stream is not None:
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for chunk in resp.stream:
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except OSError:  # the client went away
                pass
            finally:
                close = getattr(resp.stream, "close", None)
                if close is not None:
                    close()
            return
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body and self.command.upper() != "HEAD":
            self.wfile.write(resp.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], fake: FakeServer) -> None:
        self.fake = fake
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (e.g. timed out): normal
            return
        super().handle_error(request, client_address)


class FakeServer:
    """Base of the provider fakes: serve on ``host:port`` (0 = any free port) from a thread.

    Subclasses implement :meth:`route` (the provider's paths), and may implement :meth:`tick`
    (called every ``tick_s`` from a background thread, and before each request), :meth:`apply_faults`
    and :meth:`extra_state`. Use it as a context manager or call :meth:`start` / :meth:`stop`.
    """

    provider = "fake"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, rate_limits: Iterable[RateWindow] = (),
                 validator: SpecValidator | None = None, work_dir: str | Path | None = None,
                 tick_s: float = 0.05) -> None:
        self.host = host
        self.port = port
        self.ledger = Ledger()
        self.faults = Faults()
        self.rate_limiter = RateLimiter(rate_limits)
        self.validator = validator
        self.tick_s = tick_s
        self._own_work_dir = work_dir is None
        self.work_dir = (Path(work_dir) if work_dir is not None
                         else Path(tempfile.gettempdir()) / f"fake-{self.provider}-{secrets.token_hex(6)}")
        self._server: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.lock = threading.RLock()  # guards the subclass's provider state

    # ---- lifecycle

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host if isinstance(host, str) else host.decode()}:{port}"

    def start(self) -> FakeServer:
        if self._server is not None:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._server = _HTTPServer((self.host, self.port), self)
        self.port = int(self._server.server_address[1])
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                 name=f"fake-{self.provider}-http", daemon=True)
        ticker = threading.Thread(target=self._tick_loop, name=f"fake-{self.provider}-tick", daemon=True)
        self._threads = [serve, ticker]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop serving and kill every machine process (the ledger keeps its records)."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(timeout=5.0)
        self.shutdown_machines()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_until_stopped(self) -> None:
        """Block until SIGINT/SIGTERM (for ``python -m trainorch_jupyter.fakes``)."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        self.stop()

    def sleep(self, seconds: float) -> None:
        """Sleep that ends early when the fake stops."""
        self._stopping.wait(seconds)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ---- dispatch

    def dispatch(self, req: FakeRequest) -> FakeResponse:
        if req.path.startswith("/_fake/"):
            return self._internal(req)
        self._safe_tick()
        if self.validator is not None:
            errors = self.validator.request_errors(req)
            if errors:
                self.ledger.record_spec_mismatch("request", req.method, req.path, None, errors)
        try:
            resp = self.route(req)
        except Exception as exc:  # a bug in the fake must still answer (and show in the state)
            resp = json_response(500, {"title": "Internal Server Error", "status": 500,
                                       "detail": f"fake {self.provider} crashed: {type(exc).__name__}: {exc}"},
                                 content_type="application/problem+json")
            self.ledger.record_spec_mismatch("fake-crash", req.method, req.path, 500, [repr(exc)])
        self.ledger.record_request(req.method, req.path, 0 if resp.drop else resp.status, self.who(req))
        if self.validator is not None and not resp.drop:  # a stream: its status, headers and type
            errors = self.validator.response_errors(req, resp, resp.body if resp.stream is None else b": stream\n\n")
            if errors:
                self.ledger.record_spec_mismatch("response", req.method, req.path, resp.status, errors)
        return resp

    def who(self, req: FakeRequest) -> str:
        """How the request authenticated, for the request log (never the credential itself)."""
        return "bearer" if req.bearer else "none"

    def _internal(self, req: FakeRequest) -> FakeResponse:
        if req.path == "/_fake/state" and req.method == "GET":
            return json_response(200, self.state())
        if req.path == "/_fake/faults" and req.method == "POST":
            try:
                body = req.json() or {}
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                self.apply_faults(body)
            except (ValueError, TypeError, KeyError) as exc:
                return json_response(400, {"error": f"bad faults body: {exc}"})
            return json_response(200, {"faults": self.faults.snapshot()})
        return json_response(404, {"error": f"no fake endpoint {req.method} {req.path}"})

    def _tick_loop(self) -> None:
        while not self._stopping.wait(self.tick_s):
            self._safe_tick()

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # never let the ticker die silently
            self.ledger.record_spec_mismatch("fake-crash", "TICK", "", None, [repr(exc)])

    # ---- what subclasses provide

    def route(self, req: FakeRequest) -> FakeResponse:
        raise NotImplementedError

    def tick(self) -> None:
        """Advance time-driven state (status progressions, process exits)."""

    def apply_faults(self, body: dict[str, Any]) -> None:
        """Arm faults from a JSON object. The base knows the generic counters."""
        for name, value in body.items():
            if isinstance(value, bool) or not isinstance(value, int | dict):
                raise ValueError(f"fault {name!r}: expected a count or an object with 'count'")
            if isinstance(value, int):
                self.faults.arm(name, value)
            else:
                params = dict(value)
                self.faults.arm(name, int(params.pop("count", 1)), **params)

    def shutdown_machines(self) -> None:
        """Kill every machine process (called by :meth:`stop`)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    # ---- state

    def state(self) -> dict[str, Any]:
        billing = self.ledger.billing()
        return {
            "provider": self.provider,
            "machines_billing": len(billing),
            "billing": billing,
            "machines": self.ledger.machines(),
            "requests": self.ledger.requests(),
            "rate_limit_violations": self.ledger.rate_limit_violations(),
            "spec_mismatches": self.ledger.spec_mismatches(),
            "faults": self.faults.snapshot(),
            **self.extra_state(),
        }
