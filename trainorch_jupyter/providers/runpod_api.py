"""An HTTP client of RunPod's REST API v2 (``https://api.runpod.io/v2/...``): pods and the GPU catalog.

Provisioning only; the RunPod provider builds on it. What it guarantees:

- **The key** travels only in the ``Authorization`` header of each request (never on a shared client,
  never in a URL), and never appears in a repr, a log line or an exception message (any echo of it
  in an answer is redacted). A plain-``http`` base URL is refused unless it is loopback (a fake).
- **Pacing**: it reads RunPod's ``RateLimit``/``RateLimit-Policy`` headers and holds requests back
  before a window runs dry (spreading the rest of a nearly empty window, waiting out an empty one);
  a 429 blocks every request until its ``Retry-After`` has passed.
- **Retries** (tenacity): a 429 is retried for any call (RunPod refuses it before doing anything);
  5xx answers, timeouts and broken connections are retried only for idempotent calls (GET, DELETE).
  A create is **never** retried once it may have reached RunPod: a 5xx, a timeout or a cut
  connection raise :class:`RunPodUnavailable` with ``maybe_created=True``: list pods by name and
  adopt or delete what is there. (A connection that could not even be opened is retried: nothing
  was sent.)
- **Errors** are classified from the spec's problem bodies into :class:`RunPodAuthError` (401/403),
  :class:`RunPodInsufficientBalance` (402), :class:`RunPodNoCapacity` (400 whose detail says there
  is no instance; RunPod has no code for it), :class:`RunPodInvalidRequest` (other 400s, 409, 422),
  :class:`RunPodRateLimited` (429 after the retries), :class:`RunPodUnavailable` (5xx, network) and
  :class:`RunPodNotFound` (404), each with a message that says what to change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from ..model import CapacityError, ProviderError
from ._api import ProviderAPIBase

__all__ = [
    "API_KEY_ENV",
    "BAD_STATUSES",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "GpuType",
    "LogLine",
    "PacingTooLong",
    "Pod",
    "PodPort",
    "RateLimitPacer",
    "RunPodAPI",
    "RunPodAuthError",
    "RunPodError",
    "RunPodInsufficientBalance",
    "RunPodInvalidRequest",
    "RunPodNoCapacity",
    "RunPodNotFound",
    "RunPodRateLimited",
    "RunPodUnavailable",
    "pod_create_body",
]

log = logging.getLogger(__name__)

PROVIDER = "runpod"
DEFAULT_BASE_URL = "https://api.runpod.io"
BASE_URL_ENV = "TRAINORCH_RUNPOD_URL"
API_KEY_ENV = "RUNPOD_API_KEY"
#: pod statuses from which a pod will not reach RUNNING by itself
BAD_STATUSES = frozenset({"EXITED", "ERROR", "TERMINATED"})
#: how RunPod words "no machine for this request" (v2 400 detail; v1/GraphQL texts for good measure)
CAPACITY_PATTERNS = (
    "no longer any instances available",
    "no instances currently available",
    "not enough free gpus",
    "does not have the resources",
    "no capacity",
    "insufficient capacity",
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RunPodError(ProviderError):
    """A RunPod API call failed. ``status``/``title``/``detail``/``errors`` come from RunPod's problem
    body (redacted); ``operation`` says what was being done."""

    def __init__(self, message: str, *, status: int | None = None, title: str = "", detail: str = "",
                 errors: Iterable[str] = (), operation: str = "", retryable: bool = False) -> None:
        super().__init__(PROVIDER, message, status=status, code=title or None, retryable=retryable)
        self.title = title
        self.detail = detail
        self.errors = list(errors)
        self.operation = operation


class RunPodAuthError(RunPodError):
    """401: the key is missing or wrong; 403: the key may not do this (or use this GPU pool)."""


class RunPodInsufficientBalance(RunPodError):
    """402: the account has too little money for the pod. No other candidate will do better."""


class RunPodNoCapacity(RunPodError, CapacityError):
    """400 saying no machine of this kind is free: try another GPU, cloud or data center, or later."""


class RunPodInvalidRequest(RunPodError):
    """400 (a rule broken), 409 (not allowed in the pod's status) or 422 (the body breaks the
    contract; ``errors`` lists each field). The same request will fail the same way."""


class RunPodRateLimited(RunPodError):
    """429 after every retry. ``retry_after`` is RunPod's last ``Retry-After`` in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, retryable=True, **kw)
        self.retry_after = retry_after


class RunPodUnavailable(RunPodError):
    """5xx, a timeout or a network error after the retries allowed. ``maybe_created`` is True when a
    create may have made the pod anyway (list by name and adopt or delete it)."""

    def __init__(self, message: str, *, maybe_created: bool = False, **kw: Any) -> None:
        super().__init__(message, retryable=True, **kw)
        self.maybe_created = maybe_created


class RunPodNotFound(RunPodError):
    """404: no such pod (or GPU type, or template)."""


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


@dataclass(frozen=True)
class PodPort:
    """One entry of ``runtime.ports``: container port ``private`` reachable at ``ip:public``."""

    private: int
    public: int | None
    type: str
    ip: str | None


@dataclass
class Pod:
    """A pod as RunPod reports it. ``env`` and ``raw`` stay out of the repr (env may hold secrets)."""

    id: str
    name: str
    status: str
    cost_per_hr: float
    image: str = ""
    gpu_id: str | None = None
    gpu_count: int = 0
    cloud: str | None = None
    data_center: str | None = None
    actions: tuple[str, ...] = ()
    ports: tuple[PodPort, ...] = ()  # runtime port mappings; empty until RunPod has mapped them
    created_at: str | None = None
    started_at: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Pod:
        runtime = d.get("runtime") or {}  # null, {} and a missing "ports" all mean "not yet"
        ports = []
        for p in runtime.get("ports") or ():
            try:
                ports.append(PodPort(int(p["private"]), None if p.get("public") is None else int(p["public"]),
                                     str(p.get("type") or ""), p.get("ip") or None))
            except (KeyError, TypeError, ValueError):
                continue
        gpu = d.get("gpu") or {}
        return cls(
            id=str(d["id"]), name=str(d.get("name", "")), status=str(d.get("status", "")),
            cost_per_hr=float(d.get("cost") or 0.0), image=str(d.get("image") or ""),
            gpu_id=gpu.get("id"), gpu_count=int(gpu.get("count") or (1 if gpu else 0)),
            cloud=d.get("cloud"), data_center=d.get("dataCenterId"), actions=tuple(d.get("actions") or ()),
            ports=tuple(ports), created_at=d.get("createdAt"), started_at=d.get("startedAt"),
            env=dict(d.get("env") or {}), raw=dict(d),
        )

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"

    @property
    def bad(self) -> bool:
        """EXITED, ERROR or TERMINATED: it will not come up by itself (and may still bill)."""
        return self.status in BAD_STATUSES

    def tcp_endpoint(self, private_port: int) -> tuple[str, int] | None:
        """``(ip, public port)`` of container port ``private_port`` once RUNNING and mapped; None
        before, and None for a carrier-grade-NAT address (100.64.0.0/10: not reachable)."""
        if not self.running:
            return None
        for p in self.ports:
            if p.private == private_port and p.type == "tcp" and p.ip and p.public:
                try:
                    if ipaddress.ip_address(p.ip) in _CGNAT:
                        return None
                except ValueError:
                    pass  # a host name: let the caller try it
                return p.ip, p.public
        return None


@dataclass
class GpuType:
    """A GPU type of RunPod's catalog. Prices are USD per GPU-hour (list price; a pod's ``cost`` is
    what it bills). ``availability``/``data_centers``/``cuda_versions`` only when asked for."""

    id: str
    name: str
    memory_gb: int
    manufacturer: str
    secure: bool
    community: bool
    price_secure: float | None
    price_community: float | None
    max_count_secure: int
    max_count_community: int
    availability: str | None = None  # NONE, LOW, MEDIUM, HIGH
    data_centers: tuple[str, ...] = ()
    cuda_versions: tuple[tuple[str, bool], ...] = ()  # (version, has free capacity now)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GpuType:
        price = d.get("price") or {}
        max_count = d.get("maxCount") or {}
        return cls(
            id=str(d["id"]), name=str(d.get("name", d["id"])), memory_gb=int(d.get("memory") or 0),
            manufacturer=str(d.get("manufacturer") or ""), secure=bool(d.get("secure")),
            community=bool(d.get("community")),
            price_secure=None if price.get("secure") is None else float(price["secure"]),
            price_community=None if price.get("community") is None else float(price["community"]),
            max_count_secure=int(max_count.get("secure") or 0), max_count_community=int(max_count.get("community") or 0),
            availability=d.get("availability"),
            data_centers=tuple(str(x["id"]) for x in d.get("dataCenters") or () if x.get("availability") != "NONE"),
            cuda_versions=tuple((str(x["version"]), bool(x.get("available"))) for x in d.get("cudaVersions") or ()),
            raw=dict(d),
        )

    def offered(self, cloud: str = "SECURE") -> bool:
        return self.max_count(cloud) > 0 and (self.secure if cloud == "SECURE" else self.community)

    def max_count(self, cloud: str = "SECURE") -> int:
        return self.max_count_secure if cloud == "SECURE" else self.max_count_community

    def price(self, cloud: str = "SECURE", count: int = 1) -> float | None:
        """List price in USD/h of ``count`` GPUs on ``cloud``."""
        unit = self.price_secure if cloud == "SECURE" else self.price_community
        return None if unit is None else round(unit * count, 4)


@dataclass(frozen=True)
class LogLine:
    ts: str
    source: str  # container | system
    line: str


def pod_create_body(
    *,
    name: str,
    image: str,
    gpu_id: str | None = None,
    gpu_count: int = 1,
    cpu_id: str | None = None,
    vcpu_count: int | None = None,
    cloud: str | None = None,
    disk_gb: int | None = None,
    volume_gb: int | None = None,
    volume_path: str = "/workspace",
    ports: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    args: str | None = None,
    data_center_ids: Iterable[str] | None = None,
    allowed_cuda_versions: Iterable[str] | None = None,
    min_cuda_version: str | None = None,
    start_ssh: bool | None = None,
) -> dict[str, Any]:
    """A ``POST /v2/pods`` body that the spec accepts (v2 names: ``image``, ``gpu{id,count}``,
    ``cloud``, ``disk``, ``mounts.persistent``, ``args``; v1 names are a 422 there).

    ``args`` is the start command: one string handed to the image's entrypoint, so quote a whole
    command as ``bash -c '...'``. ``ports`` like ``"8765/tcp"``. ``ValueError`` on a body RunPod
    would refuse for sure (neither or both of GPU and CPU, a non-string env value, both CUDA rules).
    """
    if not name:
        raise ValueError("name must not be empty")
    if (gpu_id is None) == (cpu_id is None):
        raise ValueError("give exactly one of gpu_id and cpu_id")
    body: dict[str, Any] = {"name": name, "image": image}
    if gpu_id is not None:
        if gpu_count < 1:
            raise ValueError("gpu_count must be >= 1")
        gpu: dict[str, Any] = {"id": gpu_id, "count": int(gpu_count)}
        cudas = list(allowed_cuda_versions or ())
        if cudas and min_cuda_version:
            raise ValueError("give allowed_cuda_versions or min_cuda_version, not both")
        if cudas:
            gpu["allowedCudaVersions"] = cudas
        if min_cuda_version:
            gpu["minCudaVersion"] = min_cuda_version
        body["gpu"] = gpu
    else:
        if vcpu_count is None or vcpu_count < 2 or vcpu_count & (vcpu_count - 1):
            raise ValueError("vcpu_count must be a power of two >= 2 for a CPU pod")
        body["cpu"] = {"id": cpu_id, "vcpuCount": int(vcpu_count)}
    if cloud is not None:
        if cloud not in ("SECURE", "COMMUNITY"):
            raise ValueError("cloud must be SECURE or COMMUNITY")
        body["cloud"] = cloud
    if disk_gb is not None:
        body["disk"] = int(disk_gb)
    if volume_gb:
        if volume_gb < 10:
            raise ValueError("volume_gb must be >= 10 (RunPod's floor)")
        body["mounts"] = {"persistent": {"size": int(volume_gb), "path": volume_path}}
    port_list = [p.replace(" ", "") for p in ports]
    if port_list:
        body["ports"] = port_list
    if env:
        bad = [k for k, v in env.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"env values must be strings: {bad}")
        body["env"] = dict(env)
    if args:
        body["args"] = args
    if data_center_ids:
        body["dataCenterIds"] = list(data_center_ids)
    if start_ssh is not None:
        body["startSsh"] = bool(start_ssh)
    return body


# --------------------------------------------------------------------------------------------
# Pacing
# --------------------------------------------------------------------------------------------

_MEMBER = re.compile(r'^\s*"?([^";]+)"?\s*((?:;\s*[A-Za-z]+\s*=\s*[^;,]+)*)\s*$')


def parse_rate_header(value: str) -> dict[str, dict[str, float]]:
    """``"minute";r=0;t=12, "hour";q=3000;w=3600`` -> ``{"minute": {"r": 0, "t": 12}, ...}``."""
    out: dict[str, dict[str, float]] = {}
    for member in value.split(","):
        match = _MEMBER.match(member)
        if not match:
            continue
        params: dict[str, float] = {}
        for kv in match.group(2).split(";"):
            k, _, v = kv.partition("=")
            try:
                params[k.strip()] = float(v.strip().strip('"'))
            except ValueError:
                continue
        out[match.group(1).strip()] = params
    return out


@dataclass
class _Window:
    quota: float | None
    remaining: float
    reset_at: float


class PacingTooLong(Exception):
    """The next request would have to wait longer than the pacer's ``max_wait_s``."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"rate limit: next request allowed in {wait_s:.0f} s")
        self.wait_s = wait_s


class RateLimitPacer:
    """Client-side pacing to RunPod's per-user windows, from its own headers.

    Before each request: wait while a window is known to be empty (until its reset), or while a 429's
    ``Retry-After`` runs; when a window is nearly empty (below ``low_water`` of its quota), spread the
    rest of it evenly over the time left; and keep at least ``min_interval_s`` between requests. A
    wait longer than ``max_wait_s`` (an exhausted hour or day window) is not slept through:
    :class:`PacingTooLong` says how long it would be, and the client raises :class:`RunPodRateLimited`.
    One pacer per API key; safe for concurrent coroutines of one event loop.
    """

    def __init__(self, *, min_interval_s: float = 0.0, low_water: float = 0.2, max_wait_s: float = 60.0,
                 clock: Any = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self.max_wait_s = max_wait_s
        self.low_water = low_water
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._blocked_until = 0.0
        self._next_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.waited_s = 0.0  # total time held back (for tests and diagnostics)

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def delay(self) -> float:
        """Seconds the next request must wait now."""
        now = self._clock()
        wait = max(self._blocked_until, self._next_at) - now
        for name, w in list(self._windows.items()):
            if now >= w.reset_at:
                del self._windows[name]  # the window has reset: its count is unknown again
            elif w.remaining <= 0:
                wait = max(wait, w.reset_at - now)
        return wait

    async def acquire(self) -> None:
        async with self._get_lock():
            while (wait := self.delay()) > 0:
                if wait > self.max_wait_s:
                    raise PacingTooLong(wait)
                self.waited_s += wait
                await asyncio.sleep(wait)
            now = self._clock()
            self._next_at = now + self.min_interval_s
            for w in self._windows.values():
                w.remaining -= 1  # this request counts in every window
                if w.quota and w.remaining < self.low_water * w.quota:
                    self._next_at = max(self._next_at, now + (w.reset_at - now) / max(w.remaining, 1.0))

    def observe(self, headers: Mapping[str, str], status: int) -> None:
        """Learn from an answer's ``RateLimit``, ``RateLimit-Policy`` and (on 429) ``Retry-After``."""
        now = self._clock()
        policy = parse_rate_header(headers.get("RateLimit-Policy", ""))
        for name, params in parse_rate_header(headers.get("RateLimit", "")).items():
            if "r" not in params:
                continue
            reset = params.get("t", 1.0)
            self._windows[name] = _Window(policy.get(name, {}).get("q"), params["r"], now + (reset if reset > 0 else 1.0))
        if status == 429:
            self._blocked_until = max(self._blocked_until, now + retry_after_s(headers, default=1.0))


def retry_after_s(headers: Mapping[str, str], default: float) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", "")))
    except ValueError:
        return default


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


@dataclass
class _Op:
    """What a call is doing, for messages: never holds the key."""

    what: str  # e.g. "create pod 'job-1' (NVIDIA GeForce RTX 4090 x1, SECURE)"
    method: str
    path: str
    idempotent: bool
    create_name: str | None = None
    subject: str = ""  # e.g. "pod 'abc'" for a 404


def check_base_url(url: str) -> str:
    """The base URL without a trailing slash; ValueError for one that could leak the key."""
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
    return url.rstrip("/")


class RunPodAPI(ProviderAPIBase):
    """Async client of RunPod's REST v2. ``http``: a shared ``httpx.AsyncClient`` without auth
    headers (the key is added per request); one is made (and closed by :meth:`aclose`) if omitted.

    ``timeout_s`` per call (``create_timeout_s`` for a create); ``max_attempts`` tries for a call that
    may be retried; waits honour ``Retry-After`` up to ``max_retry_wait_s``, else back off
    exponentially from ``backoff_s``.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 30.0,
        create_timeout_s: float = 60.0,
        max_attempts: int = 4,
        max_retry_wait_s: float = 30.0,
        backoff_s: float = 0.5,
        pacer: RateLimitPacer | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise RunPodAuthError(f"no RunPod API key: set {API_KEY_ENV}", status=None)
        self._key = api_key.strip()
        self.base_url = check_base_url(base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
        self._use_http(http)
        self.timeout_s = timeout_s
        self.create_timeout_s = create_timeout_s
        self.max_attempts = max(1, max_attempts)
        self.max_retry_wait_s = max_retry_wait_s
        self.backoff_s = backoff_s
        self.pacer = pacer or RateLimitPacer()

    API_KEY_ENV = API_KEY_ENV
    BASE_URL_ENV = BASE_URL_ENV
    DEFAULT_BASE_URL = DEFAULT_BASE_URL

    @classmethod
    def _missing_key(cls) -> Exception:
        return RunPodAuthError(f"no RunPod API key: set {API_KEY_ENV} to a key from the RunPod console "
                               "(Settings > API Keys) before launching on RunPod")

    # ---- pods

    async def create_pod(self, body: Mapping[str, Any]) -> Pod:
        """``POST /v2/pods``. Never retried once it may have reached RunPod (see the module doc)."""
        name = str(body.get("name", ""))
        gpu = body.get("gpu") or {}
        what = f"create pod {name!r}"
        if gpu:
            what += f" ({gpu.get('id')} x{gpu.get('count', 1)}, {body.get('cloud', 'SECURE')})"
        op = _Op(what, "POST", "/v2/pods", idempotent=False, create_name=name, subject="template")
        resp = await self._call(op, json_body=dict(body), timeout=self.create_timeout_s)
        return Pod.from_json(self._json(resp, op))

    async def get_pod(self, pod_id: str) -> Pod:
        """``GET /v2/pods/{id}``; :class:`RunPodNotFound` once it is gone."""
        op = _Op(f"get pod {pod_id!r}", "GET", f"/v2/pods/{_seg(pod_id)}", idempotent=True,
                 subject=f"pod {pod_id!r}")
        resp = await self._call(op)
        return Pod.from_json(self._json(resp, op))

    async def find_pod(self, pod_id: str) -> Pod | None:
        """The pod, or None when RunPod says it does not exist (404)."""
        try:
            return await self.get_pod(pod_id)
        except RunPodNotFound:
            return None

    async def list_pods(self, *, name: str | None = None, name_prefix: str | None = None) -> list[Pod]:
        """``GET /v2/pods``: every pod of the account (v2 has no filters or paging, and ignores query
        parameters), filtered here by exact ``name`` and/or ``name_prefix``."""
        op = _Op("list pods", "GET", "/v2/pods", idempotent=True)
        resp = await self._call(op)
        data = self._json(resp, op)
        pods = [Pod.from_json(p) for p in data.get("pods") or () if isinstance(p, dict) and "id" in p]
        if name is not None:
            pods = [p for p in pods if p.name == name]
        if name_prefix is not None:
            pods = [p for p in pods if p.name.startswith(name_prefix)]
        return pods

    async def delete_pod(self, pod_id: str) -> bool:
        """``DELETE /v2/pods/{id}``: True when deleted now, False when it was already gone (404 is
        success here). Retried on 5xx and network errors (deleting twice is harmless)."""
        op = _Op(f"delete pod {pod_id!r}", "DELETE", f"/v2/pods/{_seg(pod_id)}", idempotent=True,
                 subject=f"pod {pod_id!r}")
        try:
            await self._call(op, ok=(204, 200))
        except RunPodNotFound:
            return False
        return True

    async def terminate_pod(self, pod_id: str) -> None:
        """Delete the pod and confirm it is gone (GET answers 404). Raises if RunPod still shows it."""
        await self.delete_pod(pod_id)
        pod = await self.find_pod(pod_id)
        if pod is not None and pod.status != "TERMINATED":
            raise RunPodUnavailable(f"pod {pod_id!r} still exists ({pod.status}) after RunPod accepted its deletion; "
                                    "try the delete again", operation=f"terminate pod {pod_id!r}")

    async def pod_action(self, pod_id: str, action: str) -> Pod | None:
        """``POST /v2/pods/{id}/action`` (start, stop, restart, terminate); the pod, or None for
        terminate (204). Not retried on 5xx (a POST)."""
        if action not in ("start", "stop", "restart", "terminate"):
            raise ValueError("action must be start, stop, restart or terminate")
        op = _Op(f"{action} pod {pod_id!r}", "POST", f"/v2/pods/{_seg(pod_id)}/action", idempotent=False,
                 subject=f"pod {pod_id!r}")
        resp = await self._call(op, json_body={"action": action}, ok=(200, 204))
        return None if resp.status_code == 204 else Pod.from_json(self._json(resp, op))

    async def pod_logs(self, pod_id: str, *, tail: int = 100, source: str | None = None,
                       quiet_s: float = 1.0, max_s: float = 10.0) -> list[LogLine]:
        """Recent log lines of a pod (``GET /v2/pods/{id}/logs``, server-sent events): the backfill
        of ``tail`` lines plus whatever arrives until ``quiet_s`` pass without a line (at most ``max_s``)."""
        lines: list[LogLine] = []
        try:
            async with asyncio.timeout(max_s):
                async for line in self.stream_pod_logs(pod_id, tail=tail, source=source, idle_s=quiet_s):
                    lines.append(line)
        except TimeoutError:
            pass
        return lines

    async def stream_pod_logs(self, pod_id: str, *, tail: int = 100, source: str | None = None,
                              idle_s: float | None = None) -> AsyncIterator[LogLine]:
        """Follow a pod's log; ends when RunPod closes the stream, or after ``idle_s`` without a line."""
        params: dict[str, Any] = {"tail": tail}
        if source:
            params["source"] = source
        op = _Op(f"read the logs of pod {pod_id!r}", "GET", f"/v2/pods/{_seg(pod_id)}/logs", idempotent=True,
                 subject=f"pod {pod_id!r}")
        await self._pace(op)
        request = self.http.build_request("GET", self.base_url + op.path, params=params, headers=self._headers(),
                                          timeout=httpx.Timeout(self.timeout_s, read=None))
        try:
            resp = await self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._network_error(exc, op) from None
        try:
            self.pacer.observe(resp.headers, resp.status_code)
            if resp.status_code != 200:
                await resp.aread()
                raise self._error(resp, op)
            it = resp.aiter_lines().__aiter__()
            while True:
                try:
                    if idle_s is None:
                        raw = await it.__anext__()
                    else:
                        async with asyncio.timeout(idle_s):
                            raw = await it.__anext__()
                except (StopAsyncIteration, TimeoutError):
                    return
                except httpx.TransportError:
                    return  # the stream broke: the caller may follow again
                if raw.startswith("data:"):
                    try:
                        data = json.loads(raw[5:].strip())
                        yield LogLine(str(data.get("ts", "")), str(data.get("source", "")), str(data.get("line", "")))
                    except (ValueError, AttributeError):
                        continue
        finally:
            await resp.aclose()

    # ---- catalog

    async def list_gpu_types(self, *, availability: bool = False, cloud: str | None = None,
                             gpu_count: int | None = None) -> list[GpuType]:
        """``GET /v2/catalog/gpus``; with ``availability`` the pod stock (``include=AVAILABILITY&product=POD``,
        optionally for ``cloud`` and ``gpu_count``)."""
        op = _Op("list GPU types", "GET", "/v2/catalog/gpus", idempotent=True)
        resp = await self._call(op, params=_catalog_params(availability, cloud, gpu_count))
        return [GpuType.from_json(g) for g in self._json(resp, op).get("gpus") or () if isinstance(g, dict)]

    async def get_gpu_type(self, gpu_id: str, *, availability: bool = False, cloud: str | None = None,
                           gpu_count: int | None = None) -> GpuType:
        op = _Op(f"get GPU type {gpu_id!r}", "GET", f"/v2/catalog/gpus/{_seg(gpu_id)}", idempotent=True,
                 subject=f"GPU type {gpu_id!r}")
        resp = await self._call(op, params=_catalog_params(availability, cloud, gpu_count))
        return GpuType.from_json(self._json(resp, op))

    # ---- transport

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}", "Accept": "application/json, application/problem+json"}

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key and text else text

    async def _call(self, op: _Op, *, json_body: Any = None, params: Mapping[str, Any] | None = None,
                    ok: tuple[int, ...] = (200, 201), timeout: float | None = None) -> httpx.Response:
        retrying = AsyncRetrying(stop=stop_after_attempt(self.max_attempts), wait=self._wait,
                                 retry=retry_if_exception_type(_Transient), reraise=True,
                                 before_sleep=self._log_retry(op))
        try:
            async for attempt in retrying:
                with attempt:
                    resp = await self._once(op, json_body, params, timeout or self.timeout_s)
        except _Transient as last:
            if last.response is not None:
                raise self._error(last.response, op, exhausted=True) from None
            assert last.exc is not None
            raise self._network_error(last.exc, op) from None
        if resp.status_code in ok:
            return resp
        raise self._error(resp, op)

    async def _pace(self, op: _Op) -> None:
        try:
            await self.pacer.acquire()
        except PacingTooLong as exc:
            raise RunPodRateLimited(f"RunPod's rate limit allows the next call ({op.what}) only in {exc.wait_s:.0f} s. "
                                    "Wait, or make fewer API calls (poll less often; list pods instead of reading "
                                    "each one).", retry_after=exc.wait_s, status=429, operation=op.what) from None

    async def _once(self, op: _Op, json_body: Any, params: Mapping[str, Any] | None, timeout: float) -> httpx.Response:
        await self._pace(op)
        try:
            resp = await self.http.request(op.method, self.base_url + op.path, json=json_body, params=params,
                                           headers=self._headers(), timeout=timeout)
        except httpx.TransportError as exc:
            unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            if op.idempotent or unsent:
                raise _Transient(exc=exc) from None
            raise self._network_error(exc, op) from None
        self.pacer.observe(resp.headers, resp.status_code)
        if resp.status_code == 429:
            await resp.aread()
            raise _Transient(response=resp, retry_after=retry_after_s(resp.headers, default=0.0) or None)
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
            log.info("RunPod: %s failed (%s), try %d of %d", op.what, why, state.attempt_number, self.max_attempts)
        return before_sleep

    def _json(self, resp: httpx.Response, op: _Op) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError:
            raise RunPodUnavailable(f"RunPod answered {op.what} with something that is not JSON (HTTP "
                                    f"{resp.status_code}); is {BASE_URL_ENV} pointing at the RunPod API?",
                                    status=resp.status_code, operation=op.what) from None
        if not isinstance(data, dict):
            raise RunPodUnavailable(f"RunPod answered {op.what} with an unexpected body (HTTP {resp.status_code})",
                                    status=resp.status_code, operation=op.what)
        return data

    # ---- error classification

    def _network_error(self, exc: httpx.TransportError, op: _Op) -> RunPodUnavailable:
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        message = (f"RunPod API {kind} for {op.what} at {self.base_url} ({type(exc).__name__}"
                   f"{': ' + self._redact(str(exc))[:200] if str(exc) else ''}). Check the network, and "
                   f"{BASE_URL_ENV} if it is set; try again later.")
        maybe = op.create_name is not None and not unsent
        if maybe:
            message += (f" The pod may have been created anyway: list pods named {op.create_name!r} and adopt "
                        "or delete it before creating again.")
        return RunPodUnavailable(message, maybe_created=maybe, operation=op.what)

    def _error(self, resp: httpx.Response, op: _Op, *, exhausted: bool = False) -> RunPodError:
        status = resp.status_code
        title, detail, errors = self._problem(resp)
        said = f"HTTP {status}{' ' + title if title else ''}{': ' + detail if detail else ''}"
        if errors:
            said += " [" + "; ".join(errors[:10]) + "]"
        kw: dict[str, Any] = {"status": status, "title": title, "detail": detail, "errors": errors, "operation": op.what}
        low = detail.lower()
        if status == 401:
            return RunPodAuthError(f"RunPod refused the API key for {op.what} ({said}). Set {API_KEY_ENV} (or the "
                                   "keyring entry) to a valid key from the RunPod console (Settings > API Keys).", **kw)
        if status == 402 or "insufficient balance" in low or "insufficient funds" in low:
            return RunPodInsufficientBalance(f"RunPod cannot {op.what}: the account balance is too low ({said}). Add "
                                             "funds to the RunPod account, or choose a cheaper GPU.", **kw)
        if status == 403:
            return RunPodAuthError(f"RunPod denied {op.what} ({said}). The API key lacks the permission: use a key "
                                   "with read/write access to pods; if only this GPU or cloud is refused, choose "
                                   "another GPU type or cloud.", **kw)
        if status == 404:
            subject = op.subject or "such resource"
            hint = ("check templateId" if op.create_name is not None
                    else "it was deleted (by you, its own key, or RunPod) or never existed")
            return RunPodNotFound(f"RunPod has no {subject} ({said}): {hint}.", **kw)
        if status == 429:
            retry_after = retry_after_s(resp.headers, default=0.0) or None
            return RunPodRateLimited(f"RunPod rate limit still exceeded for {op.what} after {self.max_attempts} tries "
                                     f"({said}). Wait {int(retry_after or 60)} s, or make fewer API calls (poll less "
                                     "often; list pods instead of reading each one).", retry_after=retry_after, **kw)
        if status >= 500:
            message = (f"RunPod API failed for {op.what} ({said}){' after ' + str(self.max_attempts) + ' tries' if exhausted else ''}. "
                       "This is on RunPod's side: try again later (https://status.runpod.io).")
            maybe = op.create_name is not None
            if maybe:
                message += (f" The pod may have been created anyway: list pods named {op.create_name!r} and adopt "
                            "or delete it before creating again.")
            return RunPodUnavailable(message, maybe_created=maybe, **kw)
        if status == 400 and any(p in low for p in CAPACITY_PATTERNS):
            return RunPodNoCapacity(f"RunPod has no machine for {op.what} right now ({said}). Choose another GPU type, "
                                    "cloud (SECURE/COMMUNITY) or data center, or try again later.", **kw)
        if status == 422:
            return RunPodInvalidRequest(f"RunPod rejected {op.what} as invalid ({said}). Fix the fields named there; "
                                        "the same request will fail the same way.", **kw)
        if status == 409:
            return RunPodInvalidRequest(f"RunPod refused {op.what} in the pod's current state ({said}). Read the "
                                        "pod's status and its allowed 'actions'.", **kw)
        if status == 400:
            return RunPodInvalidRequest(f"RunPod rejected {op.what} ({said}). Change what the message names (GPU "
                                        "type and count, CUDA versions, ports, mounts, data centers).", **kw)
        return RunPodError(f"RunPod answered {op.what} with an unexpected {said}.", **kw)

    def _problem(self, resp: httpx.Response) -> tuple[str, str, list[str]]:
        """(title, detail, errors) from a problem+json body, redacted; the text of any other body."""
        try:
            data = resp.json()
        except ValueError:
            text = resp.text.strip()
            return "", self._redact(re.sub(r"\s+", " ", text)[:300]), []
        if not isinstance(data, dict):
            return "", self._redact(str(data)[:300]), []
        detail = data.get("detail") or data.get("message") or data.get("error") or ""
        raw_errors = data.get("errors")
        errors: list[Any] = raw_errors if isinstance(raw_errors, list) else []
        return (self._redact(str(data.get("title") or ""))[:200], self._redact(str(detail))[:1000],
                [self._redact(str(e))[:300] for e in errors])


def _seg(value: str) -> str:
    """One path segment (pod ids are opaque; GPU ids contain spaces)."""
    return quote(value, safe="")


def _catalog_params(availability: bool, cloud: str | None, gpu_count: int | None) -> dict[str, Any]:
    if not availability:
        if cloud is not None or gpu_count is not None:
            raise ValueError("cloud and gpu_count filter availability: pass availability=True with them")
        return {}
    params: dict[str, Any] = {"include": "AVAILABILITY", "product": "POD"}
    if cloud is not None:
        params["cloud"] = cloud
    if gpu_count is not None:
        params["count"] = gpu_count
    return params
