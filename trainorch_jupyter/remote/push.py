"""Pushing the runner to a machine's stage-0 over the pinned channel (``docs/PROTOCOL.md`` section 4)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any

import httpx

from ..model import RunnerError

log = logging.getLogger(__name__)

ANSWER_LIMIT = 64 << 10  # stage-0 and the runner answer a few bytes here; more is refused unread
RETRY_MIN_S = 0.2
RETRY_MAX_S = 2.0
REQUEST_TIMEOUT_S = 30.0


class RunnerRefused(RunnerError):
    """Stage-0 or the runner refused the push for a reason that waiting will not change (401, a hash mismatch)."""


def _describe(exc: BaseException) -> str:
    # httpx's message names the URL at most; the request (and its Authorization header) is not shown.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _request(http: httpx.AsyncClient, method: str, url: str, headers: dict[str, str], timeout: float,
                   content: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body or None), the body read up to ANSWER_LIMIT bytes."""
    request = http.build_request(method, url, headers=headers, content=content, timeout=httpx.Timeout(timeout))
    response = await http.send(request, stream=True)
    try:
        buf = bytearray()
        async for block in response.aiter_bytes():
            buf += block
            if len(buf) > ANSWER_LIMIT:
                raise RunnerError(f"{method} {url}: the answer is larger than {ANSWER_LIMIT} bytes")
    finally:
        await response.aclose()
    try:
        body = json.loads(bytes(buf)) if buf else None
    except ValueError:
        body = None
    return response.status_code, body


def _error_of(body: Any) -> str:
    return str(body.get("error"))[:300] if isinstance(body, dict) and body.get("error") else "no reason given"


async def push_runner(http: httpx.AsyncClient, base_url: str, token: str, runner_source: bytes, *,
                      timeout: float) -> None:
    """Bring the full runner up at ``base_url``: wait for stage-0, push ``runner_source`` to it, wait for the runner.

    Polls ``GET /v1/health`` (connection errors, TLS failures, 5xx and 503 are retried with a short backoff
    until ``timeout`` seconds have passed). When stage-0 answers (``"stage": 0``) it sends ``PUT /v1/runner``;
    it returns once the full runner answers health (no ``"stage"``): at once when it already does (the runner
    was pushed before, e.g. by an earlier kernel). A lost answer to the push is harmless: the next health poll
    finds stage-0 again (push again) or the runner (done). :class:`RunnerRefused` for a ``401`` (the token is
    not this machine's) or a ``400`` to the push (the runner's SHA-256 is not the one the stage-0 command
    expects); :class:`~trainorch_jupyter.model.RunnerError` when the deadline passes, with the last reason.
    Use a client from :func:`~trainorch_jupyter.remote.runner_http_client` (pinned to the job's certificate):
    a machine that does not hold the job's key never gets the token.
    """
    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"}
    expected = hashlib.sha256(runner_source).hexdigest()
    deadline = time.monotonic() + timeout
    delay = RETRY_MIN_S
    last = "no answer yet"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunnerError(f"the runner at {base} did not come up within {timeout:g}s ({last})")
        per_request = max(0.5, min(REQUEST_TIMEOUT_S, left))
        try:
            status, body = await _request(http, "GET", base + "/v1/health", headers, per_request)
            if status == 401:
                raise RunnerRefused(f"the machine at {base} refused this job's token (HTTP 401)")
            if status == 200 and isinstance(body, dict) and body.get("ok"):
                if body.get("stage") != 0:
                    return  # the full runner
                log.debug("stage-0 at %s answers: pushing the runner (sha256 %s)", base, expected)
                status, body = await _request(http, "PUT", base + "/v1/runner",
                                              {**headers, "Content-Type": "application/octet-stream"},
                                              max(per_request, 10.0), content=runner_source)
                if status == 200:
                    delay = RETRY_MIN_S
                    last = "the runner was pushed; it has not answered yet"
                    continue
                if status in (400, 401, 413):
                    raise RunnerRefused(f"stage-0 at {base} refused the runner (HTTP {status}): {_error_of(body)}")
                last = f"the push was answered with HTTP {status}: {_error_of(body)}"
            else:
                last = f"health answered HTTP {status}: {_error_of(body)}"
        except httpx.HTTPError as exc:
            last = _describe(exc)
        await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, RETRY_MAX_S)
