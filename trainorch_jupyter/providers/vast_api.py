"""An HTTP client of Vast.ai's API (``https://console.vast.ai/api/v0/...``, ``/api/v1/instances/``): offer search,
create from an ask, read, list and destroy instances.

Provisioning only; the Vast provider builds on it. What it guarantees:

- **The key** travels only in the ``Authorization: Bearer`` header of each request (never on a shared client,
  never in a URL: Vast still accepts ``?api_key=``, this client never sends it), and never appears in a repr, a
  log line or an exception message (any echo of it in an answer is redacted). A create's answer carries the new
  instance's own key (``instance_api_key``): it is dropped at once. A plain-``http`` base URL is refused unless
  it is loopback (a fake).
- **Pacing**: Vast limits each endpoint per identity as a minimum spacing between calls (its ``x-rate-limit``
  thresholds, API_NOTES 3.6: search 10/min, create 4.5 s, destroy 3 s, show 2 s, list and manage 1 s), and its
  429 is plain text **without** ``Retry-After``. :class:`VastPacer` keeps each endpoint's calls that far apart
  (plus a margin), and on a 429 holds that endpoint back with its own exponential backoff (1 s doubling to 30 s,
  with jitter) until a call passes again.
- **Retries** (tenacity): a 429 is retried for any call (Vast refuses it before doing anything); 5xx answers,
  timeouts, broken connections and a ``200 {"success": false}`` are retried only for idempotent calls (GET,
  DELETE). A create is **never** retried once it may have reached Vast: a 5xx, a timeout or a cut connection
  raise :class:`VastUnavailable` with ``maybe_created=True`` (list by label and adopt or destroy). A create that
  fails yet names the instance it made (``new_contract``, e.g. an interruptible bid below the minimum: the
  instance exists, stopped, billing its disk) raises :class:`VastCreateFailed` carrying that id.
- **Errors** are classified from Vast's bodies (``{"success": false, "error": CODE, "msg": TEXT}``, ``{"detail"}``
  or plain text) into :class:`VastAuthError` (401/403, ``auth_error``), :class:`VastNoCapacity` (``no_such_ask``:
  the offer is gone), :class:`VastInvalidRequest`, :class:`VastInsufficientCredit`, :class:`VastRateLimited`,
  :class:`VastUnavailable` (5xx, network) and :class:`VastNotFound`, each with a message that says what to change.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from ..model import CapacityError, ProviderError
from ._api import ProviderAPIBase

__all__ = [
    "API_KEY_ENV",
    "BAD_STATUSES",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_MIN_INTERVALS",
    "ENV_ENTRY_MAX",
    "ONSTART_ARGS_MAX",
    "Instance",
    "PacingTooLong",
    "VastAPI",
    "VastAuthError",
    "VastCreateFailed",
    "VastError",
    "VastInsufficientCredit",
    "VastInvalidRequest",
    "VastNoCapacity",
    "VastNotFound",
    "VastOffer",
    "VastPacer",
    "VastRateLimited",
    "VastUnavailable",
    "check_base_url",
    "instance_create_body",
    "offer_query",
]

log = logging.getLogger(__name__)

PROVIDER = "vast"
DEFAULT_BASE_URL = "https://console.vast.ai"
BASE_URL_ENV = "TRAINORCH_VAST_URL"
API_KEY_ENV = "VAST_API_KEY"
#: ``actual_status`` values from which an instance never reaches ``running`` (API_NOTES 3.8: destroy it)
BAD_STATUSES = frozenset({"exited", "unknown", "offline"})
#: Vast's limits on a create (API_NOTES 3.3): onstart + args together, one env entry, all env, the label, the image
ONSTART_ARGS_MAX = 4096
ENV_ENTRY_MAX = 256
ENV_TOTAL_MAX = 32768
LABEL_MAX = 256
IMAGE_MAX = 1024
MIN_DISK_GB = 8
RUNTYPES = ("ssh", "jupyter", "args", "ssh_proxy", "ssh_direct", "jupyter_proxy", "jupyter_direct")
#: Seconds between two calls of one endpoint class (Vast's ``x-rate-limit`` thresholds; search: 10 per minute).
DEFAULT_MIN_INTERVALS: dict[str, float] = {
    "search": 6.0, "create": 4.5, "destroy": 3.0, "show": 2.0, "list": 1.0, "manage": 1.0, "user": 1.0,
}
OCI_ERROR = ": OCI runtime create failed:"

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_WORD = re.compile(r"^[^\s'\"\\`]+$")  # one word the docker-flags string carries without quoting


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class VastError(ProviderError):
    """A Vast.ai API call failed. ``error``/``msg`` come from Vast's body (redacted); ``operation`` says what was
    being done."""

    def __init__(self, message: str, *, status: int | None = None, error: str = "", msg: str = "",
                 operation: str = "", retryable: bool = False) -> None:
        super().__init__(PROVIDER, message, status=status, code=error or None, retryable=retryable)
        self.error = error
        self.msg = msg
        self.operation = operation


class VastAuthError(VastError):
    """401/403 or ``auth_error``: the key is missing, wrong, or may not do this."""


class VastNoCapacity(VastError, CapacityError):
    """The offer (ask) is gone or cannot start now (``no_such_ask``, 404/410): take another offer, or later."""


class VastInvalidRequest(VastError):
    """400: the request breaks one of Vast's rules (``invalid_args``, ``invalid_price``...). The same request fails
    the same way."""


class VastInsufficientCredit(VastError):
    """The account has too little credit for the instance."""


class VastRateLimited(VastError):
    """429 after every retry (Vast sends no ``Retry-After``)."""

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, retryable=True, **kw)


class VastUnavailable(VastError):
    """5xx, a timeout, a network error or a ``success: false`` after the retries allowed. ``maybe_created`` is
    True when a create may have made the instance anyway (list by label and adopt or destroy it)."""

    def __init__(self, message: str, *, maybe_created: bool = False, **kw: Any) -> None:
        super().__init__(message, retryable=True, **kw)
        self.maybe_created = maybe_created


class VastNotFound(VastError):
    """404 / ``no_such_instance``: no such instance (destroyed, or never made)."""


class VastCreateFailed(VastError):
    """A create that failed yet made an instance: ``new_contract`` is its id (it exists, typically stopped, and
    bills its disk until destroyed). API_NOTES 3.3 (dstack #4036)."""

    def __init__(self, message: str, *, new_contract: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.new_contract = new_contract


class _Transient(Exception):
    """A failure worth another try (internal: carries what happened to the last try)."""

    def __init__(self, *, response: httpx.Response | None = None, exc: httpx.TransportError | None = None,
                 rate_limited: bool = False) -> None:
        super().__init__("transient")
        self.response = response
        self.exc = exc
        self.rate_limited = rate_limited


# --------------------------------------------------------------------------------------------
# What the API returns
# --------------------------------------------------------------------------------------------


def _num(value: Any, default: float = 0.0) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


@dataclass
class VastOffer:
    """One offer of ``POST /api/v0/bundles/``: ``ask_id`` is what a create accepts. ``dph_total`` is the whole
    machine's USD per hour (all its GPUs and the disk asked for in the search); ``gpu_ram_mb`` per GPU (MB)."""

    ask_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: float
    dph_total: float
    dph_base: float = 0.0
    min_bid: float | None = None
    storage_cost: float | None = None  # USD per GB-month
    geolocation: str | None = None
    reliability: float | None = None
    machine_id: int | None = None
    direct_port_count: int = 0
    inet_down: float | None = None
    inet_up: float | None = None
    cuda_max_good: float | None = None
    verified: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VastOffer:
        verification = d.get("verification")
        return cls(
            ask_id=int(d["id"]), gpu_name=str(d.get("gpu_name") or ""), num_gpus=_int(d.get("num_gpus"), 1),
            gpu_ram_mb=_num(d.get("gpu_ram")), dph_total=_num(d.get("dph_total")), dph_base=_num(d.get("dph_base")),
            min_bid=None if d.get("min_bid") is None else _num(d.get("min_bid")),
            storage_cost=None if d.get("storage_cost") is None else _num(d.get("storage_cost")),
            geolocation=(str(d["geolocation"]) if d.get("geolocation") else None),
            reliability=(_num(d.get("reliability2", d.get("reliability")))
                         if d.get("reliability2", d.get("reliability")) is not None else None),
            machine_id=None if d.get("machine_id") is None else _int(d.get("machine_id")),
            direct_port_count=_int(d.get("direct_port_count")),
            inet_down=None if d.get("inet_down") is None else _num(d.get("inet_down")),
            inet_up=None if d.get("inet_up") is None else _num(d.get("inet_up")),
            cuda_max_good=None if d.get("cuda_max_good") is None else _num(d.get("cuda_max_good")),
            verified=None if verification is None else verification == "verified", raw=dict(d),
        )

    @property
    def vram_gb(self) -> float:
        """Memory of one GPU in GB (Vast reports MiB: 24564 for an RTX 4090)."""
        return round(self.gpu_ram_mb / 1024.0, 1)

    @property
    def country(self) -> str | None:
        """The two-letter country code of ``geolocation`` (``"Quebec, CA"`` -> ``"CA"``)."""
        if not self.geolocation:
            return None
        tail = self.geolocation.rsplit(",", 1)[-1].strip()
        return tail.upper() if re.fullmatch(r"[A-Za-z]{2}", tail) else None


@dataclass
class Instance:
    """An instance as Vast reports it. ``extra_env``/``raw`` stay out of the repr (env may hold secrets)."""

    id: int
    label: str | None
    actual_status: str | None  # null (being made), created, loading, running, stopped, exited, unknown, offline...
    intended_status: str | None = None
    cur_state: str | None = None
    next_state: str | None = None
    status_msg: str | None = None
    public_ipaddr: str | None = None
    ports: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # "8765/tcp" -> [(HostIp, HostPort)]
    dph_total: float = 0.0
    gpu_name: str | None = None
    num_gpus: int = 0
    image: str | None = None
    is_bid: bool = False
    start_date: float | None = None
    extra_env: dict[str, str] = field(default_factory=dict, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Instance:
        ports: dict[str, list[tuple[str, int]]] = {}
        raw_ports = d.get("ports")
        if isinstance(raw_ports, Mapping):  # {"8765/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]}
            for key, maps in raw_ports.items():
                out = []
                for m in maps or ():
                    if isinstance(m, Mapping) and str(m.get("HostPort") or "").isdigit():
                        out.append((str(m.get("HostIp") or ""), int(str(m["HostPort"]))))
                if out:
                    ports[str(key)] = out
        env: dict[str, str] = {}
        for pair in d.get("extra_env") or ():
            if isinstance(pair, list | tuple) and len(pair) == 2:
                env[str(pair[0])] = str(pair[1])
        return cls(
            id=int(d["id"]), label=d.get("label"), actual_status=d.get("actual_status"),
            intended_status=d.get("intended_status"), cur_state=d.get("cur_state"), next_state=d.get("next_state"),
            status_msg=d.get("status_msg"), public_ipaddr=(str(d["public_ipaddr"]).strip() or None
                                                           if d.get("public_ipaddr") else None),
            ports=ports, dph_total=_num(d.get("dph_total")), gpu_name=d.get("gpu_name"),
            num_gpus=_int(d.get("num_gpus")), image=d.get("image_uuid"), is_bid=bool(d.get("is_bid")),
            start_date=None if d.get("start_date") is None else _num(d.get("start_date")),
            extra_env=env, raw=dict(d),
        )

    @property
    def running(self) -> bool:
        return self.actual_status == "running"

    @property
    def released(self) -> bool:
        """The contract is released (``cur_state`` ``unloaded``): destroyed, as good as gone."""
        return self.cur_state == "unloaded"

    def bad_reason(self) -> str | None:
        """Why this instance will not come up (it must be destroyed: it may still bill its disk), or None.

        ``exited``/``unknown``/``offline`` (Vast's own poll trap), an OCI runtime error while ``created``, and
        an instance whose contract is stopped all round (an interruptible one outbid): API_NOTES 3.8."""
        status = self.actual_status
        if status in BAD_STATUSES:
            meaning = {"exited": "its container exited", "unknown": "Vast lost the host's heartbeat",
                       "offline": "its host went offline"}[status]
            return f"{status} ({meaning}{': ' + self.status_msg if self.status_msg else ''})"
        if status == "created" and OCI_ERROR in (self.status_msg or ""):
            return f"created but its container cannot start ({self.status_msg})"
        if self.cur_state == self.intended_status == self.next_state == "stopped":
            return "stopped (an interruptible instance outbid, or stopped by its host or its own key)"
        return None

    def tcp_endpoint(self, port: int) -> tuple[str, int] | None:
        """``(ip, external port)`` of container port ``port`` once running and mapped; None before.

        ``port`` above 65535 asks Vast for identical internal and external numbers (API_NOTES 3.7): the mapping
        is then listed under the number it got (``"41234/tcp" -> 41234``): the one identical, non-SSH entry."""
        if not self.running or not self.public_ipaddr:
            return None
        maps = self.ports.get(f"{port}/tcp")
        if maps:
            return self.public_ipaddr, maps[0][1]
        if port > 65535:
            same = [hp[0][1] for key, hp in self.ports.items()
                    if key.endswith("/tcp") and key[:-4].isdigit() and int(key[:-4]) == hp[0][1] and key != "22/tcp"]
            if len(same) == 1:
                return self.public_ipaddr, same[0]
        return None


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------


def offer_query(
    *,
    gpu_names: Iterable[str] = (),
    num_gpus: int | None = None,
    max_dph: float | None = None,
    disk_gb: float | None = None,
    countries: Iterable[str] = (),
    min_reliability: float | None = None,
    min_direct_ports: int | None = None,
    min_inet_down: float | None = None,
    min_cuda: float | None = None,
    verified: bool | None = True,
    interruptible: bool = False,
    order: str = "dph_total",
    limit: int | None = 64,
) -> dict[str, Any]:
    """A ``POST /api/v0/bundles/`` body the spec accepts: ``{"<field>": {"<op>": value}, "order": [[f, dir]], ...}``.

    ``gpu_names`` are Vast's own names (with spaces: ``"RTX 4090"``); ``disk_gb`` both filters ``disk_space`` and
    is the ``allocated_storage`` Vast prices into ``dph_total``. On-demand sends no ``type`` (the spec's enum
    spells it ``ondemand``, the CLI ``on-demand``: the default avoids both); interruptible sends ``"bid"``."""
    q: dict[str, Any] = {"rentable": {"eq": True}}
    if verified is not None:
        q["verified"] = {"eq": bool(verified)}
    names = [n for n in dict.fromkeys(n.strip() for n in gpu_names) if n]
    if names:
        q["gpu_name"] = {"in": names}
    if num_gpus is not None:
        q["num_gpus"] = {"eq": int(num_gpus)}
    if max_dph is not None:
        q["dph_total"] = {"lte": float(max_dph)}
    if disk_gb is not None:
        q["disk_space"] = {"gte": float(disk_gb)}
        q["allocated_storage"] = float(disk_gb)
    codes = [c.strip().upper() for c in countries if c.strip()]
    if codes:
        q["geolocation"] = {"in": codes}
    if min_reliability is not None:
        q["reliability2"] = {"gte": float(min_reliability)}
    if min_direct_ports is not None:
        q["direct_port_count"] = {"gte": int(min_direct_ports)}
    if min_inet_down is not None:
        q["inet_down"] = {"gte": float(min_inet_down)}
    if min_cuda is not None:
        q["cuda_max_good"] = {"gte": float(min_cuda)}
    if interruptible:
        q["type"] = "bid"
    q["order"] = [[order, "asc"]]
    if limit is not None:
        q["limit"] = int(limit)
    return q


def env_string(env: Mapping[str, str] | None = None, ports: Iterable[int] = ()) -> str:
    """The spec's docker-flags form of ``env``: ``"-e K=V -e K2=V2 -p 70000:70000"``. Each value must be one
    word (no whitespace, quotes, backslash or backtick): the string form has no quoting Vast documents."""
    parts = []
    for key, value in (env or {}).items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"env name {key!r} is not a variable name")
        if not isinstance(value, str) or not value or not _ENV_WORD.match(value):
            raise ValueError(f"env value of {key} must be one non-empty word (no spaces or quotes) for Vast")
        parts.append(f"-e {key}={value}")
    for p in ports:
        parts.append(f"-p {int(p)}:{int(p)}")
    return " ".join(parts)


def onstart_args_chars(onstart: str | None, args: Iterable[str] | None) -> int:
    """What counts against Vast's 4,096 characters for onstart + args (each arg and a separator)."""
    return len(onstart or "") + sum(len(a) + 1 for a in (args or ()))


def instance_create_body(
    *,
    image: str,
    disk_gb: float,
    label: str,
    onstart: str | None = None,
    args: list[str] | None = None,
    runtype: str | None = None,
    env: Mapping[str, str] | None = None,
    ports: Iterable[int] = (),
    price: float | None = None,
    cancel_unavail: bool | None = None,
) -> dict[str, Any]:
    """A ``PUT /api/v0/asks/{id}/`` body the spec accepts, checked against Vast's limits first.

    ``ValueError`` (saying which limit and by how much) for what Vast would refuse or cut: onstart + args over
    4,096 characters, an env entry (``K=V``) over 256 or all of them over 32,768, a label over 256, a disk under
    8 GB, a bid outside 0.001-128 $/h, an unknown runtype."""
    if not image or len(image) > IMAGE_MAX or any(c.isspace() for c in image):
        raise ValueError(f"image must be one reference of at most {IMAGE_MAX} characters, got {image!r}")
    if disk_gb < MIN_DISK_GB:
        raise ValueError(f"disk must be at least {MIN_DISK_GB} GB on Vast.ai, got {disk_gb:g}")
    if not label or len(label) > LABEL_MAX:
        raise ValueError(f"label must be 1-{LABEL_MAX} characters, got {len(label)}")
    if runtype is not None and runtype not in RUNTYPES:
        raise ValueError(f"runtype must be one of {', '.join(RUNTYPES)}, got {runtype!r}")
    used = onstart_args_chars(onstart, args)
    if used > ONSTART_ARGS_MAX:
        raise ValueError(f"onstart + args are {used} characters, more than the {ONSTART_ARGS_MAX} Vast.ai takes "
                         f"(over by {used - ONSTART_ARGS_MAX})")
    for key, value in (env or {}).items():
        entry = f"{key}={value}"
        if len(entry) > ENV_ENTRY_MAX:
            raise ValueError(f"env entry {key} is {len(entry)} characters, more than the {ENV_ENTRY_MAX} Vast.ai "
                             "takes per entry")
    flags = env_string(env, ports)
    if len(flags) > ENV_TOTAL_MAX:
        raise ValueError(f"env is {len(flags)} characters, more than the {ENV_TOTAL_MAX} Vast.ai takes")
    body: dict[str, Any] = {"image": image, "disk": float(disk_gb), "label": label}
    if flags:
        body["env"] = flags
    if onstart:
        body["onstart"] = onstart
    if args:
        body["args"] = list(args)
    if runtype:
        body["runtype"] = runtype
    if price is not None:
        if not 0.001 <= price <= 128.0:
            raise ValueError(f"a bid must be 0.001-128 $/h, got {price}")
        body["price"] = round(float(price), 6)
    if cancel_unavail is not None:
        body["cancel_unavail"] = bool(cancel_unavail)
    return body


# --------------------------------------------------------------------------------------------
# Pacing
# --------------------------------------------------------------------------------------------


class PacingTooLong(Exception):
    """The next request would have to wait longer than the pacer's ``max_wait_s``."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"rate limit: next request allowed in {wait_s:.0f} s")
        self.wait_s = wait_s


class VastPacer:
    """Client-side pacing to Vast's per-endpoint spacing, and backoff after its header-less 429s.

    Before each call of endpoint class ``e``: wait until ``min_intervals[e] * 1.05 + margin_s`` have passed since
    the previous call of ``e`` was let through (the margin covers the network's jitter: Vast measures arrivals),
    and until any 429 backoff of ``e`` has run out. A 429 blocks ``e`` for ``backoff_s * 2**(strikes-1)`` (at
    most ``max_backoff_s``, with +-20 % jitter); a call that passes resets the strikes. A wait longer than
    ``max_wait_s`` is not slept through: :class:`PacingTooLong`. One pacer per API key (Vast counts per identity);
    safe for concurrent coroutines of one event loop.
    """

    def __init__(self, min_intervals: Mapping[str, float] | None = None, *, margin_s: float = 0.1,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, max_wait_s: float = 120.0,
                 clock: Any = time.monotonic) -> None:
        self.min_intervals = {**DEFAULT_MIN_INTERVALS, **dict(min_intervals or {})}
        self.margin_s = margin_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._next_at: dict[str, float] = {}
        self._blocked_until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.waited_s = 0.0  # total time held back (for tests and diagnostics)
        self.rate_limited = 0  # 429s seen

    def interval(self, endpoint: str) -> float:
        base = float(self.min_intervals.get(endpoint, 0.0))
        return base * 1.05 + self.margin_s if base > 0 else 0.0

    def _lock(self, endpoint: str) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock_loop is not loop:
            self._locks, self._lock_loop = {}, loop
        if endpoint not in self._locks:
            self._locks[endpoint] = asyncio.Lock()
        return self._locks[endpoint]

    def delay(self, endpoint: str) -> float:
        now = self._clock()
        return max(self._next_at.get(endpoint, 0.0), self._blocked_until.get(endpoint, 0.0)) - now

    async def acquire(self, endpoint: str) -> None:
        async with self._lock(endpoint):
            while (wait := self.delay(endpoint)) > 0:
                if wait > self.max_wait_s:
                    raise PacingTooLong(wait)
                self.waited_s += wait
                await asyncio.sleep(wait)
            self._next_at[endpoint] = self._clock() + self.interval(endpoint)

    def on_429(self, endpoint: str) -> float:
        """Vast refused a call of ``endpoint`` (429): block it for the next backoff; the backoff in seconds."""
        self.rate_limited += 1
        strikes = self._strikes.get(endpoint, 0) + 1
        self._strikes[endpoint] = strikes
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (strikes - 1)) * (0.8 + 0.4 * random.random())
        backoff = max(backoff, self.interval(endpoint))
        self._blocked_until[endpoint] = max(self._blocked_until.get(endpoint, 0.0), self._clock() + backoff)
        return backoff

    def on_pass(self, endpoint: str) -> None:
        self._strikes.pop(endpoint, None)


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


@dataclass
class _Op:
    """What a call is doing, for messages: never holds the key."""

    what: str  # e.g. "create an instance from offer 123 (RTX 4090 x1)"
    method: str
    path: str
    endpoint: str  # pacing class: search, create, destroy, show, list, manage, user
    idempotent: bool
    create_label: str | None = None
    subject: str = ""


def check_base_url(url: str) -> str:
    """The base URL without a trailing slash; ValueError for one that could leak the key."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{BASE_URL_ENV}: expected http(s)://host[:port], got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{BASE_URL_ENV}: no credentials, query or fragment in the base URL")
    if parts.path.strip("/"):
        raise ValueError(f"{BASE_URL_ENV}: give the server only (e.g. {DEFAULT_BASE_URL}), not a path")
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


class VastAPI(ProviderAPIBase):
    """Async client of Vast.ai's API. ``http``: a shared ``httpx.AsyncClient`` without auth headers (the key is
    added per request); one is made (and closed by :meth:`aclose`) if omitted.

    ``timeout_s`` per call (``create_timeout_s`` for a create; dstack uses 30 s for Vast); ``max_attempts`` tries
    for a call that may be retried; 5xx/network retries back off exponentially from ``backoff_s``, 429s by the
    pacer's own backoff (Vast gives no ``Retry-After``).
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
        pacer: VastPacer | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise VastAuthError(f"no Vast.ai API key: set {API_KEY_ENV}")
        self._key = api_key.strip()
        self.base_url = check_base_url(base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
        self._use_http(http)
        self.timeout_s = timeout_s
        self.create_timeout_s = create_timeout_s
        self.max_attempts = max(1, max_attempts)
        self.max_retry_wait_s = max_retry_wait_s
        self.backoff_s = backoff_s
        self.pacer = pacer or VastPacer()

    API_KEY_ENV = API_KEY_ENV
    BASE_URL_ENV = BASE_URL_ENV
    DEFAULT_BASE_URL = DEFAULT_BASE_URL

    @classmethod
    def _missing_key(cls) -> Exception:
        return VastAuthError(f"no Vast.ai API key: set {API_KEY_ENV} to a key from https://cloud.vast.ai/manage-keys/ "
                             "before launching on Vast.ai")

    # ---- account

    async def current_user(self) -> dict[str, Any]:
        """``GET /api/v0/users/current/``: the account (a cheap key check)."""
        op = _Op("read the account", "GET", "/api/v0/users/current/", "user", idempotent=True)
        return self._json(await self._call(op), op)

    # ---- offers

    async def search_offers(self, query: Mapping[str, Any]) -> list[VastOffer]:
        """``POST /api/v0/bundles/`` with a filter body (:func:`offer_query`); the offers in Vast's order."""
        op = _Op("search offers", "POST", "/api/v0/bundles/", "search", idempotent=True)
        data = self._json(await self._call(op, json_body=dict(query)), op)
        out = []
        for o in data.get("offers") or ():
            if isinstance(o, dict) and "id" in o:
                try:
                    out.append(VastOffer.from_json(o))
                except (TypeError, ValueError):
                    continue
        return out

    # ---- instances

    async def create_instance(self, ask_id: int, body: Mapping[str, Any]) -> int:
        """``PUT /api/v0/asks/{ask_id}/``: the new instance's id (``new_contract``). Never retried once it may have
        reached Vast (see the module doc); the instance's own key in the answer is dropped."""
        label = str(body.get("label") or "")
        op = _Op(f"create an instance from offer {ask_id}", "PUT", f"/api/v0/asks/{int(ask_id)}/", "create",
                 idempotent=False, create_label=label, subject=f"offer {ask_id}")
        resp = await self._call(op, json_body=dict(body), timeout=self.create_timeout_s, ok=tuple(range(200, 600)))
        data = self._maybe_json(resp)
        contract = data.get("new_contract") if isinstance(data, dict) else None
        made = contract if isinstance(contract, int) and not isinstance(contract, bool) and contract > 0 else None
        if resp.status_code == 200 and isinstance(data, dict) and data.get("success") is not False and made:
            return made
        if made is not None:  # a failure that made an instance anyway
            error, msg = self._error_fields(resp)
            raise VastCreateFailed(
                f"Vast.ai failed to {op.what} (HTTP {resp.status_code} {error}: {msg}) but made instance {made} "
                "anyway (it bills its disk until destroyed)", new_contract=made, status=resp.status_code, error=error,
                msg=msg, operation=op.what)
        if resp.status_code == 200 and isinstance(data, dict) and data.get("success") is False:
            raise self._error(resp, op, refused=True)  # refused in a 200: nothing was made
        if resp.status_code == 200:
            raise VastUnavailable(f"Vast.ai answered {op.what} without an instance id (HTTP 200); the instance may "
                                  f"have been created anyway: list instances labelled {label!r} and adopt or destroy it",
                                  maybe_created=True, status=200, operation=op.what)
        raise self._error(resp, op)

    async def get_instance(self, instance_id: int) -> Instance | None:
        """``GET /api/v0/instances/{id}/``; None once it is gone (Vast answers ``{"instances": null}``)."""
        op = _Op(f"read instance {instance_id}", "GET", f"/api/v0/instances/{int(instance_id)}/", "show",
                 idempotent=True, subject=f"instance {instance_id}")
        try:
            data = self._json(await self._call(op), op)
        except VastNotFound:
            return None
        row = data.get("instances")
        if isinstance(row, list):  # be lenient: a one-row list
            row = row[0] if row else None
        return Instance.from_json(row) if isinstance(row, dict) and "id" in row else None

    async def list_instances(self, *, select_filters: Mapping[str, Any] | None = None,
                             max_pages: int = 40) -> list[Instance]:
        """``GET /api/v1/instances/`` (25 a page, following ``next_token``), every column, ordered by id.
        ``select_filters`` on stored columns only (``id``, ``label``, ``actual_status``...)."""
        op = _Op("list instances", "GET", "/api/v1/instances/", "list", idempotent=True)
        params: dict[str, Any] = {"limit": 25, "order_by": json.dumps([{"col": "id", "dir": "asc"}])}
        if select_filters:
            params["select_filters"] = json.dumps(dict(select_filters), separators=(",", ":"))
        out: list[Instance] = []
        for _ in range(max_pages):
            data = self._json(await self._call(op, params=params), op)
            for row in data.get("instances") or ():
                if isinstance(row, dict) and "id" in row:
                    try:
                        out.append(Instance.from_json(row))
                    except (TypeError, ValueError):
                        continue
            token = data.get("next_token")
            if not token:
                return out
            params["after_token"] = str(token)
        raise VastUnavailable(f"Vast.ai listed more than {max_pages} pages of instances; narrow the filter",
                              operation=op.what)

    async def find_by_label(self, label: str) -> list[Instance]:
        """Instances whose label is exactly ``label``."""
        found = await self.list_instances(select_filters={"label": {"eq": label}})
        return [i for i in found if i.label == label]

    async def destroy_instance(self, instance_id: int) -> bool:
        """``DELETE /api/v0/instances/{id}/``: True when destroyed now, False when it was already gone (404 /
        ``no_such_instance``). Retried on 5xx, network errors and ``success: false`` (destroying twice is harmless)."""
        op = _Op(f"destroy instance {instance_id}", "DELETE", f"/api/v0/instances/{int(instance_id)}/", "destroy",
                 idempotent=True, subject=f"instance {instance_id}")
        try:
            await self._call(op, json_body={})
        except VastNotFound:
            return False
        return True

    async def terminate_instance(self, instance_id: int) -> None:
        """Destroy the instance and confirm it is gone (show answers null, or its contract is released). Raises
        when Vast still shows it."""
        await self.destroy_instance(instance_id)
        inst = await self.get_instance(instance_id)
        if inst is not None and not inst.released:
            raise VastUnavailable(f"instance {instance_id} still exists ({inst.actual_status}) after Vast.ai accepted "
                                  "its destruction; try again", operation=f"destroy instance {instance_id}")

    async def set_state(self, instance_id: int, state: str) -> None:
        """``PUT /api/v0/instances/{id}/`` ``{"state": "stopped"|"running"}``."""
        if state not in ("stopped", "running"):
            raise ValueError("state must be 'stopped' or 'running'")
        op = _Op(f"set instance {instance_id} {state}", "PUT", f"/api/v0/instances/{int(instance_id)}/", "manage",
                 idempotent=True, subject=f"instance {instance_id}")
        await self._call(op, json_body={"state": state})

    # ---- transport

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key and text else text

    async def _call(self, op: _Op, *, json_body: Any = None, params: Mapping[str, Any] | None = None,
                    ok: tuple[int, ...] = (200,), timeout: float | None = None) -> httpx.Response:
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
        if resp.status_code in ok and (op.endpoint == "create" or not self._refused(resp)):
            return resp
        raise self._error(resp, op)

    async def _pace(self, op: _Op) -> None:
        try:
            await self.pacer.acquire(op.endpoint)
        except PacingTooLong as exc:
            raise VastRateLimited(f"Vast.ai's rate limit allows the next call ({op.what}) only in {exc.wait_s:.0f} s. "
                                  "Wait, or make fewer API calls (poll less often).", status=429,
                                  operation=op.what) from None

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
        if resp.status_code == 429:
            await resp.aread()
            self.pacer.on_429(op.endpoint)
            raise _Transient(response=resp, rate_limited=True)
        self.pacer.on_pass(op.endpoint)
        if op.idempotent and (resp.status_code >= 500 or self._refused(resp)):
            await resp.aread()
            raise _Transient(response=resp)
        return resp

    def _refused(self, resp: httpx.Response) -> bool:
        """A 200 whose body says ``"success": false`` (Vast does that), other than "already gone"."""
        if resp.status_code != 200:
            return False
        data = self._maybe_json(resp)
        if not isinstance(data, dict) or data.get("success") is not False:
            return False
        return str(data.get("error") or "") not in ("no_such_instance", "not_found")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _Transient) and exc.rate_limited:
            return 0.0  # the pacer holds the endpoint back for its 429 backoff
        backoff = self.backoff_s * (2 ** (state.attempt_number - 1))
        return min(backoff * (0.8 + 0.4 * random.random()), self.max_retry_wait_s)

    def _log_retry(self, op: _Op) -> Any:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            why = (f"HTTP {exc.response.status_code}" if isinstance(exc, _Transient) and exc.response is not None
                   else type(getattr(exc, "exc", exc)).__name__)
            log.info("Vast.ai: %s failed (%s), try %d of %d", op.what, why, state.attempt_number, self.max_attempts)
        return before_sleep

    @staticmethod
    def _maybe_json(resp: httpx.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            return None

    def _json(self, resp: httpx.Response, op: _Op) -> dict[str, Any]:
        data = self._maybe_json(resp)
        if not isinstance(data, dict):
            raise VastUnavailable(f"Vast.ai answered {op.what} with something that is not a JSON object (HTTP "
                                  f"{resp.status_code}); is {BASE_URL_ENV} pointing at the Vast.ai API?",
                                  status=resp.status_code, operation=op.what)
        return data

    # ---- error classification

    def _network_error(self, exc: httpx.TransportError, op: _Op) -> VastUnavailable:
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        message = (f"Vast.ai API {kind} for {op.what} at {self.base_url} ({type(exc).__name__}"
                   f"{': ' + self._redact(str(exc))[:200] if str(exc) else ''}). Check the network, and "
                   f"{BASE_URL_ENV} if it is set; try again later.")
        maybe = op.create_label is not None and not unsent
        if maybe:
            message += (f" The instance may have been created anyway: list instances labelled {op.create_label!r} and "
                        "adopt or destroy it before creating again.")
        return VastUnavailable(message, maybe_created=maybe, operation=op.what)

    def _error_fields(self, resp: httpx.Response) -> tuple[str, str]:
        """(error code, message) from Vast's body, redacted: JSON ``error``/``msg`` (or ``message``/``detail``), or
        the text of a plain body."""
        data = self._maybe_json(resp)
        if isinstance(data, dict):
            error = str(data.get("error") or "")
            msg = str(data.get("msg") or data.get("message") or data.get("detail") or "")
            return self._redact(error)[:100], self._redact(re.sub(r"\s+", " ", msg))[:500]
        text = resp.text.strip() if data is None else str(data)
        return "", self._redact(re.sub(r"\s+", " ", text))[:300]

    def _error(self, resp: httpx.Response, op: _Op, *, exhausted: bool = False, refused: bool = False) -> VastError:
        """The error for Vast's answer ``resp``; ``refused``: a create's ``200 {"success": false}`` (read as a 400)."""
        status = 400 if refused else resp.status_code
        error, msg = self._error_fields(resp)
        said = f"HTTP {resp.status_code}{' ' + error if error else ''}{': ' + msg if msg else ''}"
        kw: dict[str, Any] = {"status": resp.status_code, "error": error, "msg": msg, "operation": op.what}
        low = f"{error} {msg}".lower()
        tries = f" after {self.max_attempts} tries" if exhausted else ""
        if status in (401, 403) or error in ("auth_error", "not_authorized", "unauthorized") or "invalid user key" in low:
            return VastAuthError(f"Vast.ai refused the API key for {op.what} ({said}). Set {API_KEY_ENV} (or the keyring "
                                 "entry) to a valid key from https://cloud.vast.ai/manage-keys/ with permission to "
                                 "rent and manage instances.", **kw)
        if status == 429:
            return VastRateLimited(f"Vast.ai's rate limit still refused {op.what}{tries} ({said}). Wait a minute, or make "
                                   "fewer API calls (poll less often).", **kw)
        if status >= 500 or (status == 200 and self._refused(resp)):
            message = f"Vast.ai API failed for {op.what} ({said}){tries}. This is on Vast.ai's side: try again later."
            maybe = op.create_label is not None
            if maybe:
                message += (f" The instance may have been created anyway: list instances labelled "
                            f"{op.create_label!r} and adopt or destroy it before creating again.")
            return VastUnavailable(message, maybe_created=maybe, **kw)
        if "credit" in low or "balance" in low:
            return VastInsufficientCredit(f"Vast.ai cannot {op.what}: the account has too little credit ({said}). Add "
                                          "credit at https://cloud.vast.ai/billing/, or choose a cheaper offer.", **kw)
        if "no_such_ask" in low or (op.endpoint == "create" and status in (404, 410)):
            return VastNoCapacity(f"Vast.ai's {op.subject or 'offer'} is no longer available ({said}): it was rented by "
                                  "someone else or withdrawn. Take another offer, or try again later.", **kw)
        if status == 404 or error in ("no_such_instance", "not_found"):
            return VastNotFound(f"Vast.ai has no {op.subject or 'such resource'} ({said}): it was destroyed (by you, its "
                                "own key, or its host) or never existed.", **kw)
        if status == 400:
            return VastInvalidRequest(f"Vast.ai rejected {op.what} ({said}). Change what the message names; the same "
                                      "request will fail the same way.", **kw)
        return VastError(f"Vast.ai answered {op.what} with an unexpected {said}.", **kw)
