"""A fake RunPod REST v2 API (``https://api.runpod.io/v2/...``) that follows RunPod's OpenAPI spec.

What it serves (shapes, status codes and error bodies as the spec has them):

- ``GET/POST /v2/pods``, ``GET/PATCH/DELETE /v2/pods/{id}``, ``POST /v2/pods/{id}/action``,
  ``GET /v2/pods/{id}/logs`` (server-sent events), ``GET /v2/catalog/gpus[/{id}]``.
- Auth: ``Authorization: Bearer <key>``; 401 ``missing bearer token`` / ``invalid bearer token``.
  ``api_keys=None`` accepts any key (a dry run without an account); a set accepts only those.
- Each pod gets a **pod-scoped key** (``RUNPOD_API_KEY`` inside the pod). The fake accepts it for
  stopping or deleting that pod only (``DELETE /v2/pods/{own}``, ``POST /v2/pods/{own}/action``
  with ``stop``/``terminate``); anything else with it is a 403. Once the pod is gone the key is a 401.
- Status progression: ``PROVISIONING`` -> ``STARTING`` -> ``RUNNING`` (after ``provision_s`` and
  ``start_s``); ``runtime`` is null until ``RUNNING`` and ``runtime.ports`` appears
  ``ports_delay_s`` later. ``GET /v2/pods`` ignores every query parameter and does not page (the
  spec has no paging). A deleted pod is gone: 404 on GET, absent from the list.
- Rate limits per user in fixed windows (default: the spec's example policy, 60/minute,
  3000/hour, 50000/day), ``RateLimit``/``RateLimit-Policy`` on every authenticated answer, and a 429
  with ``Retry-After`` when a window is empty.

The machine: when a pod leaves ``PROVISIONING`` its start command really runs. v2 has no
``dockerStartCmd``: the spec's field is ``args`` (one string, "arguments passed to the container
entrypoint"), so the fake stands for an image whose entrypoint executes its arguments: ``args`` is
split like a shell would (``shlex``) and executed, e.g. ``bash -c 'a && b'``; an empty ``args`` runs
the image's default command (idle). It runs in its own process group, in ``<work_dir>/<pod id>/``,
with a clean environment: ``PATH``, ``HOME`` (that directory), ``LANG``, ``extra_env`` (what the
image would bring; e.g. a ``PATH`` whose ``python3`` is a venv's), the pod's ``env`` and
what RunPod sets: ``RUNPOD_POD_ID``, ``RUNPOD_POD_HOSTNAME``, ``RUNPOD_DC_ID``, ``RUNPOD_GPU_COUNT``,
``RUNPOD_CPU_COUNT``, ``RUNPOD_PUBLIC_IP=127.0.0.1``, ``RUNPOD_TCP_PORT_<port>`` for each ``<port>/tcp``,
``RUNPOD_API_KEY`` (the pod-scoped key), ``CUDA_VERSION`` and ``JUPYTER_PASSWORD`` (``startJupyter``).
Every TCP mapping is *symmetric* here (as RunPod's ports above 70000 are): the process must listen
on ``$RUNPOD_TCP_PORT_<port>``, and ``runtime.ports`` reports that port as ``public`` with ip
``127.0.0.1``. HTTP ports are listed with ``public``/``ip`` null (the fake has no HTTPS proxy).
When the main process exits the container is restarted after ``restart_delay_s`` (RunPod restarts
a pod whose main process ends; ``on_exit="exited"`` or ``"error"`` choose ``EXITED`` or ``ERROR``).
Deleting or stopping the pod kills its whole process group.

Faults (constructor ``faults={...}``, :meth:`RunPodFake.inject`, or ``POST /_fake/faults``):

==========================  =====================================================================
``capacity_errors: N``      the next N creates answer 400 "no longer any instances available"
``unavailable_gpus: [id]``  those GPU types have no stock (catalog ``NONE``; create answers 400)
``insufficient_balance: N`` the next N creates answer 402
``fail_but_created: N``     the next N creates make the pod (it bills) but answer 500
``create_timeout: {count, seconds}``  the next creates make the pod and answer only after
                            ``seconds`` (the client times out)
``terminate_failures: N``   the next N DELETEs / terminate actions answer 500; the pod stays
``server_errors: {count, method?, status?}``  the next requests (of that method) answer 503
``drop_connections: {count, method?}``  the next requests are closed without an answer
``rate_limit_burst: N``     the next N requests answer 429 (``Retry-After: 1``)
``preempt: id | {pod_id, mode?}``  that pod is preempted now
``preempt_after_running: {count, seconds, mode?}``  the next pods are preempted ``seconds``
                            after they reach RUNNING
``clear: true``             disarm everything
==========================  =====================================================================

Preemption ``mode``: ``vanish`` (default: the process group is killed and the pod disappears, it no
longer bills), ``error`` (status ``ERROR``), ``exited`` (status ``EXITED``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import string
import sys
import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..model import SECRET_ENV_KEYS
from .base import (
    FakeRequest,
    FakeResponse,
    FakeServer,
    MachineProcess,
    RateWindow,
    SpecValidator,
    free_port,
    iso_now,
    json_response,
)

__all__ = ["CAPACITY_DETAIL", "DEFAULT_CATALOG", "DEFAULT_RATE_LIMITS", "GpuOffer", "RunPodFake"]

PROBLEM = "application/problem+json"
CAPACITY_DETAIL = ("There are no longer any instances available with the requested specifications. "
                   "Please refresh and try again.")
DEFAULT_RATE_LIMITS = (RateWindow("minute", 60, 60), RateWindow("hour", 3000, 3600), RateWindow("day", 50000, 86400))
STATUSES = ("PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR", "TERMINATED")
ALLOWED_ACTIONS = {
    "RUNNING": ["stop", "restart", "terminate"],
    "EXITED": ["start", "terminate"],
    "ERROR": ["start", "terminate"],
    "PROVISIONING": ["stop", "terminate"],
    "STARTING": ["stop", "terminate"],
    "TERMINATED": [],
}
DC_NAMES = {"US-KS-2": ("US Kansas 2", "US"), "US-TX-3": ("US Texas 3", "US"), "EU-RO-1": ("Europe Romania 1", "RO"),
            "CA-MTL-1": ("Canada Montreal 1", "CA")}


@dataclass(frozen=True)
class GpuOffer:
    """One GPU type of the fake's catalog (prices are illustrative, USD per GPU-hour)."""

    id: str
    name: str
    pool: str | None
    memory: int
    price_secure: float
    price_community: float
    max_secure: int = 8
    max_community: int = 8
    cuda_versions: tuple[str, ...] = ("12.4", "12.8")
    data_centers: tuple[str, ...] = ("US-KS-2", "EU-RO-1")
    manufacturer: str = "NVIDIA"

    def offered(self, cloud: str) -> bool:
        return (self.max_secure if cloud == "SECURE" else self.max_community) > 0

    def price(self, cloud: str) -> float:
        return self.price_secure if cloud == "SECURE" else self.price_community


DEFAULT_CATALOG: tuple[GpuOffer, ...] = (
    GpuOffer("NVIDIA GeForce RTX 4090", "RTX 4090", "ADA_24", 24, 0.69, 0.34),
    GpuOffer("NVIDIA RTX A6000", "RTX A6000", "AMPERE_48", 48, 0.49, 0.33, data_centers=("US-TX-3", "EU-RO-1")),
    GpuOffer("NVIDIA A100 80GB PCIe", "A100 PCIe", "AMPERE_80", 80, 1.64, 1.19, 8, 4, ("12.4", "12.8", "12.9")),
    GpuOffer("NVIDIA H100 80GB HBM3", "H100 SXM", "HOPPER_141", 80, 2.99, 2.69, 8, 0, ("12.8", "12.9"),
             ("US-TX-3", "CA-MTL-1")),
)
CPU_FLAVORS = {"cpu3c": 0.02, "cpu5c": 0.03}  # USD per vCPU-hour (illustrative)

_CREATE_KEYS = {"args", "disk", "env", "image", "ports", "registry", "name", "cloud", "cpu", "dataCenterIds",
                "globalNetworking", "gpu", "mounts", "startJupyter", "startSsh", "templateId"}
_PATCH_KEYS = {"name", "image", "args", "disk", "ports", "env", "registry", "mounts", "locked", "globalNetworking",
               "templateId"}
_VERSION = re.compile(r"^\d+\.\d+$")
_PORT = re.compile(r"^(\d{1,5})/(http|tcp)$")
_ID_CHARS = string.ascii_lowercase + string.digits


def _problem(status: int, title: str, detail: str, errors: list[str] | None = None,
             headers: Mapping[str, str] | None = None) -> FakeResponse:
    body: dict[str, Any] = {"title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return json_response(status, body, content_type=PROBLEM, headers=headers)


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


# --------------------------------------------------------------------------------------------
# Request checks (the contract: 422 with ``errors``, as RunPod's validator words them)
# --------------------------------------------------------------------------------------------


def _check_fields(body: Any, allowed: set[str], where: str = "$") -> list[str]:
    if not isinstance(body, dict):
        return [f"{where}: expected an object"]
    errs = [f"{where}: additional properties '{k}' not allowed" for k in body if k not in allowed]

    def typed(key: str, kind: type, what: str) -> bool:
        if key not in body:
            return False
        value = body[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            errs.append(f"{where}.{key}: expected {what}")
            return False
        return True

    if typed("name", str, "string") and not body["name"]:
        errs.append(f"{where}.name: length must be >= 1")
    typed("image", str, "string")
    typed("args", str, "string")
    if typed("disk", int, "integer") and body["disk"] < 1:
        errs.append(f"{where}.disk: must be >= 1")
    if typed("ports", list, "array"):
        errs += [f"{where}.ports[{i}]: expected string" for i, p in enumerate(body["ports"]) if not isinstance(p, str)]
    if typed("env", dict, "object"):
        errs += [f"{where}.env.{k}: expected string" for k, v in body["env"].items() if not isinstance(v, str)]
    if "registry" in body and body["registry"] is not None:
        typed("registry", str, "string or null")
    for flag in ("globalNetworking", "startJupyter", "startSsh", "locked"):
        typed(flag, bool, "boolean")
    if typed("templateId", str, "string") and not body["templateId"]:
        errs.append(f"{where}.templateId: length must be >= 1")
    if typed("cloud", str, "string") and body["cloud"] not in ("SECURE", "COMMUNITY"):
        errs.append(f"{where}.cloud: value must be one of 'SECURE', 'COMMUNITY'")
    if typed("dataCenterIds", list, "array"):
        errs += [f"{where}.dataCenterIds[{i}]: expected string"
                 for i, d in enumerate(body["dataCenterIds"]) if not isinstance(d, str)]
    if typed("gpu", dict, "object"):
        gpu = body["gpu"]
        g = f"{where}.gpu"
        errs += [f"{g}: additional properties '{k}' not allowed" for k in gpu
                 if k not in ("id", "count", "allowedCudaVersions", "minCudaVersion")]
        if "id" not in gpu:
            errs.append(f"{g}: missing property 'id'")
        elif not isinstance(gpu["id"], str):
            errs.append(f"{g}.id: expected string")
        if "count" in gpu and (not isinstance(gpu["count"], int) or isinstance(gpu["count"], bool)):
            errs.append(f"{g}.count: expected integer")
        elif gpu.get("count", 1) < 1:
            errs.append(f"{g}.count: must be >= 1")
        cudas = gpu.get("allowedCudaVersions", [])
        if not isinstance(cudas, list):
            errs.append(f"{g}.allowedCudaVersions: expected array")
        else:
            errs += [f"{g}.allowedCudaVersions[{i}]: does not match pattern '^\\d+\\.\\d+$'"
                     for i, v in enumerate(cudas) if not isinstance(v, str) or not _VERSION.match(v)]
        if "minCudaVersion" in gpu and (not isinstance(gpu["minCudaVersion"], str)
                                        or not _VERSION.match(gpu["minCudaVersion"])):
            errs.append(f"{g}.minCudaVersion: does not match pattern '^\\d+\\.\\d+$'")
    if typed("cpu", dict, "object"):
        cpu = body["cpu"]
        c = f"{where}.cpu"
        errs += [f"{c}: additional properties '{k}' not allowed" for k in cpu if k not in ("id", "vcpuCount")]
        for k in ("id", "vcpuCount"):
            if k not in cpu:
                errs.append(f"{c}: missing property '{k}'")
        if "id" in cpu and (not isinstance(cpu["id"], str) or not cpu["id"]):
            errs.append(f"{c}.id: expected a non-empty string")
        if "vcpuCount" in cpu and (not isinstance(cpu["vcpuCount"], int) or cpu["vcpuCount"] < 2):
            errs.append(f"{c}.vcpuCount: must be an integer >= 2")
    if typed("mounts", dict, "object"):
        errs += _check_mounts(body["mounts"], f"{where}.mounts")
    return errs


def _check_mounts(mounts: dict[str, Any], m: str) -> list[str]:
    errs = [f"{m}: additional properties '{k}' not allowed" for k in mounts if k not in ("persistent", "network")]
    p = mounts.get("persistent")
    if p is not None:
        if not isinstance(p, dict):
            errs.append(f"{m}.persistent: expected object")
        else:
            errs += [f"{m}.persistent: additional properties '{k}' not allowed" for k in p if k not in ("size", "path")]
            errs += [f"{m}.persistent: missing property '{k}'" for k in ("size", "path") if k not in p]
            if "size" in p and (not isinstance(p["size"], int) or p["size"] < 10):
                errs.append(f"{m}.persistent.size: must be an integer >= 10")
            if "path" in p and not isinstance(p["path"], str):
                errs.append(f"{m}.persistent.path: expected string")
    n = mounts.get("network")
    if n is not None:
        if not isinstance(n, list):
            errs.append(f"{m}.network: expected array")
        elif len(n) > 1:
            errs.append(f"{m}.network: must have at most 1 items")
        else:
            for i, item in enumerate(n):
                if not isinstance(item, dict) or set(item) != {"volumeId", "path"}:
                    errs.append(f"{m}.network[{i}]: expected an object with exactly 'volumeId' and 'path'")
    return errs


def _parse_ports(ports: Iterable[str]) -> tuple[list[tuple[int, str]], list[str]]:
    out, bad = [], []
    for p in ports:
        match = _PORT.match(p.strip())
        if not match or not 0 < int(match.group(1)) < 100_000:
            bad.append(p)
        else:
            out.append((int(match.group(1)), match.group(2)))
    return out, bad


# --------------------------------------------------------------------------------------------
# A pod
# --------------------------------------------------------------------------------------------


@dataclass
class _LogLine:
    ts: str
    seq: int
    source: str
    line: str


@dataclass
class _Pod:
    id: str
    name: str
    image: str
    args: str
    disk: int
    ports: list[str]
    env: dict[str, str]
    registry: str | None
    cloud: str
    gpu: dict[str, Any] | None
    cpu: dict[str, Any] | None
    mounts: dict[str, Any]
    unit_price: float
    scoped_key: str
    data_center_ids: list[str]
    cuda_choices: list[str]
    start_jupyter: bool
    locked: bool = False
    status: str = "PROVISIONING"
    created_wall: float = field(default_factory=time.time)
    next_at: float = 0.0  # monotonic time of the next automatic step
    spawn_at: float | None = None  # monotonic time of a pending (re)start of the main process
    started_wall: float | None = None
    running_since: float | None = None
    ports_visible_at: float | None = None
    dc: str | None = None
    cuda: str | None = None
    port_map: dict[int, int] = field(default_factory=dict)  # private tcp port -> local public port
    process: MachineProcess | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    preempt_after_s: float | None = None  # armed by a fault: preempt this long after RUNNING
    preempt_at: float | None = None  # monotonic time of that preemption
    preempt_mode: str = "vanish"
    log: deque[_LogLine] = field(default_factory=lambda: deque(maxlen=5000))
    log_pos: int = 0
    log_partial: bytes = b""
    hostname_suffix: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def cost(self) -> float:
        if self.status in ("EXITED", "TERMINATED"):
            return 0.0
        count = int(self.gpu.get("count", 1)) if self.gpu else int(self.cpu["vcpuCount"]) if self.cpu else 1
        return round(self.unit_price * count, 4)


class RunPodFake(FakeServer):
    """The fake RunPod REST v2 API. See the module docstring for what it does.

    ``RunPodFake(api_keys={"k"}, provision_s=0.1, start_s=0.1).start()`` then ``fake.base_url``;
    ``fake.stop()`` kills every pod's processes. Python helpers: :meth:`inject` (faults),
    :meth:`preempt`, :meth:`pod_ids`, :meth:`pod_process`, :meth:`scoped_key`.
    """

    provider = "runpod"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Collection[str] | None = None,
        provision_s: float = 1.0,
        start_s: float = 1.0,
        ports_delay_s: float = 0.5,
        restart_delay_s: float = 1.0,
        on_exit: str = "restart",
        kill_grace_s: float = 1.0,
        rate_limits: Iterable[RateWindow] | None = None,
        catalog: Iterable[GpuOffer] = DEFAULT_CATALOG,
        default_cmd: list[str] | None = None,
        inherit_env: bool = False,
        extra_env: Mapping[str, str] | None = None,
        faults: Mapping[str, Any] | None = None,
        validator: SpecValidator | None = None,
        work_dir: str | Path | None = None,
        keep_pod_dirs: bool = False,
        tick_s: float = 0.05,
    ) -> None:
        if on_exit not in ("restart", "exited", "error"):
            raise ValueError("on_exit must be 'restart', 'exited' or 'error'")
        super().__init__(host=host, port=port, rate_limits=DEFAULT_RATE_LIMITS if rate_limits is None else rate_limits,
                         validator=validator, work_dir=work_dir, tick_s=tick_s)
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.provision_s = provision_s
        self.start_s = start_s
        self.ports_delay_s = ports_delay_s
        self.restart_delay_s = restart_delay_s
        self.on_exit = on_exit
        self.kill_grace_s = kill_grace_s
        self.catalog = {g.id: g for g in catalog}
        self.default_cmd = default_cmd or [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"]
        self.inherit_env = inherit_env
        self.extra_env = dict(extra_env or {})
        self.keep_pod_dirs = keep_pod_dirs
        self.unavailable_gpus: set[str] = set()
        self._pods: dict[str, _Pod] = {}
        self._pod_keys: dict[str, str] = {}  # every pod-scoped key ever issued -> pod id
        self._seq = 0
        if faults:
            self.apply_faults(dict(faults))

    # ---- Python helpers for tests

    def inject(self, **faults: Any) -> None:
        """Arm faults (same names as ``POST /_fake/faults``)."""
        self.apply_faults(faults)

    def preempt(self, pod_id: str, mode: str = "vanish") -> bool:
        """The provider takes the pod away now; False when there is no such pod."""
        if mode not in ("vanish", "error", "exited"):
            raise ValueError("mode must be 'vanish', 'error' or 'exited'")
        with self.lock:
            pod = self._pods.get(pod_id)
            if pod is None:
                return False
            self._preempt(pod, mode)
        return True

    def pod_ids(self) -> list[str]:
        with self.lock:
            return list(self._pods)

    def pod_process(self, pod_id: str) -> MachineProcess | None:
        with self.lock:
            pod = self._pods.get(pod_id)
            return pod.process if pod else None

    def scoped_key(self, pod_id: str) -> str | None:
        with self.lock:
            pod = self._pods.get(pod_id)
            return pod.scoped_key if pod else None

    def pod_dir(self, pod_id: str) -> Path:
        return self.work_dir / pod_id

    # ---- faults

    def apply_faults(self, body: dict[str, Any]) -> None:
        body = dict(body)
        if body.pop("clear", False):
            self.faults.clear()
            self.unavailable_gpus.clear()
        if "unavailable_gpus" in body:
            gpus = body.pop("unavailable_gpus")
            if not isinstance(gpus, list) or not all(isinstance(g, str) for g in gpus):
                raise ValueError("unavailable_gpus: expected a list of GPU type ids")
            self.unavailable_gpus = set(gpus)
        if "preempt" in body:
            target = body.pop("preempt")
            pod_id, mode = (target, "vanish") if isinstance(target, str) else (target["pod_id"], target.get("mode", "vanish"))
            if not self.preempt(pod_id, mode):
                raise ValueError(f"preempt: no pod {pod_id!r}")
        known = {"capacity_errors", "insufficient_balance", "fail_but_created", "create_timeout", "terminate_failures",
                 "server_errors", "drop_connections", "rate_limit_burst", "preempt_after_running"}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(known | {'unavailable_gpus', 'preempt', 'clear'})}")
        super().apply_faults(body)

    # ---- dispatch

    def who(self, req: FakeRequest) -> str:
        token = req.bearer
        if token is None:
            return "none"
        with self.lock:
            return "pod-key" if token in self._pod_keys else "account-key"

    def route(self, req: FakeRequest) -> FakeResponse:
        # 1. auth (no rate-limit headers on a 401: they are for authenticated callers)
        token = req.bearer
        if token is None:
            return _problem(401, "Unauthorized", "missing bearer token")
        with self.lock:
            scoped_pod = self._pod_keys.get(token)
            if scoped_pod is not None and scoped_pod not in self._pods:
                return _problem(401, "Unauthorized", "invalid bearer token")
        if scoped_pod is None and self.api_keys is not None and token not in self.api_keys:
            return _problem(401, "Unauthorized", "invalid bearer token")

        # 2. rate limits: one user, whichever of its keys
        decision = self.rate_limiter.check("user")
        rl = decision.headers
        if not decision.allowed:
            self.ledger.record_rate_limit_violation(req.method, req.path, decision.window, decision.retry_after)
            return _problem(429, "Too Many Requests", f"rate limit exceeded for the {decision.window} window",
                            headers={**rl, "Retry-After": str(decision.retry_after)})

        # 3. injected transport and server faults
        if self.faults.take("rate_limit_burst") is not None:
            return _problem(429, "Too Many Requests", "rate limit exceeded for the minute window",
                            headers={**rl, "Retry-After": "1"})

        def same_method(p: dict[str, Any]) -> bool:
            return str(p.get("method", req.method)).upper() == req.method

        if self.faults.take("drop_connections", same_method) is not None:
            return FakeResponse(0, drop=True)
        fault = self.faults.take("server_errors", same_method)
        if fault is not None:
            status = int(fault.get("status", 503))
            return _problem(status, "Service Unavailable" if status == 503 else "Internal Server Error",
                            "upstream temporarily unavailable; try again", headers=rl)

        # 4. the paths
        parts = [unquote(p) for p in req.path.split("/")[1:]]
        resp = self._route(req, parts, scoped_pod)
        for k, v in rl.items():
            resp.headers.setdefault(k, v)
        return resp

    def _route(self, req: FakeRequest, parts: list[str], scoped_pod: str | None) -> FakeResponse:
        m = req.method
        if scoped_pod is not None:  # a pod-scoped key: stop or delete its own pod, nothing else
            own = len(parts) >= 3 and parts[:2] == ["v2", "pods"] and parts[2] == scoped_pod
            if own and len(parts) == 3 and m == "DELETE":
                return self._delete(scoped_pod, by_pod=True)
            if own and len(parts) == 4 and parts[3] == "action" and m == "POST":
                action = (req.json() or {}).get("action") if req.body else None
                if action in ("stop", "terminate"):
                    return self._action(req, scoped_pod, by_pod=True)
            return _problem(403, "Forbidden", "access denied")
        if parts[:2] == ["v2", "pods"]:
            if len(parts) == 2:
                return {"GET": self._list, "POST": self._create}.get(m, self._not_allowed("GET, POST"))(req)
            pod_id = parts[2]
            if len(parts) == 3:
                if m == "GET":
                    return self._get(pod_id)
                if m == "DELETE":
                    return self._delete(pod_id)
                if m == "PATCH":
                    return self._patch(req, pod_id)
                return self._not_allowed("GET, PATCH, DELETE")(req)
            if len(parts) == 4 and parts[3] == "action":
                return self._action(req, pod_id) if m == "POST" else self._not_allowed("POST")(req)
            if len(parts) == 4 and parts[3] == "logs":
                return self._logs(req, pod_id) if m == "GET" else self._not_allowed("GET")(req)
        if parts[:3] == ["v2", "catalog", "gpus"] and len(parts) in (3, 4):
            if m != "GET":
                return self._not_allowed("GET")(req)
            return self._catalog(req, parts[3] if len(parts) == 4 else None)
        return _problem(404, "Not Found", "resource not found")

    @staticmethod
    def _not_allowed(allow: str) -> Any:
        def answer(_req: FakeRequest) -> FakeResponse:
            return _problem(405, "Method Not Allowed", "The requested method is not allowed for this path.",
                            headers={"Allow": allow})
        return answer

    # ---- pods

    def _list(self, req: FakeRequest) -> FakeResponse:
        with self.lock:  # every query parameter is ignored, as RunPod does (no filters, no paging)
            return json_response(200, {"pods": [self._pod_json(p) for p in self._pods.values()]})

    def _get(self, pod_id: str) -> FakeResponse:
        with self.lock:
            pod = self._pods.get(pod_id)
            if pod is None:
                return _problem(404, "Not Found", "pod not found")
            return json_response(200, self._pod_json(pod))

    def _create(self, req: FakeRequest) -> FakeResponse:
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            return _problem(400, "Bad Request", "request body is not valid JSON")
        errors = _check_fields(body, _CREATE_KEYS)
        if isinstance(body, dict):
            if "name" not in body:
                errors.append("$: missing property 'name'")
            if "templateId" not in body and "image" not in body:
                errors.append("$: missing property 'image'")
        if errors:
            return _problem(422, "Unprocessable Entity", "Request validation failed.", errors)
        assert isinstance(body, dict)
        # cross-field rules: 400
        gpu, cpu = body.get("gpu"), body.get("cpu")
        if (gpu is None) == (cpu is None):
            return _problem(400, "Bad Request", "exactly one of gpu or cpu must be set")
        if gpu is not None and gpu.get("allowedCudaVersions") and "minCudaVersion" in gpu:
            return _problem(400, "Bad Request", "gpu.allowedCudaVersions and gpu.minCudaVersion are mutually exclusive")
        mounts = body.get("mounts") or {}
        if "persistent" in mounts and "network" in mounts:
            return _problem(400, "Bad Request", "mounts.persistent and mounts.network are mutually exclusive")
        if cpu is not None and "persistent" in mounts:
            return _problem(400, "Bad Request", "mounts.persistent is not allowed on a CPU pod")
        if mounts.get("network"):
            return _problem(400, "Bad Request", f"network volume {mounts['network'][0]['volumeId']!r} not found "
                            "in the pod's data center")
        port_list, bad_ports = _parse_ports(body.get("ports", []))
        if bad_ports:
            return _problem(400, "Bad Request", f"invalid ports {bad_ports}: expected '<port>/<http|tcp>'")
        if "templateId" in body:
            return _problem(404, "Not Found", f"template {body['templateId']!r} not found")
        cloud = body.get("cloud", "SECURE")
        data_center_ids = list(body.get("dataCenterIds") or [])
        cuda_choices: list[str] = []
        if gpu is not None:
            offer = self.catalog.get(gpu["id"])
            if offer is None:
                return _problem(400, "Bad Request", f"unknown GPU type {gpu['id']!r}; valid ids are listed by "
                                "GET /v2/catalog/gpus")
            count = int(gpu.get("count", 1))
            max_count = offer.max_secure if cloud == "SECURE" else offer.max_community
            if offer.offered(cloud) and count > max_count:
                return _problem(400, "Bad Request", f"gpu.count {count} exceeds the maximum of {max_count} for "
                                f"{offer.id} on {cloud} cloud")
            unit_price = offer.price(cloud)
            dcs = [d for d in offer.data_centers if not data_center_ids or d in data_center_ids]
            cuda_choices = list(offer.cuda_versions)
            if gpu.get("allowedCudaVersions"):
                cuda_choices = [v for v in cuda_choices if v in gpu["allowedCudaVersions"]]
            if "minCudaVersion" in gpu:
                cuda_choices = [v for v in cuda_choices if _version_key(v) >= _version_key(gpu["minCudaVersion"])]
            no_capacity = (not offer.offered(cloud) or offer.id in self.unavailable_gpus or not dcs
                           or not cuda_choices)
        else:
            assert cpu is not None
            if cpu["id"] not in CPU_FLAVORS:
                return _problem(400, "Bad Request", f"unknown CPU flavor {cpu['id']!r}")
            if cpu["vcpuCount"] & (cpu["vcpuCount"] - 1):
                return _problem(400, "Bad Request", "cpu.vcpuCount must be a power of two")
            unit_price = CPU_FLAVORS[cpu["id"]]
            dcs = [d for d in DC_NAMES if not data_center_ids or d in data_center_ids]
            no_capacity = not dcs
        if self.faults.take("insufficient_balance") is not None:
            return _problem(402, "Payment Required", "insufficient balance: your account balance is too low to "
                            "deploy this pod")
        if no_capacity or self.faults.take("capacity_errors") is not None:
            return _problem(400, "Bad Request", CAPACITY_DETAIL)

        env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
        if body.get("startJupyter") and "JUPYTER_PASSWORD" not in env:
            env["JUPYTER_PASSWORD"] = secrets.token_urlsafe(12)
        # startSsh injects PUBLIC_KEY from the account's registered keys; the fake account has none.
        scoped_key = "rpa_pod_" + secrets.token_urlsafe(24)
        pod = _Pod(
            id=self._new_id(), name=body["name"], image=body.get("image", ""), args=body.get("args", ""),
            disk=int(body.get("disk", 50)), ports=[f"{p}/{t}" for p, t in port_list], env=env,
            registry=body.get("registry"), cloud=cloud,
            gpu={"id": gpu["id"], "count": int(gpu.get("count", 1))} if gpu is not None else None,
            cpu={"id": cpu["id"], "vcpuCount": cpu["vcpuCount"], "memory": 2 * cpu["vcpuCount"]} if cpu else None,
            mounts=mounts, unit_price=unit_price, scoped_key=scoped_key, data_center_ids=dcs,
            cuda_choices=cuda_choices, start_jupyter=bool(body.get("startJupyter")),
        )
        pod.next_at = time.monotonic() + self.provision_s
        timeout_fault = self.faults.take("create_timeout")
        failed_fault = None if timeout_fault is not None else self.faults.take("fail_but_created")
        with self.lock:
            self._pods[pod.id] = pod
            self._pod_keys[scoped_key] = pod.id
            preempt = self.faults.take("preempt_after_running")
            if preempt is not None:
                pod.preempt_mode = str(preempt.get("mode", "vanish"))
                pod.preempt_after_s = float(preempt.get("seconds", 1.0))
            self._syslog(pod, "pod created; waiting for a machine")
            self.ledger.machine_created(pod.id, pod.name, pod.cost, pod.status)
            answer = json_response(201, self._pod_json(pod))
        if failed_fault is not None:  # the pod exists and bills, yet the answer is an error
            status = int(failed_fault.get("status", 500))
            return _problem(status, "Internal Server Error", "internal server error")
        if timeout_fault is not None:
            answer.delay_s = float(timeout_fault.get("seconds", 30.0))
        return answer

    def _patch(self, req: FakeRequest, pod_id: str) -> FakeResponse:
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            return _problem(400, "Bad Request", "request body is not valid JSON")
        errors = _check_fields(body, _PATCH_KEYS)
        if errors:
            return _problem(422, "Unprocessable Entity", "Request validation failed.", errors)
        assert isinstance(body, dict)
        port_list, bad_ports = _parse_ports(body.get("ports", []))
        if bad_ports:
            return _problem(400, "Bad Request", f"invalid ports {bad_ports}: expected '<port>/<http|tcp>'")
        to_kill = None
        with self.lock:
            pod = self._pods.get(pod_id)
            if pod is None:
                return _problem(404, "Not Found", "pod not found")
            if "templateId" in body:
                return _problem(404, "Not Found", f"template {body['templateId']!r} not found")
            if body.get("mounts"):
                return _problem(400, "Bad Request", "the fake does not change mounts")
            for key in ("name", "image", "args", "disk", "env", "registry", "locked"):
                if key in body:
                    setattr(pod, key, body[key])
            if "ports" in body:
                pod.ports = [f"{p}/{t}" for p, t in port_list]
            resets = {"image", "args", "disk", "env", "ports", "registry"} & set(body)
            if resets and pod.status in ("STARTING", "RUNNING"):  # editing a running pod resets it
                self._syslog(pod, "pod edited; resetting the container")
                to_kill = pod.process
                pod.process = None
                self._release_ports(pod)
                self._assign_ports(pod)
                pod.status, pod.running_since = "STARTING", None
                pod.spawn_at = time.monotonic()
            self.ledger.machine_update(pod.id, cost_per_hr=pod.cost, status=pod.status)
            answer = json_response(200, self._pod_json(pod))
        if to_kill is not None:
            to_kill.kill(self.kill_grace_s, wait=False)
        return answer

    def _delete(self, pod_id: str, *, by_pod: bool = False) -> FakeResponse:
        with self.lock:
            pod = self._pods.get(pod_id)
            if pod is None:
                return _problem(404, "Not Found", "pod not found")
            if self.faults.take("terminate_failures") is not None:
                return _problem(500, "Internal Server Error", "failed to terminate the pod; try again")
            self._remove(pod, "deleted by its pod-scoped key" if by_pod else "deleted")
        self._kill(pod, wait=not by_pod)
        return FakeResponse(204)

    def _action(self, req: FakeRequest, pod_id: str, *, by_pod: bool = False) -> FakeResponse:
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            return _problem(400, "Bad Request", "request body is not valid JSON")
        if not isinstance(body, dict) or set(body) != {"action"}:
            extra = sorted(set(body) - {"action"}) if isinstance(body, dict) else []
            errors = [f"$: additional properties '{k}' not allowed" for k in extra] or ["$: missing property 'action'"]
            return _problem(422, "Unprocessable Entity", "Request validation failed.", errors)
        action = body["action"]
        if action not in ("start", "stop", "restart", "terminate"):
            return _problem(422, "Unprocessable Entity", "Request validation failed.",
                            [f"$.action: value must be one of 'start', 'stop', 'restart', 'terminate' (got {action!r})"])
        if action == "terminate":
            return self._delete(pod_id, by_pod=by_pod)
        to_kill = None
        with self.lock:
            pod = self._pods.get(pod_id)
            if pod is None:
                return _problem(404, "Not Found", "pod not found")
            if action not in ALLOWED_ACTIONS[pod.status]:
                return _problem(409, "Conflict", f"action {action!r} is not valid for a pod in status {pod.status}; "
                                f"allowed: {', '.join(ALLOWED_ACTIONS[pod.status])}")
            now = time.monotonic()
            if action == "stop":
                to_kill, pod.process = pod.process, None
                self._release_ports(pod)
                pod.status, pod.running_since, pod.spawn_at = "EXITED", None, None
                self._syslog(pod, "pod stopped")
            elif action == "start":
                self._assign_ports(pod)  # a new public port on every start, as on RunPod
                pod.status, pod.spawn_at = "STARTING", now
                self._syslog(pod, "pod starting")
            else:  # restart: the container only
                to_kill, pod.process = pod.process, None
                pod.status, pod.running_since, pod.spawn_at = "STARTING", None, now
                self._syslog(pod, "container restarting")
            self.ledger.machine_update(pod.id, cost_per_hr=pod.cost, status=pod.status)
            answer = json_response(200, self._pod_json(pod))
        if to_kill is not None:
            to_kill.kill(self.kill_grace_s, wait=not by_pod)
        return answer

    # ---- logs (server-sent events)

    def _logs(self, req: FakeRequest, pod_id: str) -> FakeResponse:
        source = req.q("source")
        if source is not None and source not in ("container", "system"):
            return _problem(422, "Unprocessable Entity", "Request validation failed.",
                            ["source: value must be one of 'container', 'system'"])
        try:
            tail = int(req.q("tail") or 100)
        except ValueError:
            return _problem(422, "Unprocessable Entity", "Request validation failed.", ["tail: expected integer"])
        if not 0 <= tail <= 5000:
            return _problem(422, "Unprocessable Entity", "Request validation failed.", ["tail: must be 0..5000"])
        after_seq: int | None = None
        since: datetime | None = None
        last_id = req.headers.get("Last-Event-ID")
        if last_id:
            try:
                after_seq = int(last_id.rsplit("/", 1)[-1])
            except ValueError:
                return _problem(400, "Bad Request", "Last-Event-ID: not an id this endpoint sent")
        elif req.q("since"):
            try:
                since = datetime.fromisoformat(str(req.q("since")))
            except ValueError:
                return _problem(422, "Unprocessable Entity", "Request validation failed.", ["since: expected RFC 3339"])
        with self.lock:
            pod = self._pods.get(pod_id)
            if pod is None:
                return _problem(404, "Not Found", "pod not found")
            lines = [x for x in pod.log if source is None or x.source == source]
        if after_seq is not None:
            backlog = [x for x in lines if x.seq > after_seq]
        elif since is not None:
            backlog = [x for x in lines if datetime.fromisoformat(x.ts) >= since]
        else:
            backlog = lines[-tail:] if tail else []
        start_seq = backlog[-1].seq if backlog else (lines[-1].seq if lines else 0)
        return FakeResponse(200, content_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "Connection": "keep-alive",
                                     "X-Accel-Buffering": "no"},
                            stream=self._sse(pod_id, source, backlog, start_seq))

    def _sse(self, pod_id: str, source: str | None, backlog: list[_LogLine], seq: int) -> Iterator[bytes]:
        def event(x: _LogLine) -> bytes:
            data = json.dumps({"ts": x.ts, "source": x.source, "line": x.line})
            return f"id: {x.ts}/{x.seq:012d}\ndata: {data}\n\n".encode()

        for x in backlog:
            yield event(x)
        yield b": live\n\n"  # a comment: the backfill is done, live lines follow
        while not self.stopping:
            with self.lock:
                pod = self._pods.get(pod_id)
                if pod is None:
                    return
                new = [x for x in pod.log if x.seq > seq and (source is None or x.source == source)]
            for x in new:
                seq = x.seq
                yield event(x)
            self.sleep(0.1)

    # ---- catalog

    def _catalog(self, req: FakeRequest, gpu_id: str | None) -> FakeResponse:
        include = [v for v in (req.q("include") or "").split(",") if v]
        if any(v != "AVAILABILITY" for v in include):
            return _problem(422, "Unprocessable Entity", "Request validation failed.",
                            ["include: value must be 'AVAILABILITY'"])
        filters = [n for n in ("product", "count", "cloud", "countryCodes", "cudaVersions", "minCudaVersion")
                   if req.q(n) is not None]
        if include and "product" not in filters:
            return _problem(400, "Bad Request", "include=AVAILABILITY requires product (POD, CLUSTER or SERVERLESS)")
        if not include and filters:
            return _problem(400, "Bad Request", f"{', '.join(filters)} valid only with include=AVAILABILITY")
        if req.q("cudaVersions") and req.q("minCudaVersion"):
            return _problem(400, "Bad Request", "cudaVersions and minCudaVersion are mutually exclusive")
        cloud = req.q("cloud") or "SECURE"
        if cloud not in ("SECURE", "COMMUNITY"):
            return _problem(422, "Unprocessable Entity", "Request validation failed.",
                            ["cloud: value must be one of 'SECURE', 'COMMUNITY'"])
        try:
            count = int(req.q("count") or 1)
        except ValueError:
            return _problem(422, "Unprocessable Entity", "Request validation failed.", ["count: expected integer"])
        countries = {c for c in (req.q("countryCodes") or "").split(",") if c}
        cudas = [c for c in (req.q("cudaVersions") or "").split(",") if c]
        min_cuda = req.q("minCudaVersion")

        def entry(g: GpuOffer) -> dict[str, Any] | None:
            out: dict[str, Any] = {
                "id": g.id, "name": g.name, "pool": g.pool, "manufacturer": g.manufacturer, "memory": g.memory,
                "secure": g.max_secure > 0, "community": g.max_community > 0,
                "price": {"secure": g.price_secure, "community": g.price_community},
                "maxCount": {"secure": g.max_secure, "community": g.max_community},
            }
            if not include:
                return out
            dcs = [d for d in g.data_centers if not countries or DC_NAMES[d][1] in countries]
            versions = [v for v in g.cuda_versions if (not cudas or v in cudas)
                        and (not min_cuda or _version_key(v) >= _version_key(min_cuda))]
            max_count = g.max_secure if cloud == "SECURE" else g.max_community
            stocked = g.id not in self.unavailable_gpus and 0 < count <= max_count and bool(versions)
            if countries and not dcs and gpu_id is None:
                return None
            out["availability"] = "HIGH" if stocked and dcs else "NONE"
            if stocked and dcs:
                out["dataCenters"] = [{"id": d, "name": DC_NAMES[d][0], "availability": "HIGH"} for d in dcs]
            if versions:
                out["cudaVersions"] = [{"version": v, "available": stocked} for v in versions]
            return out

        if gpu_id is not None:
            offer = self.catalog.get(gpu_id)
            if offer is None:
                return _problem(404, "Not Found", f"GPU type {gpu_id!r} not found")
            return json_response(200, entry(offer))
        gpus = [e for e in (entry(g) for g in self.catalog.values()) if e is not None]
        return json_response(200, {"gpus": gpus})

    # ---- time-driven state

    def tick(self) -> None:
        now = time.monotonic()
        to_kill: list[MachineProcess] = []
        with self.lock:
            for pod in list(self._pods.values()):
                self._read_log(pod)
                if pod.status == "PROVISIONING" and now >= pod.next_at:
                    pod.dc = pod.data_center_ids[0] if pod.data_center_ids else None
                    pod.cuda = pod.cuda_choices[-1] if pod.gpu and pod.cuda_choices else None
                    self._assign_ports(pod)
                    pod.status, pod.spawn_at = "STARTING", now
                    self._syslog(pod, f"machine assigned in {pod.dc}; starting the container")
                if pod.status == "STARTING" and pod.spawn_at is not None and now >= pod.spawn_at:
                    pod.spawn_at = None
                    self._spawn(pod)
                    pod.next_at = now + self.start_s
                if pod.status in ("STARTING", "RUNNING") and pod.process is not None:
                    code = pod.process.poll()
                    if code is not None:
                        self._read_log(pod)
                        pod.exit_codes.append(code)
                        pod.process = None
                        pod.running_since = None
                        if self.on_exit == "restart":
                            pod.restarts += 1
                            pod.status, pod.spawn_at = "STARTING", now + self.restart_delay_s
                            self._syslog(pod, f"container exited with code {code}; restarting")
                        else:
                            pod.status = "EXITED" if self.on_exit == "exited" else "ERROR"
                            self._syslog(pod, f"container exited with code {code}")
                if pod.status == "STARTING" and pod.process is not None and pod.spawn_at is None and now >= pod.next_at:
                    pod.status, pod.running_since = "RUNNING", now
                    pod.ports_visible_at = now + self.ports_delay_s
                    if pod.started_wall is None:
                        pod.started_wall = time.time()
                    if pod.preempt_after_s is not None:
                        pod.preempt_at, pod.preempt_after_s = now + pod.preempt_after_s, None
                if pod.preempt_at is not None and now >= pod.preempt_at:
                    pod.preempt_at = None
                    proc = self._preempt(pod, pod.preempt_mode, kill=False)
                    if proc is not None:
                        to_kill.append(proc)
                self.ledger.machine_update(pod.id, cost_per_hr=pod.cost, status=pod.status)
        for proc in to_kill:
            proc.kill(self.kill_grace_s, wait=False)

    def _preempt(self, pod: _Pod, mode: str, *, kill: bool = True) -> MachineProcess | None:
        """Take the pod away (call with the lock held). Returns the process to kill when ``kill`` is False."""
        proc, pod.process = pod.process, None
        self._syslog(pod, f"pod preempted ({mode})")
        if mode == "vanish":
            self._remove(pod, "preempted")
        else:
            self._release_ports(pod)
            pod.status, pod.running_since, pod.spawn_at = ("ERROR" if mode == "error" else "EXITED"), None, None
            self.ledger.machine_update(pod.id, cost_per_hr=pod.cost, status=pod.status)
        if proc is not None and kill:
            proc.kill(self.kill_grace_s, wait=False)
            return None
        return proc

    def shutdown_machines(self) -> None:
        with self.lock:
            procs = [p.process for p in self._pods.values() if p.process is not None]
        for proc in procs:
            proc.kill(self.kill_grace_s, wait=True)

    def extra_state(self) -> dict[str, Any]:
        with self.lock:
            pods = []
            for p in self._pods.values():
                proc = p.process
                pods.append({
                    "id": p.id, "name": p.name, "status": p.status, "cost": p.cost,
                    "pid": proc.pid if proc else None, "alive": proc is not None and proc.poll() is None,
                    "restarts": p.restarts, "exit_codes": list(p.exit_codes),
                    "tcp_ports": {str(k): v for k, v in p.port_map.items()},
                })
        return {"pods": pods, "unavailable_gpus": sorted(self.unavailable_gpus)}

    # ---- internals (call with the lock held unless said otherwise)

    def _new_id(self) -> str:
        while True:
            pod_id = "".join(secrets.choice(_ID_CHARS) for _ in range(14))
            if pod_id not in self._pods:
                return pod_id

    def _remove(self, pod: _Pod, reason: str) -> None:
        self._pods.pop(pod.id, None)
        self._release_ports(pod)
        pod.status = "TERMINATED"
        self.ledger.machine_gone(pod.id, reason)

    def _kill(self, pod: _Pod, *, wait: bool) -> None:
        """Kill the pod's processes (without the lock) and drop its directory."""
        proc, pod.process = pod.process, None
        if proc is not None:
            proc.kill(self.kill_grace_s, wait=wait)
        if not self.keep_pod_dirs and wait:
            shutil.rmtree(self.pod_dir(pod.id), ignore_errors=True)

    def _assign_ports(self, pod: _Pod) -> None:
        pod.port_map = {p: free_port() for p, kind in _parse_ports(pod.ports)[0] if kind == "tcp"}

    def _release_ports(self, pod: _Pod) -> None:
        pod.port_map = {}
        pod.ports_visible_at = None

    def _syslog(self, pod: _Pod, line: str) -> None:
        self._seq += 1
        pod.log.append(_LogLine(iso_now(), self._seq, "system", line))

    def _read_log(self, pod: _Pod) -> None:
        path = self.work_dir / f"{pod.id}.log"
        try:
            with open(path, "rb") as f:
                f.seek(pod.log_pos)
                data = f.read(1 << 20)
        except OSError:
            return
        if not data:
            return
        pod.log_pos += len(data)
        data = pod.log_partial + data
        *lines, pod.log_partial = data.split(b"\n")
        ts = iso_now()
        for raw in lines:
            self._seq += 1
            pod.log.append(_LogLine(ts, self._seq, "container", raw.decode("utf-8", "replace").rstrip("\r")))

    def _spawn(self, pod: _Pod) -> None:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_KEYS} if self.inherit_env else {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
        pod_dir = self.pod_dir(pod.id)
        env["HOME"] = str(pod_dir)
        env.update(self.extra_env)  # what the "image" brings (e.g. a PATH whose python3 is a venv's)
        env.update(pod.env)
        env.update({
            "RUNPOD_POD_ID": pod.id,
            "RUNPOD_POD_HOSTNAME": f"{pod.id}-{pod.hostname_suffix}",
            "RUNPOD_DC_ID": pod.dc or "",
            "RUNPOD_GPU_COUNT": str(pod.gpu["count"] if pod.gpu else 0),
            "RUNPOD_CPU_COUNT": str(pod.cpu["vcpuCount"] if pod.cpu else 8),
            "RUNPOD_PUBLIC_IP": "127.0.0.1",
            "RUNPOD_API_KEY": pod.scoped_key,
        })
        if pod.cuda:
            env["CUDA_VERSION"] = pod.cuda
        for private, public in pod.port_map.items():
            env[f"RUNPOD_TCP_PORT_{private}"] = str(public)
        try:
            argv = shlex.split(pod.args) if pod.args.strip() else list(self.default_cmd)
        except ValueError as exc:
            argv = [sys.executable, "-c", f"import sys; print({f'bad args: {exc}'!r}); sys.exit(2)"]
        proc = MachineProcess(argv, cwd=pod_dir, env=env, log_path=self.work_dir / f"{pod.id}.log")
        proc.start()
        pod.process = proc
        self._syslog(pod, "container started" if proc.spawn_error is None else proc.spawn_error)

    def _pod_json(self, pod: _Pod) -> dict[str, Any]:
        now = time.monotonic()
        ports_ready = pod.status == "RUNNING" and pod.ports_visible_at is not None and now >= pod.ports_visible_at
        runtime: dict[str, Any] | None = None
        if pod.status == "RUNNING" and pod.running_since is not None:
            runtime = {
                "uptime": int(now - pod.running_since),
                "gpus": [{"util": 0, "memoryUtil": 0} for _ in range(pod.gpu["count"] if pod.gpu else 0)],
                "cpu": {"util": 1}, "memory": {"util": 3},
            }
            if ports_ready:
                runtime["ports"] = [
                    {"private": p, "public": pod.port_map.get(p), "type": kind,
                     "ip": "127.0.0.1" if kind == "tcp" else None}
                    for p, kind in _parse_ports(pod.ports)[0]
                ]
        direct = None
        if ports_ready and 22 in pod.port_map:
            direct = {"host": "127.0.0.1", "port": pod.port_map[22], "username": "root",
                      "command": f"ssh root@127.0.0.1 -p {pod.port_map[22]}"}
        out: dict[str, Any] = {
            "id": pod.id, "name": pod.name, "image": pod.image, "args": pod.args, "disk": pod.disk,
            "ports": list(pod.ports), "env": dict(pod.env), "registry": pod.registry, "status": pod.status,
            "actions": list(ALLOWED_ACTIONS[pod.status]), "mounts": pod.mounts, "cloud": pod.cloud,
            "dataCenterId": pod.dc, "cudaVersion": pod.cuda,
            "ssh": {"proxy": None, "direct": direct},  # the fake has no ssh.runpod.io proxy
            "template": None, "cost": pod.cost, "locked": pod.locked, "globalNetworking": {"enabled": False},
            "runtime": runtime, "createdAt": iso_now(pod.created_wall),
            "startedAt": None if pod.started_wall is None else iso_now(pod.started_wall),
        }
        if pod.gpu is not None:
            out["gpu"] = dict(pod.gpu)
        if pod.cpu is not None:
            out["cpu"] = dict(pod.cpu)
        return out

