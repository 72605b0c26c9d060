"""Async client of the runner's HTTP protocol (``docs/PROTOCOL.md`` section 2).

The bearer token only ever travels in the ``Authorization`` header: it is never put in a URL, a log
record, a ``repr`` or an exception message. Idempotent calls (GETs, cancel, the PUT of an input) retry
transient failures (connection errors, timeouts, 5xx) a few times with a short exponential backoff;
every failure ends as :class:`~trainorch_jupyter.model.RunnerError`.

A runner's answers are not trusted: every body is read up to a bound that fits its kind (an answer over
it is refused, never buffered whole), offsets must move forward by what was sent, and a manifest must be
of a sane size.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from .model import RunnerError

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS = 4
RETRY_WAIT_MIN_S = 0.2
RETRY_WAIT_MAX_S = 2.0
UPLOAD_CHUNK = 1 << 20
MAX_SERVER_WAIT_S = 25.0  # the runner caps long-polls here
LONG_POLL_MARGIN_S = 15.0

# Bounds on what a runner may answer (bytes of body unless said otherwise).
JSON_BODY_LIMIT = 1 << 20  # health, status, start, cancel, upload answers
ERROR_BODY_LIMIT = 64 << 10  # an error answer is read this far (its message is cut to 500 characters anyway)
DEFAULT_LOG_LIMIT = 1 << 20  # what the runner sends when no limit is asked
MAX_LOG_LIMIT = 16 << 20  # the runner's own cap on a log read
METRICS_BODY_LIMIT = 4 << 20  # the runner sends at most 1 MiB of metrics lines per answer
MANIFEST_BODY_LIMIT = 64 << 20
MAX_MANIFEST_FILES = 100_000
MAX_MANIFEST_TOTAL_BYTES = 16 << 40  # 16 TiB: more than any training machine's disk


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    next_offset: int
    complete: bool


@dataclass(frozen=True)
class MetricsChunk:
    metrics: list[dict[str, Any]]
    next_offset: int
    complete: bool


class RunnerHTTPError(RunnerError):
    """The runner answered with a non-2xx status. ``status`` and ``error`` (its message) tell why."""

    def __init__(self, method: str, path: str, status: int, error: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.error = error
        super().__init__(f"runner {method} {path}: HTTP {status}: {error}")


class RunnerAnswerTooLarge(RunnerError):
    """The runner's answer was larger than this kind of answer may be."""


class _Transient(Exception):
    """A 5xx answer worth retrying (internal: becomes RunnerHTTPError when retries run out)."""

    def __init__(self, error: RunnerHTTPError) -> None:
        super().__init__(str(error))
        self.error = error


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _Transient | httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        text = body["error"]
    else:
        text = response.text.strip() or response.reason_phrase
    return text[:500]


async def _read_bounded(response: httpx.Response, limit: int, what: str, *, truncate: bool = False) -> bytes:
    """The body of a streamed ``response``, at most ``limit`` bytes: RunnerAnswerTooLarge beyond (or, with
    ``truncate``, the first ``limit`` bytes)."""
    declared = response.headers.get("Content-Length", "").strip()
    if not truncate and declared.isdigit() and int(declared) > limit:
        raise RunnerAnswerTooLarge(f"runner {what}: the answer is {int(declared)} bytes, more than the {limit} "
                                   "bytes this answer may be")
    buf = bytearray()
    async for block in response.aiter_bytes():
        buf += block
        if len(buf) > limit:
            if truncate:
                return bytes(buf[:limit])
            raise RunnerAnswerTooLarge(f"runner {what}: the answer is more than the {limit} bytes this answer may be")
    return bytes(buf)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(UPLOAD_CHUNK)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


class RunnerClient:
    """One runner, at ``base_url``, with its bearer ``token``."""

    def __init__(self, base_url: str, token: str, *, http: httpx.AsyncClient | None = None,
                 request_timeout: float = 30.0) -> None:
        if not token:
            raise ValueError("a runner token is required")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=request_timeout)
        self.request_timeout = request_timeout

    def __repr__(self) -> str:
        return f"RunnerClient({self.base_url!r})"

    # ------------------------------------------------------------------ helpers

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def file_url(self, path: str) -> str:
        """URL of an output file; ``path`` is the manifest's relative POSIX path."""
        return f"{self.base_url}/v1/files/" + "/".join(quote(seg, safe="") for seg in path.split("/"))

    def _timeout(self, read: float | None = None) -> httpx.Timeout:
        t = self.request_timeout
        return httpx.Timeout(t, read=max(t, read) if read is not None else t)

    async def _send(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                    json_body: Any = None, content: Any = None, headers: dict[str, str] | None = None,
                    read_timeout: float | None = None, timeout: httpx.Timeout | None = None,
                    ok_statuses: tuple[int, ...] = (), max_body: int = JSON_BODY_LIMIT) -> httpx.Response:
        """One request; 5xx raises _Transient, other non-2xx RunnerHTTPError, transport errors pass through.

        The answer's body is read up to ``max_body`` bytes (RunnerAnswerTooLarge beyond); the response
        returned holds it, read."""
        all_headers = self.auth_headers()
        if headers:
            all_headers.update(headers)
        kwargs: dict[str, Any] = {"params": params, "headers": all_headers, "timeout": timeout or self._timeout(read_timeout)}
        if json_body is not None:
            kwargs["json"] = json_body
        if content is not None:
            kwargs["content"] = content
        request = self._http.build_request(method, self.base_url + path, **kwargs)
        streamed = await self._http.send(request, stream=True)
        ok = streamed.is_success or streamed.status_code in ok_statuses
        try:
            if ok:
                body = await _read_bounded(streamed, max_body, f"{method} {path}")
            else:
                body = await _read_bounded(streamed, ERROR_BODY_LIMIT, f"{method} {path}", truncate=True)
        finally:
            await streamed.aclose()
        answer_headers = httpx.Headers(streamed.headers)
        answer_headers.pop("Content-Encoding", None)  # the body kept here is already decoded
        response = httpx.Response(streamed.status_code, headers=answer_headers, content=body, request=request)
        if ok:
            return response
        error = RunnerHTTPError(method, path, response.status_code, _error_text(response))
        if response.status_code >= 500:
            raise _Transient(error)
        raise error

    async def _call(self, method: str, path: str, *, retry: bool, **kwargs: Any) -> httpx.Response:
        async def once() -> httpx.Response:
            return await self._send(method, path, **kwargs)

        return await self._run(method, path, once, retry=retry)

    async def _run(self, method: str, path: str, fn: Callable[[], Awaitable[T]], *, retry: bool) -> T:
        try:
            if not retry:
                return await fn()
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(RETRY_ATTEMPTS),
                wait=wait_exponential(multiplier=RETRY_WAIT_MIN_S, min=RETRY_WAIT_MIN_S, max=RETRY_WAIT_MAX_S),
                retry=retry_if_exception(_is_transient),
                reraise=True,
                before_sleep=lambda state: log.debug(
                    "runner %s %s: retrying after %s", method, path,
                    type(state.outcome.exception()).__name__ if state.outcome else "?"),
            ):
                with attempt:
                    return await fn()
        except _Transient as exc:
            raise exc.error from None
        except httpx.HTTPError as exc:
            # The httpx exception holds the request (and its Authorization header): do not chain it.
            detail = str(exc) or type(exc).__name__
            raise RunnerError(f"runner {method} {path} at {self.base_url} failed: {type(exc).__name__}: {detail}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise RunnerError(f"runner answered {response.request.method} {response.request.url.path} "
                              f"with a body that is not JSON") from None

    # ------------------------------------------------------------------ API

    @classmethod
    def _json_object(cls, response: httpx.Response) -> dict[str, Any]:
        body = cls._json(response)
        if not isinstance(body, dict):
            raise RunnerError(f"runner answered {response.request.method} {response.request.url.path} "
                              f"with JSON that is not an object")
        return body

    async def health(self) -> dict[str, Any]:
        return self._json_object(await self._call("GET", "/v1/health", retry=True))

    async def wait_ready(self, timeout: float, interval: float = 0.2) -> dict[str, Any]:
        """Poll health until the runner answers ok; RunnerError after ``timeout`` seconds (at once on 4xx)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            left = max(0.5, min(self.request_timeout, deadline - time.monotonic()))
            try:
                response = await self._send("GET", "/v1/health", timeout=httpx.Timeout(left))
                body = self._json(response)
                if isinstance(body, dict) and body.get("ok"):
                    return body
                last = f"health answered {body!r}"
            except RunnerHTTPError:
                raise  # 401 and friends will not heal by waiting
            except _Transient as exc:
                last = str(exc.error)
            except (httpx.HTTPError, RunnerError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunnerError(f"the runner at {self.base_url} was not ready within {timeout:g}s ({last})")
            await asyncio.sleep(min(interval, left))

    async def upload_input(self, name: str, path: Path) -> dict[str, Any]:
        """Upload one input file as ``inputs/<name>``; the runner keeps it only if the SHA-256 matches."""
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise RunnerError(f"input name {name!r} is not one plain file name")
        path = Path(path)
        digest, size = await asyncio.to_thread(_sha256_file, path)
        # A runner refuses an input over its cap with 413, but a client still sending a big body may only
        # see the connection reset: ask first (a runner that does not say is not checked here).
        limit = (await self.health()).get("max_upload_bytes")
        if isinstance(limit, int) and not isinstance(limit, bool) and size > limit:
            raise RunnerHTTPError("PUT", f"/v1/inputs/{name}", 413,
                                  f"the input is {size} bytes; this runner takes at most {limit} bytes per input")

        async def body() -> AsyncIterator[bytes]:
            f = await asyncio.to_thread(open, path, "rb")
            try:
                while True:
                    block = await asyncio.to_thread(f.read, UPLOAD_CHUNK)
                    if not block:
                        return
                    yield block
            finally:
                f.close()

        async def once() -> httpx.Response:
            # A fresh body stream per attempt: the PUT is idempotent.
            return await self._send("PUT", "/v1/inputs/" + quote(name, safe=""), content=body(),
                                    headers={"X-Sha256": digest, "Content-Length": str(size),
                                             "Content-Type": "application/octet-stream"})

        return self._json_object(await self._run("PUT", f"/v1/inputs/{name}", once, retry=True))

    async def start(self, command: list[str], *, env: dict[str, str] | None = None,
                    max_runtime_s: float | None = None, grace_s: float = 10.0, cwd: str | None = None) -> dict[str, Any]:
        body = {"command": list(command), "env": dict(env or {}), "cwd": cwd, "max_runtime_s": max_runtime_s,
                "grace_s": grace_s}
        return self._json_object(await self._call("POST", "/v1/start", retry=False, json_body=body))

    async def status(self) -> dict[str, Any]:
        return self._json_object(await self._call("GET", "/v1/status", retry=True))

    async def read_logs(self, offset: int, *, wait: float = 20.0, limit: int | None = None) -> LogChunk:
        params: dict[str, Any] = {"offset": offset, "wait": wait}
        if limit is not None:
            params["limit"] = limit
        cap = DEFAULT_LOG_LIMIT if limit is None else max(1, min(limit, MAX_LOG_LIMIT))
        response = await self._call("GET", "/v1/logs", retry=True, params=params, max_body=cap,
                                    read_timeout=min(wait, MAX_SERVER_WAIT_S) + LONG_POLL_MARGIN_S)
        raw = response.headers.get("X-Next-Offset", "").strip()
        if not raw.isdigit():
            raise RunnerError("runner GET /v1/logs: the answer has no valid X-Next-Offset header")
        next_offset = int(raw)
        data = response.content
        if next_offset != offset + len(data):
            raise RunnerError(f"runner GET /v1/logs: X-Next-Offset {next_offset} does not follow from offset "
                              f"{offset} and the {len(data)} bytes sent")
        return LogChunk(data=data, next_offset=next_offset, complete=response.headers.get("X-Log-Complete") == "1")

    async def read_metrics(self, offset: int, *, wait: float = 20.0) -> MetricsChunk:
        response = await self._call("GET", "/v1/metrics", retry=True, params={"offset": offset, "wait": wait},
                                    max_body=METRICS_BODY_LIMIT,
                                    read_timeout=min(wait, MAX_SERVER_WAIT_S) + LONG_POLL_MARGIN_S)
        body = self._json(response)
        if not isinstance(body, dict) or not isinstance(body.get("metrics"), list):
            raise RunnerError("runner GET /v1/metrics: unexpected answer")
        metrics = body["metrics"]
        next_offset = body.get("next_offset")
        if not isinstance(next_offset, int) or isinstance(next_offset, bool):
            raise RunnerError("runner GET /v1/metrics: the answer has no valid next_offset")
        # next_offset counts bytes of the runner's metrics.jsonl, which holds each metric as the compact
        # JSON sent here plus a newline: an answer with metrics moves forward, by no more than it sent.
        if next_offset < offset or (metrics and not offset < next_offset <= offset + len(response.content)):
            raise RunnerError(f"runner GET /v1/metrics: next_offset {next_offset} does not follow from offset "
                              f"{offset} and the {len(metrics)} metrics sent")
        return MetricsChunk(metrics=[m for m in metrics if isinstance(m, dict)], next_offset=next_offset,
                            complete=bool(body.get("complete")))

    async def cancel(self, grace_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {} if grace_s is None else {"grace_s": grace_s}
        return self._json_object(await self._call("POST", "/v1/cancel", retry=True, json_body=body))

    async def manifest(self) -> dict[str, Any] | None:
        """The output manifest, or None while the command still runs. A manifest of more than
        MAX_MANIFEST_FILES files or MAX_MANIFEST_TOTAL_BYTES in all, or whose sizes are not counts that add
        up to its ``total_size``, is refused."""
        response = await self._call("GET", "/v1/manifest", retry=True, ok_statuses=(409,),
                                    max_body=MANIFEST_BODY_LIMIT)
        if response.status_code == 409:
            return None
        manifest = self._json_object(response)
        files = manifest.get("files")
        if not isinstance(files, list):
            raise RunnerError("runner GET /v1/manifest: the answer has no 'files' list")
        if len(files) > MAX_MANIFEST_FILES:
            raise RunnerError(f"runner GET /v1/manifest: {len(files)} files, more than the {MAX_MANIFEST_FILES} "
                              "a job's output may have")
        total = 0
        for i, entry in enumerate(files):
            size = entry.get("size") if isinstance(entry, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RunnerError(f"runner GET /v1/manifest: file entry {i} has no valid size")
            total += size
        if total > MAX_MANIFEST_TOTAL_BYTES:
            raise RunnerError(f"runner GET /v1/manifest: {total} bytes in all, more than the "
                              f"{MAX_MANIFEST_TOTAL_BYTES} a job's output may have")
        declared = manifest.get("total_size", total)
        if declared != total or isinstance(declared, bool):
            raise RunnerError(f"runner GET /v1/manifest: total_size {declared!r} is not the sum of the file "
                              f"sizes ({total})")
        return manifest

    async def shutdown(self) -> None:
        await self._call("POST", "/v1/shutdown", retry=False, json_body={})

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> RunnerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
