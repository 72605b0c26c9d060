"""An HTTP client of Lambda's Cloud API v1 (``https://cloud.lambda.ai/api/v1/...``): instance types, instances,
SSH keys.

Provisioning only; the Lambda provider (:mod:`.lambdacloud`) builds on it. It follows the RunPod client
(:mod:`.runpod_api`) and reuses its pacer. What it guarantees:

- **The key** travels only in the ``Authorization: Bearer`` header of each request (never on a shared client,
  never in a URL), and never appears in a repr, a log line or an exception message (any echo of it in an answer
  is redacted). A plain-``http`` base URL is refused unless it is loopback (a fake).
- **Pacing** to Lambda's documented limits: about 1 request/s for the account (``request_interval_s``) and one
  ``/instance-operations/launch`` per 12 s (``launch_interval_s``, measured between the moments launches are sent:
  :class:`LaunchPacer`), both held back client-side before a request is sent (Lambda sends no rate-limit headers). A 429 (Cloudflare's "error code: 1015", plain text, maybe no
  ``Retry-After``) blocks every request of the client for the retry's wait.
- **Retries** (tenacity): a 429 is retried for any call (it is refused before anything happens); 5xx answers,
  timeouts and broken connections only for calls that are safe to repeat (GETs, terminate, deleting a key). A
  launch is **never** retried once it may have reached Lambda: a 5xx, a timeout or a cut connection raise
  :class:`LambdaUnavailable` with ``maybe_created=True``: list instances by name and adopt or terminate what is
  there. (A connection that could not even be opened is retried: nothing was sent.)
- **Errors** are classified from the spec's envelope ``{"error": {"code", "message", "suggestion"}}`` by its
  ``code``: :class:`LambdaAuthError` (401 ``global/invalid-api-key``, 403 ``global/account-inactive`` /
  ``global/invalid-address``), :class:`LambdaNoCapacity` (``instance-operations/launch/insufficient-capacity``),
  :class:`LambdaQuotaExceeded` (``global/quota-exceeded``; both are :class:`~trainorch_jupyter.model.CapacityError`),
  :class:`LambdaInvalidRequest` (``global/invalid-parameters`` and the other 400s), :class:`LambdaNotFound`
  (``global/object-does-not-exist``, 404), :class:`LambdaRateLimited` (429 after the retries) and
  :class:`LambdaUnavailable` (5xx, ``global/internal-error``, ``provider/*``, the network), each with a message
  that says what to change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from ..model import CapacityError, ProviderError
from ._api import ProviderAPIBase
from .runpod_api import PacingTooLong, RateLimitPacer, retry_after_s

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "GONE_STATUSES",
    "LAUNCH_INTERVAL_S",
    "REGIONS",
    "REQUEST_INTERVAL_S",
    "Instance",
    "InstanceType",
    "LambdaAPI",
    "LambdaAuthError",
    "LambdaError",
    "LambdaInvalidRequest",
    "LambdaNoCapacity",
    "LambdaNotFound",
    "LambdaQuotaExceeded",
    "LambdaRateLimited",
    "LambdaUnavailable",
    "LaunchPacer",
    "SSHKey",
    "check_base_url",
    "launch_body",
]

log = logging.getLogger(__name__)

PROVIDER = "lambda"
#: The spec's production server (1.8.3). ``https://cloud.lambdalabs.com`` is marked deprecated there and is said
#: to answer 301 now (httpx does not follow redirects): set ``TRAINORCH_LAMBDA_URL`` to use it anyway.
DEFAULT_BASE_URL = "https://cloud.lambda.ai"
BASE_URL_ENV = "TRAINORCH_LAMBDA_URL"
API_KEY_ENV = "LAMBDA_API_KEY"
API = "/api/v1"
#: Lambda's documented limits: about 1 request/s in general, one launch per 12 s (5 per minute).
REQUEST_INTERVAL_S = 1.0
LAUNCH_INTERVAL_S = 12.0
#: statuses of an instance that is going or gone (``preempted``: reclaimed; its meaning is not documented)
GONE_STATUSES = frozenset({"terminating", "terminated", "preempted"})
#: the spec's ``PublicRegionCode``
REGIONS = frozenset({
    "europe-central-1", "asia-south-1", "australia-east-1", "me-west-1", "asia-northeast-1", "asia-northeast-2",
    "us-east-1", "us-west-2", "us-west-1", "us-south-1", "us-west-3", "us-midwest-1", "us-east-2", "us-south-2",
    "us-south-3", "us-east-3", "us-midwest-2",
})
MAX_NAME = 64  # instance and SSH key names
USER_DATA_MAX = 1 << 20  # "plain text and cannot exceed 1MB"
_TAG_KEY = re.compile(r"^[a-z][a-z0-9-:]+$")
_HOSTNAME = re.compile(r"^[a-z0-9][0-9a-z-]{0,62}$")
_VRAM = re.compile(r"(\d+(?:\.\d+)?)\s*GB", re.IGNORECASE)
_PARENS = re.compile(r"\s*\([^)]*\)")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class LambdaError(ProviderError):
    """A Lambda API call failed. ``code``/``message``/``suggestion`` come from Lambda's error envelope (redacted);
    ``operation`` says what was being done."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "", api_message: str = "",
                 suggestion: str = "", operation: str = "", retryable: bool = False) -> None:
        super().__init__(PROVIDER, message, status=status, code=code or None, retryable=retryable)
        self.api_message = api_message
        self.suggestion = suggestion
        self.operation = operation


class LambdaAuthError(LambdaError):
    """401: the key is missing, wrong, expired or deleted; 403: the account is inactive or its billing address
    is not valid."""


class LambdaNoCapacity(LambdaError, CapacityError):
    """``instance-operations/launch/insufficient-capacity``: no machine of this type in this region right now."""


class LambdaQuotaExceeded(LambdaError, CapacityError):
    """``global/quota-exceeded``: the account may not run more instances (new accounts have low limits)."""


class LambdaInvalidRequest(LambdaError):
    """A 400 that the same request will meet again (``global/invalid-parameters``, a file system in the wrong
    region, a duplicate)."""


class LambdaRateLimited(LambdaError):
    """429 after every retry. ``retry_after`` is the last wait asked for, in seconds (if any)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, retryable=True, **kw)
        self.retry_after = retry_after


class LambdaUnavailable(LambdaError):
    """5xx, a timeout or a network error after the retries allowed. ``maybe_created`` is True when a launch may
    have made the instance anyway (list instances by name and adopt or terminate it)."""

    def __init__(self, message: str, *, maybe_created: bool = False, **kw: Any) -> None:
        super().__init__(message, retryable=True, **kw)
        self.maybe_created = maybe_created


class LambdaNotFound(LambdaError):
    """``global/object-does-not-exist``: no such instance (or SSH key, file system, instance type)."""


class _Transient(Exception):
    """A failure worth another try (internal: carries what happened to the last try)."""

    def __init__(self, *, response: httpx.Response | None = None, exc: httpx.TransportError | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__("transient")
        self.response = response
        self.exc = exc
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------
# What the API returns
# --------------------------------------------------------------------------------------------


def gpu_name_and_vram(gpu_description: str) -> tuple[str, float | None]:
    """``"A100 (40 GB SXM4)"`` -> ``("A100", 40.0)``; ``"RTX 6000 (24 GB)"`` -> ``("RTX 6000", 24.0)``."""
    match = _VRAM.search(gpu_description)
    name = _PARENS.sub("", gpu_description).strip() or gpu_description.strip()
    return name, float(match.group(1)) if match else None


@dataclass
class InstanceType:
    """One instance type of ``GET /instance-types`` with the regions that have capacity for it now (being listed
    there is no reservation: a launch can still fail with insufficient capacity)."""

    name: str  # e.g. gpu_1x_a100_sxm4
    description: str  # e.g. "1x A100 (40 GB SXM4)"
    gpu_description: str  # e.g. "A100 (40 GB SXM4)"
    price_cents_per_hour: int
    gpus: int
    vcpus: int = 0
    memory_gib: int = 0
    storage_gib: int = 0
    regions: tuple[str, ...] = ()  # regions with capacity now
    region_names: dict[str, str] = field(default_factory=dict, repr=False)  # region -> its description

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> InstanceType:
        t = item.get("instance_type") or {}
        specs = t.get("specs") or {}
        regions = [r for r in item.get("regions_with_capacity_available") or () if isinstance(r, dict) and r.get("name")]
        return cls(
            name=str(t["name"]), description=str(t.get("description") or ""),
            gpu_description=str(t.get("gpu_description") or ""), price_cents_per_hour=int(t.get("price_cents_per_hour") or 0),
            gpus=int(specs.get("gpus") or 0), vcpus=int(specs.get("vcpus") or 0),
            memory_gib=int(specs.get("memory_gib") or 0), storage_gib=int(specs.get("storage_gib") or 0),
            regions=tuple(str(r["name"]) for r in regions),
            region_names={str(r["name"]): str(r.get("description") or "") for r in regions},
        )

    @property
    def price_per_hour(self) -> float:
        """USD per hour for the whole machine (all its GPUs)."""
        return round(self.price_cents_per_hour / 100.0, 4)

    @property
    def gpu_name(self) -> str:
        return gpu_name_and_vram(self.gpu_description)[0]

    @property
    def vram_gb(self) -> float | None:
        return gpu_name_and_vram(self.gpu_description)[1]

    @property
    def available(self) -> bool:
        return bool(self.regions)


@dataclass
class Instance:
    """An instance as Lambda reports it. ``raw`` (which holds the instance's Jupyter token) stays out of the repr
    and must never be stored or shown."""

    id: str
    status: str
    name: str = ""
    ip: str | None = None
    region: str | None = None
    instance_type: str | None = None
    gpu_description: str = ""
    gpus: int = 0
    price_per_hour: float | None = None
    ssh_key_names: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None
    terminate_available: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Instance:
        itype = d.get("instance_type") or {}
        region = d.get("region") or {}
        actions = d.get("actions") or {}
        tags = {str(t.get("key")): str(t.get("value", "")) for t in d.get("tags") or () if isinstance(t, dict)}
        cents = itype.get("price_cents_per_hour")
        return cls(
            id=str(d["id"]), status=str(d.get("status") or ""), name=str(d.get("name") or ""),
            ip=d.get("ip") or None, region=region.get("name"), instance_type=itype.get("name"),
            gpu_description=str(itype.get("gpu_description") or ""),
            gpus=int((itype.get("specs") or {}).get("gpus") or 0),
            price_per_hour=None if cents is None else round(int(cents) / 100.0, 4),
            ssh_key_names=tuple(str(k) for k in d.get("ssh_key_names") or ()), tags=tags,
            hostname=d.get("hostname") or None,
            terminate_available=bool((actions.get("terminate") or {}).get("available", True)),
            raw=dict(d),
        )

    @property
    def gone(self) -> bool:
        """Terminating, terminated or preempted: it will not come up again."""
        return self.status in GONE_STATUSES


@dataclass(frozen=True)
class SSHKey:
    id: str
    name: str
    public_key: str = field(repr=False)


def launch_body(*, region_name: str, instance_type_name: str, ssh_key_name: str, name: str | None = None,
                user_data: str | None = None, tags: Mapping[str, str] | None = None, hostname: str | None = None,
                image: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ``POST /instance-operations/launch`` body that the spec accepts: exactly one SSH key name, one instance
    (``quantity`` is not in spec 1.8.3 and more than one is refused), ``name`` <= 64 characters, tag keys matching
    ``^[a-z][a-z0-9-:]+$`` (<= 55) and values <= 128, ``user_data`` plain text <= 1 MB, ``image`` ``{"id": ...}``
    or ``{"family": ...}``. ``ValueError`` on a body Lambda would refuse for sure."""
    if region_name not in REGIONS:
        raise ValueError(f"region {region_name!r} is not a Lambda region ({', '.join(sorted(REGIONS))})")
    if not instance_type_name:
        raise ValueError("instance_type_name must not be empty")
    if not ssh_key_name or len(ssh_key_name) > MAX_NAME:
        raise ValueError("exactly one SSH key name of 1-64 characters is needed")
    body: dict[str, Any] = {"region_name": region_name, "instance_type_name": instance_type_name,
                            "ssh_key_names": [ssh_key_name], "file_system_names": []}
    if name is not None:
        if len(name) > MAX_NAME:
            raise ValueError(f"the instance name is {len(name)} characters; Lambda takes at most {MAX_NAME}")
        body["name"] = name
    if hostname is not None:
        if not _HOSTNAME.fullmatch(hostname):
            raise ValueError(f"hostname {hostname!r} must match ^[a-z0-9][0-9a-z-]{{0,62}}$")
        body["hostname"] = hostname
    if image is not None:
        if set(image) not in ({"id"}, {"family"}) or not all(isinstance(v, str) and v for v in image.values()):
            raise ValueError("image must be {'id': ...} or {'family': ...}")
        body["image"] = dict(image)
    if user_data is not None:
        if len(user_data.encode("utf-8")) > USER_DATA_MAX:
            raise ValueError("user_data is larger than Lambda's 1 MB")
        body["user_data"] = user_data
    if tags:
        for k, v in tags.items():
            if len(k) > 55 or not _TAG_KEY.fullmatch(k):
                raise ValueError(f"tag key {k!r} must match ^[a-z][a-z0-9-:]+$ and be at most 55 characters")
            if not isinstance(v, str) or len(v) > 128:
                raise ValueError(f"tag {k!r}: the value must be a string of at most 128 characters")
        body["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
    return body


# --------------------------------------------------------------------------------------------
# Pacing of launches
# --------------------------------------------------------------------------------------------


class LaunchPacer:
    """At least ``min_interval_s`` between the moments two launches are *sent*. A launch waits here (one at a time)
    and then takes its slot of the account's request pacer while still holding its turn, so that a launch delayed
    by other requests never goes out closer than the interval after the one before it. One per API key; safe for
    concurrent coroutines of one event loop. (A :class:`RateLimitPacer` stamps its slot when it is granted, not
    when the request is sent, which two nested pacers can undo.)"""

    def __init__(self, min_interval_s: float = LAUNCH_INTERVAL_S, *, clock: Any = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last = -1e18
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.waited_s = 0.0  # total time launches were held back (for tests and diagnostics)

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def acquire(self, requests: RateLimitPacer) -> None:
        async with self._get_lock():
            wait = self._last + self.min_interval_s - self._clock()
            if wait > 0:
                self.waited_s += wait
                await asyncio.sleep(wait)
            await requests.acquire()
            self._last = self._clock()


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


@dataclass
class _Op:
    """What a call is doing, for messages: never holds the key."""

    what: str
    method: str
    path: str  # under /api/v1
    idempotent: bool
    launch_name: str | None = None  # set for a launch: what to look for after an ambiguous failure
    subject: str = ""  # e.g. "instance 'abc'" for a not-found


def check_base_url(url: str) -> str:
    """The base URL without a trailing slash (nor ``/api/v1``); ValueError for one that could leak the key."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{BASE_URL_ENV}: expected http(s)://host[:port], got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{BASE_URL_ENV}: no credentials, query or fragment in the base URL")
    if parts.scheme == "http":
        host = parts.hostname
        loopback = host == "localhost"
        try:
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        if not loopback:
            raise ValueError(f"{BASE_URL_ENV}: plain http would send the API key in clear; use https "
                             "(http is only for a fake on loopback)")
    url = url.rstrip("/")
    return url[: -len(API)] if url.endswith(API) else url


class LambdaAPI(ProviderAPIBase):
    """Async client of Lambda's Cloud API v1. ``http``: a shared ``httpx.AsyncClient`` without auth headers (the
    key is added per request); one is made (and closed by :meth:`aclose`) if omitted.

    ``pacer`` spaces every request (default: ``request_interval_s`` apart); ``launch_pacer`` spaces launches
    (default ``launch_interval_s``). Share both between clients of one account (one key). ``timeout_s`` per call
    (``launch_timeout_s`` for a launch); ``max_attempts`` tries for a call that may be retried; waits honour
    ``Retry-After`` up to ``max_retry_wait_s``, else back off exponentially from ``backoff_s``.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 30.0,
        launch_timeout_s: float = 120.0,
        max_attempts: int = 5,
        max_retry_wait_s: float = 30.0,
        backoff_s: float = 2.0,
        request_interval_s: float = REQUEST_INTERVAL_S,
        launch_interval_s: float = LAUNCH_INTERVAL_S,
        pacer: RateLimitPacer | None = None,
        launch_pacer: LaunchPacer | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise LambdaAuthError(f"no Lambda API key: set {API_KEY_ENV}")
        self._key = api_key.strip()
        self.base_url = check_base_url(base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
        self._use_http(http)
        self.timeout_s = timeout_s
        self.launch_timeout_s = launch_timeout_s
        self.max_attempts = max(1, max_attempts)
        self.max_retry_wait_s = max_retry_wait_s
        self.backoff_s = backoff_s
        self.pacer = pacer or RateLimitPacer(min_interval_s=request_interval_s, max_wait_s=600.0)
        self.launch_pacer = launch_pacer or LaunchPacer(launch_interval_s)

    API_KEY_ENV = API_KEY_ENV
    BASE_URL_ENV = BASE_URL_ENV
    DEFAULT_BASE_URL = DEFAULT_BASE_URL

    @classmethod
    def _missing_key(cls) -> Exception:
        return LambdaAuthError(f"no Lambda API key: set {API_KEY_ENV} to a key from the Lambda Cloud console "
                               "(API keys) before launching on Lambda")

    # ---- instance types

    async def list_instance_types(self) -> list[InstanceType]:
        """``GET /instance-types``: every type offered, with the regions that have capacity now."""
        op = _Op("list instance types", "GET", "/instance-types", idempotent=True)
        data = self._data(await self._call(op), op)
        if not isinstance(data, dict):
            raise self._bad_body(op)
        out = []
        for item in data.values():
            try:
                out.append(InstanceType.from_json(item))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    # ---- instances

    async def list_instances(self) -> list[Instance]:
        """``GET /instances``: the account's instances (terminated ones drop out)."""
        op = _Op("list instances", "GET", "/instances", idempotent=True)
        data = self._data(await self._call(op), op)
        if not isinstance(data, list):
            raise self._bad_body(op)
        return [Instance.from_json(d) for d in data if isinstance(d, dict) and "id" in d]

    async def get_instance(self, instance_id: str) -> Instance:
        """``GET /instances/{id}``; :class:`LambdaNotFound` once it is gone."""
        op = _Op(f"get instance {instance_id!r}", "GET", f"/instances/{_seg(instance_id)}", idempotent=True,
                 subject=f"instance {instance_id!r}")
        data = self._data(await self._call(op), op)
        if not isinstance(data, dict):
            raise self._bad_body(op)
        return Instance.from_json(data)

    async def find_instance(self, instance_id: str) -> Instance | None:
        """The instance, or None when Lambda says it does not exist."""
        try:
            return await self.get_instance(instance_id)
        except LambdaNotFound:
            return None

    async def launch(self, body: Mapping[str, Any]) -> list[str]:
        """``POST /instance-operations/launch``: the new instance ids. Paced to one per ``launch_interval_s`` and
        never retried once it may have reached Lambda (see the module doc)."""
        name = str(body.get("name") or "")
        what = f"launch {body.get('instance_type_name')} in {body.get('region_name')}" + (f" as {name!r}" if name else "")
        op = _Op(what, "POST", "/instance-operations/launch", idempotent=False, launch_name=name or None,
                 subject="SSH key, instance type or image")
        data = self._data(await self._call(op, json_body=dict(body), timeout=self.launch_timeout_s, launch=True), op)
        ids = data.get("instance_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list):
            raise self._bad_body(op)
        return [str(i) for i in ids]

    async def terminate(self, instance_ids: Iterable[str]) -> list[Instance]:
        """``POST /instance-operations/terminate``: the instances now terminating. :class:`LambdaNotFound` when one
        does not exist. Retried on 5xx and network errors (terminating twice is harmless)."""
        ids = list(instance_ids)
        op = _Op(f"terminate instance {', '.join(repr(i) for i in ids)}", "POST", "/instance-operations/terminate",
                 idempotent=True, subject=f"instance {', '.join(repr(i) for i in ids)}")
        data = self._data(await self._call(op, json_body={"instance_ids": ids}), op)
        items = data.get("terminated_instances") if isinstance(data, dict) else None
        return [Instance.from_json(d) for d in items or () if isinstance(d, dict) and "id" in d]

    # ---- SSH keys

    async def list_ssh_keys(self) -> list[SSHKey]:
        op = _Op("list SSH keys", "GET", "/ssh-keys", idempotent=True)
        data = self._data(await self._call(op), op)
        if not isinstance(data, list):
            raise self._bad_body(op)
        return [SSHKey(str(k["id"]), str(k.get("name", "")), str(k.get("public_key", "")))
                for k in data if isinstance(k, dict) and "id" in k]

    async def add_ssh_key(self, name: str, public_key: str) -> SSHKey:
        """``POST /ssh-keys`` with our own public key (Lambda then keeps no private key). Not retried on 5xx: the
        caller lists the keys by name after an ambiguous failure."""
        if not 1 <= len(name) <= MAX_NAME:
            raise ValueError("an SSH key name has 1-64 characters")
        op = _Op(f"add SSH key {name!r}", "POST", "/ssh-keys", idempotent=False)
        data = self._data(await self._call(op, json_body={"name": name, "public_key": public_key}), op)
        if not isinstance(data, dict) or "id" not in data:
            raise self._bad_body(op)
        return SSHKey(str(data["id"]), str(data.get("name", name)), str(data.get("public_key", public_key)))

    async def delete_ssh_key(self, key_id: str) -> bool:
        """``DELETE /ssh-keys/{id}``: True when deleted now, False when it was already gone."""
        op = _Op(f"delete SSH key {key_id!r}", "DELETE", f"/ssh-keys/{_seg(key_id)}", idempotent=True,
                 subject=f"SSH key {key_id!r}")
        try:
            await self._call(op)
        except LambdaNotFound:
            return False
        except LambdaInvalidRequest:
            # The spec documents only a 400 here: an unknown id may read as invalid. Gone is gone.
            if any(k.id == key_id for k in await self.list_ssh_keys()):
                raise
            return False
        return True

    # ---- transport

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key and text else text

    async def _call(self, op: _Op, *, json_body: Any = None, params: Mapping[str, Any] | None = None,
                    timeout: float | None = None, launch: bool = False) -> httpx.Response:
        retrying = AsyncRetrying(stop=stop_after_attempt(self.max_attempts), wait=self._wait,
                                 retry=retry_if_exception_type(_Transient), reraise=True,
                                 before_sleep=self._log_retry(op))
        try:
            async for attempt in retrying:
                with attempt:
                    resp = await self._once(op, json_body, params, timeout or self.timeout_s, launch)
        except _Transient as last:
            if last.response is not None:
                raise self._error(last.response, op, exhausted=True) from None
            assert last.exc is not None
            raise self._network_error(last.exc, op) from None
        if resp.status_code == 200:
            return resp
        raise self._error(resp, op)

    async def _pace(self, op: _Op, launch: bool) -> None:
        try:
            if launch:
                await self.launch_pacer.acquire(self.pacer)
            else:
                await self.pacer.acquire()
        except PacingTooLong as exc:
            raise LambdaRateLimited(f"Lambda's rate limit allows the next call ({op.what}) only in {exc.wait_s:.0f} s. "
                                    "Wait, or make fewer API calls.", retry_after=exc.wait_s, status=429,
                                    operation=op.what) from None

    async def _once(self, op: _Op, json_body: Any, params: Mapping[str, Any] | None, timeout: float,
                    launch: bool) -> httpx.Response:
        await self._pace(op, launch)
        try:
            resp = await self.http.request(op.method, self.base_url + API + op.path, json=json_body, params=params,
                                           headers=self._headers(), timeout=timeout)
        except httpx.TransportError as exc:
            unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            if op.idempotent or unsent:
                raise _Transient(exc=exc) from None
            raise self._network_error(exc, op) from None
        if resp.status_code == 429:
            await resp.aread()
            retry_after = retry_after_s(resp.headers, default=0.0) or None
            # Hold back every request of this client (one account) for the wait, not only this one.
            block = retry_after if retry_after else self.backoff_s
            self.pacer.observe({"Retry-After": f"{block:g}"}, 429)
            raise _Transient(response=resp, retry_after=retry_after)
        if resp.status_code >= 500 and op.idempotent:
            await resp.aread()
            raise _Transient(response=resp)
        return resp

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            return min(float(retry_after), self.max_retry_wait_s)
        backoff = self.backoff_s * (2 ** (state.attempt_number - 1))
        return min(backoff * (0.8 + 0.4 * random.random()), self.max_retry_wait_s)

    def _log_retry(self, op: _Op) -> Any:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            why = (f"HTTP {exc.response.status_code}" if isinstance(exc, _Transient) and exc.response is not None
                   else type(getattr(exc, "exc", exc)).__name__)
            log.info("Lambda: %s failed (%s), try %d of %d", op.what, why, state.attempt_number, self.max_attempts)
        return before_sleep

    def _bad_body(self, op: _Op) -> LambdaUnavailable:
        return LambdaUnavailable(f"Lambda answered {op.what} with an unexpected body; is {BASE_URL_ENV} pointing at "
                                 "the Lambda Cloud API?", operation=op.what)

    def _data(self, resp: httpx.Response, op: _Op) -> Any:
        """The ``data`` of a success envelope."""
        try:
            body = resp.json()
        except ValueError:
            raise LambdaUnavailable(f"Lambda answered {op.what} with something that is not JSON (HTTP "
                                    f"{resp.status_code}); is {BASE_URL_ENV} pointing at the Lambda Cloud API?",
                                    status=resp.status_code, operation=op.what) from None
        if not isinstance(body, dict) or "data" not in body:
            raise self._bad_body(op)
        return body["data"]

    # ---- error classification

    def _network_error(self, exc: httpx.TransportError, op: _Op) -> LambdaUnavailable:
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        message = (f"Lambda API {kind} for {op.what} at {self.base_url} ({type(exc).__name__}"
                   f"{': ' + self._redact(str(exc))[:200] if str(exc) else ''}). Check the network, and "
                   f"{BASE_URL_ENV} if it is set; try again later.")
        maybe = op.launch_name is not None and not unsent
        if maybe:
            message += (f" The instance may have been launched anyway: list instances named {op.launch_name!r} "
                        "and adopt or terminate it before launching again.")
        return LambdaUnavailable(message, maybe_created=maybe, operation=op.what)

    def _envelope(self, resp: httpx.Response) -> tuple[str, str, str]:
        """(code, message, suggestion) of an error envelope, redacted; ("", text, "") for any other body."""
        try:
            data = resp.json()
        except ValueError:
            return "", self._redact(re.sub(r"\s+", " ", resp.text.strip())[:300]), ""
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict):
            return "", self._redact(str(data)[:300]), ""
        return (self._redact(str(err.get("code") or ""))[:200], self._redact(str(err.get("message") or ""))[:1000],
                self._redact(str(err.get("suggestion") or ""))[:500])

    def _error(self, resp: httpx.Response, op: _Op, *, exhausted: bool = False) -> LambdaError:
        status = resp.status_code
        code, message, suggestion = self._envelope(resp)
        said = f"HTTP {status}{' ' + code if code else ''}{': ' + message if message else ''}"
        if suggestion:
            said += f" ({suggestion})"
        kw: dict[str, Any] = {"status": status, "code": code, "api_message": message, "suggestion": suggestion,
                              "operation": op.what}
        if status == 429:
            retry_after = retry_after_s(resp.headers, default=0.0) or None
            return LambdaRateLimited(f"Lambda's rate limit was still exceeded for {op.what} after {self.max_attempts} "
                                     f"tries ({said}). Wait a minute, or make fewer API calls (Lambda allows about "
                                     "1 request/s and one launch per 12 s).", retry_after=retry_after, **kw)
        if status == 401 or code == "global/invalid-api-key":
            return LambdaAuthError(f"Lambda refused the API key for {op.what} ({said}). Set {API_KEY_ENV} (or the "
                                   "keyring entry) to a valid key from the Lambda Cloud console (API keys).", **kw)
        if status == 403 or code in ("global/account-inactive", "global/invalid-address"):
            return LambdaAuthError(f"Lambda denied {op.what} ({said}). Check the account: a verified email, a valid "
                                   "payment method and billing address in the Lambda Cloud console.", **kw)
        if code == "instance-operations/launch/insufficient-capacity":
            return LambdaNoCapacity(f"Lambda has no capacity for {op.what} right now ({said}). Choose another "
                                    "instance type or region, or try again later; nothing is billed for it.", **kw)
        if code == "global/quota-exceeded":
            return LambdaQuotaExceeded(f"Lambda refused {op.what}: the account's instance quota is used up ({said}). "
                                       "Terminate an instance, or ask Lambda Support to raise the quota.", **kw)
        if status == 404 or code == "global/object-does-not-exist":
            subject = op.subject or "such resource"
            return LambdaNotFound(f"Lambda has no {subject} ({said}).", **kw)
        if status >= 500 or code.startswith("provider/") or code == "global/internal-error":
            text = (f"Lambda API failed for {op.what} ({said})"
                    f"{' after ' + str(self.max_attempts) + ' tries' if exhausted else ''}. This is on Lambda's side: "
                    "try again later.")
            maybe = op.launch_name is not None
            if maybe:
                text += (f" The instance may have been launched anyway: list instances named {op.launch_name!r} and "
                         "adopt or terminate it before launching again.")
            return LambdaUnavailable(text, maybe_created=maybe, **kw)
        if status == 400:
            return LambdaInvalidRequest(f"Lambda rejected {op.what} ({said}). Change what the message names; the same "
                                        "request will fail the same way.", **kw)
        return LambdaError(f"Lambda answered {op.what} with an unexpected {said}.", **kw)


def _seg(value: str) -> str:
    return quote(value, safe="")
