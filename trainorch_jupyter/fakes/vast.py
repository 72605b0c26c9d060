"""A fake Vast.ai API (``https://console.vast.ai/api/v0/...``) that follows Vast's OpenAPI spec and the calls of the
official ``vastai`` command-line client (PyPI ``vastai`` 1.9.1, API_NOTES 3.9).

What it serves (shapes, status codes and error bodies as the spec and the notes have them; trailing slashes as the
CLI sends them, and without):

- ``POST /api/v0/bundles/`` (search offers: ``{"<field>": {"<op>": value}}`` filters with ``eq neq gt gte lt lte in
  notin``, ``order``, ``limit``, ``type`` (``on-demand``/``ondemand``/``bid``/``reserved``), ``allocated_storage``
  priced into ``dph_total``); no key needed (as gpuhunt calls it), a wrong key is the spec's 404.
- ``PUT /api/v0/asks/{id}/`` (create instance): ``image`` required, ``env`` as the spec's docker-flags string
  (``"-e K=V -p 70000:70000"``) or as the object the CLI and dstack send (``{"K": "V", "-p 70000:70000": "1"}``);
  ``onstart`` + ``args`` at most 4,096 characters and each env entry at most 256 (else 400 ``invalid_args``);
  ``runtype`` one of the spec's or the CLI's space-separated tokens; ``price`` (a bid) 0.001-128, and a bid below
  the offer's ``min_bid`` makes a *stopped* instance yet answers 400 ``invalid_price`` with its ``new_contract``
  (Vast's own trap, API_NOTES 3.3). 200 ``{"success": true, "new_contract": N, "instance_api_key": K}``; an
  offer taken or unknown is 404 ``no_such_ask``.
- ``GET /api/v0/instances/{id}/`` -> ``{"instances": {...}}``, ``{"instances": null}`` once destroyed;
  ``PUT /api/v0/instances/{id}/`` (``state`` stopped/running, ``label``); ``DELETE /api/v0/instances/{id}/``
  -> ``{"success": true}``, an unknown id 404 ``no_such_instance``.
- ``GET /api/v1/instances/`` (25 a page, ``next_token``/``after_token``, ``order_by``, ``select_cols``,
  ``select_filters`` on stored columns only: a computed one such as ``dph_total`` is a 400), and what the CLI asks
  first: ``GET /api/v0/users/current/`` and ``GET /api/v0/instances/filters/``.
- Auth: ``Authorization: Bearer <key>`` (or the older ``?api_key=``); 401 ``{"success": false, "error":
  "auth_error", "msg": "Invalid user key"}``. ``api_keys=None`` accepts any key (a dry run without an account).
- Each instance gets its own key (``CONTAINER_API_KEY`` inside it): it may read, stop/start or destroy that
  instance only (else 403); once the instance is gone it is a 401.
- Status: ``actual_status`` ``null`` -> ``loading`` (after ``provision_s``; not GPU-billed) -> ``running`` (after
  ``start_s``); ``ports`` appears ``ports_delay_s`` after ``running`` (the key is absent before, as on Vast).
- Rate limits per identity (a key) and endpoint, as minimum spacings (API_NOTES 3.6: search 10/min, create 4.5 s,
  destroy 3 s, show 2 s, list and manage 1 s): a 429 whose body is plain text ``API requests too frequent
  endpoint threshold=...`` and that has **no** ``Retry-After``. Each refusal is counted in ``/_fake/state``.

The machine: when an instance leaves ``loading`` its start really runs, in its own process group in
``<work_dir>/<id>/``, with a clean environment: ``PATH``, ``HOME`` (that directory), ``LANG``, ``extra_env`` (what
the image would bring), the instance's ``env`` and what Vast sets: ``CONTAINER_ID``, ``CONTAINER_API_KEY`` (the
instance's key), ``VAST_CONTAINERLABEL`` (``C.<id>``), ``PUBLIC_IPADDR=127.0.0.1`` and ``VAST_TCP_PORT_<p>`` for
each ``-p <p>:<p>``. With runtype ``ssh``/``jupyter`` (Vast's init replaces the entry point) ``onstart`` runs as
``/bin/sh -c ONSTART`` and the container stays up when it ends (Vast's sshd keeps it: a finished onstart does not
stop the billing); with ``args`` the arguments are the main process (the image's entry point executes them) and
its end is ``exited``. A port above 65535 gets identical internal and external numbers (listed in ``ports`` under
the number it got); a port below is mapped from a free external port by a TCP forwarder to ``127.0.0.1:<p>``
(so two instances cannot both use one such port here). ``22/tcp`` is listed for ssh runtypes but nothing
listens (the fake has no sshd). Stopping or destroying the instance kills its whole process group.

Faults (constructor ``faults={...}``, :meth:`VastFake.inject`, or ``POST /_fake/faults``):

==========================================  =====================================================================
``capacity_errors: N | {count, status}``    the next N creates answer 404 ``no_such_ask`` (``status`` 410: the
                                            ``cancel_unavail`` answer)
``taken_asks: [id]``                        those offers are rented by someone else (unlisted; creates 404)
``fail_but_created: N | {count, status,     the next N creates make an instance (it bills) but answer a failure
  error, state}``                           carrying ``new_contract`` (default 400 ``invalid_price``, the instance
                                            ``stopped``; ``state: running`` makes it come up; ``status: 200``
                                            answers ``success: false``)
``create_timeout: {count, seconds}``        the next creates make the instance and answer only after ``seconds``
``terminate_failures: N | {count, status}`` the next N destroys answer 200 ``{"success": false}`` (or ``status``
                                            5xx); the instance stays
``server_errors: {count, method?, status?}`` the next requests (of that method) answer 503
``drop_connections: {count, method?}``      the next requests are closed without an answer
``rate_limit_burst: N``                     the next N requests answer the plain-text 429
``bad_start: {count, status}``              the next instances go to ``exited``/``unknown``/``offline`` (or
                                            ``oci``: ``created`` with an OCI runtime error) instead of running
``preempt: id | {instance_id, mode?}``      that instance is preempted now
``preempt_after_running: {count, seconds, mode?}``  the next instances are preempted ``seconds`` after running
``clear: true``                             disarm everything
==========================================  =====================================================================

Preemption ``mode``: ``stopped`` (default: an interruptible instance outbid; contract and container stopped, its
disk still bills), ``exited``, ``unknown``, ``offline`` (its host lost), ``vanish`` (it is gone and no longer
bills). Every mode but ``vanish`` kills the processes and leaves the instance billing until destroyed.

:class:`VastSpecValidator` checks traffic against Vast's YAML spec with the errata the notes document (trailing
slashes, plain-text 429s, the dict form of ``ports``...): see :data:`SPEC_ERRATA`.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..model import SECRET_ENV_KEYS
from .base import (
    FakeRequest,
    FakeResponse,
    FakeServer,
    MachineProcess,
    OpenAPIValidator,
    RateLimiter,
    RateWindow,
    SpecValidator,
    free_port,
    json_response,
)

__all__ = ["DEFAULT_MACHINES", "DEFAULT_RATE_LIMITS", "SPEC_ERRATA", "FakeMachine", "VastFake", "VastSpecValidator"]

#: endpoint class -> its windows (a minimum spacing is one request per window of that many seconds)
DEFAULT_RATE_LIMITS: dict[str, tuple[RateWindow, ...]] = {
    "search": (RateWindow("search", 10, 60.0),),
    "create": (RateWindow("create", 1, 4.5),),
    "destroy": (RateWindow("destroy", 1, 3.0),),
    "show": (RateWindow("show", 1, 2.0),),
    "list": (RateWindow("list", 1, 1.0),),
    "manage": (RateWindow("manage", 1, 1.0),),
}
ENDPOINTS = ("search", "create", "destroy", "show", "list", "manage", "user", "filters")
ONSTART_ARGS_MAX = 4096
ENV_ENTRY_MAX = 256
ENV_TOTAL_MAX = 32768
RUNTYPE_TOKENS = {"ssh", "ssh_direc", "ssh_direct", "ssh_proxy", "jupyter", "jupyter_direc", "jupyter_direct",
                  "jupyter_proxy", "args"}
PREEMPT_MODES = ("stopped", "exited", "unknown", "offline", "vanish")
BAD_STARTS = ("exited", "unknown", "offline", "oci")
OCI_MSG = ("Error response from daemon: failed to create task for container: failed to create shim task: "
           "OCI runtime create failed: runc create failed: unable to start container process")
HOURS_PER_MONTH = 720.0
# stored columns of the v1 list that select_filters / order_by accept (computed ones are a 400, as on Vast)
_FILTER_COLS = {"id", "label", "actual_status", "intended_status", "cur_state", "next_state", "gpu_name",
                "verification", "machine_id", "image_uuid", "is_bid", "template_id", "host_id", "start_date"}
_OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin")


def _error(status: int, error: str, msg: str) -> FakeResponse:
    return json_response(status, {"success": False, "error": error, "msg": msg})


def _too_frequent(threshold: float) -> FakeResponse:
    """Vast's 429: plain text, no ``Retry-After``."""
    return FakeResponse(429, f"API requests too frequent endpoint threshold={threshold:g}".encode(), "text/plain")


# --------------------------------------------------------------------------------------------
# Offers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeMachine:
    """A host machine the fake rents out: one offer (ask ``ask_id``) of ``num_gpus`` GPUs, rentable ``slots``
    times at once (identical machines behind one listing). Prices are illustrative: ``dph_base`` is USD/h for the
    GPUs of the machine, ``storage_cost`` USD per GB-month, ``min_bid`` the interruptible floor (USD/h)."""

    ask_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram: int  # MB per GPU, as Vast reports it
    dph_base: float
    geolocation: str
    reliability: float = 0.99
    verified: bool = True
    min_bid: float | None = None
    storage_cost: float = 0.15
    direct_port_count: int = 100
    inet_down: float = 800.0
    inet_up: float = 400.0
    inet_down_cost: float = 0.002
    inet_up_cost: float = 0.002
    cuda_max_good: float = 12.8
    compute_cap: int = 890
    cpu_cores: int = 16
    cpu_ram: int = 64000
    disk_space: float = 500.0
    slots: int = 8
    machine_id: int = 0
    host_id: int = 0
    datacenter: bool = False

    @property
    def bid_floor(self) -> float:
        return self.min_bid if self.min_bid is not None else round(self.dph_base * 0.4, 4)

    @property
    def country(self) -> str:
        return self.geolocation.rsplit(",", 1)[-1].strip()


DEFAULT_MACHINES: tuple[FakeMachine, ...] = (
    FakeMachine(20001, "RTX 3090", 1, 24576, 0.13, "Texas, US", 0.985, machine_id=5101, host_id=71),
    FakeMachine(20002, "RTX 4090", 1, 24564, 0.28, "Quebec, CA", 0.992, machine_id=5102, host_id=72),
    FakeMachine(20003, "RTX 4090", 1, 24564, 0.34, "California, US", 0.998, cuda_max_good=12.9, machine_id=5103,
                host_id=73, datacenter=True),
    FakeMachine(20004, "RTX 4090", 2, 24564, 0.60, "Poland, PL", 0.99, machine_id=5104, host_id=74),
    FakeMachine(20005, "RTX 4090", 1, 24564, 0.20, "Vietnam, VN", 0.90, verified=False, inet_down=90.0,
                machine_id=5105, host_id=75),
    FakeMachine(20006, "RTX A6000", 1, 49140, 0.40, "Norway, NO", 0.995, machine_id=5106, host_id=76),
    FakeMachine(20007, "A100 SXM4", 1, 81920, 0.85, "Utah, US", 0.997, compute_cap=800, machine_id=5107, host_id=77,
                datacenter=True),
    FakeMachine(20008, "A100 PCIE", 1, 40960, 0.60, "Ontario, CA", 0.99, compute_cap=800, machine_id=5108, host_id=78),
    FakeMachine(20009, "H100 SXM", 1, 81559, 1.75, "Sweden, SE", 0.999, cuda_max_good=12.9, compute_cap=900,
                machine_id=5109, host_id=79, datacenter=True),
    FakeMachine(20010, "L40S", 1, 46068, 0.55, "Germany, DE", 0.993, machine_id=5110, host_id=80),
    FakeMachine(20011, "RTX 5090", 1, 32607, 0.48, "Texas, US", 0.991, compute_cap=1200, machine_id=5111, host_id=81),
    FakeMachine(20012, "H100 SXM", 8, 81559, 14.0, "Iceland, IS", 0.999, cuda_max_good=12.9, compute_cap=900,
                machine_id=5112, host_id=82, datacenter=True),
)


def _storage_per_hour(machine: FakeMachine, disk_gb: float) -> float:
    return machine.storage_cost * disk_gb / HOURS_PER_MONTH


def _by(column: str) -> Callable[[Mapping[str, Any]], tuple[bool, Any]]:
    """A sort key on ``column`` (missing values last when ascending)."""
    def key(row: Mapping[str, Any]) -> tuple[bool, Any]:
        value = row.get(column)
        return value is None, value if value is not None else 0
    return key


def _match(value: Any, ops: Mapping[str, Any]) -> bool:
    """One ``{"<op>": operand}`` filter against ``value`` (a missing value fails every op but ``neq``/``notin``)."""
    for op, operand in ops.items():
        try:
            if op == "eq":
                ok = value == operand
            elif op == "neq":
                ok = value != operand
            elif op == "in":
                ok = value in (operand or [])
            elif op == "notin":
                ok = value not in (operand or [])
            elif op in ("gt", "gte", "lt", "lte"):
                if value is None or operand is None:
                    return False
                ok = {"gt": value > operand, "gte": value >= operand, "lt": value < operand,
                      "lte": value <= operand}[op]
            else:
                raise ValueError(op)
        except TypeError:
            return False
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------------------------
# An instance, and the TCP forwarding of its low ports
# --------------------------------------------------------------------------------------------


class _Forward:
    """Listen on ``127.0.0.1:public`` and forward each connection to ``127.0.0.1:private`` (Vast's port mapping)."""

    def __init__(self, public: int, private: int) -> None:
        self.public = public
        self.private = private
        self._srv = socket.create_server(("127.0.0.1", public))
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"fake-vast-fwd-{public}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.private), timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._srv.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@dataclass
class _Instance:
    id: int
    label: str | None
    machine: FakeMachine
    image: str
    disk: float
    runtype: str
    onstart: str | None
    args: list[str] | None
    env: dict[str, str]
    port_reqs: list[int]
    bid: float | None
    scoped_key: str
    intended_status: str = "running"
    cur_state: str = "running"
    next_state: str = "running"
    actual_status: str | None = None
    status_msg: str | None = None
    created_wall: float = field(default_factory=time.time)
    next_at: float = 0.0  # monotonic time of the next automatic step
    running_since: float | None = None
    ports_visible_at: float | None = None
    port_map: dict[int, int] = field(default_factory=dict)  # requested port -> external port
    forwards: list[_Forward] = field(default_factory=list)
    process: MachineProcess | None = None
    exit_codes: list[int] = field(default_factory=list)
    bad_start: str | None = None
    preempt_after_s: float | None = None
    preempt_at: float | None = None
    preempt_mode: str = "stopped"
    jupyter_token: str = field(default_factory=lambda: secrets.token_hex(32))
    ssh_port: int = field(default_factory=lambda: 20000 + secrets.randbelow(40000))

    @property
    def gpu_price(self) -> float:
        return self.bid if self.bid is not None else self.machine.dph_base

    @property
    def storage_hr(self) -> float:
        return _storage_per_hour(self.machine, self.disk)

    @property
    def dph_total(self) -> float:
        return round(self.gpu_price + self.storage_hr, 6)

    @property
    def cost(self) -> float:
        """What it bills now: the GPUs only while running (not while loading, per Vast), the disk always."""
        return round((self.gpu_price if self.actual_status == "running" else 0.0) + self.storage_hr, 6)

    @property
    def main_is_args(self) -> bool:
        return self.runtype.split()[0] == "args" if self.runtype else False


# --------------------------------------------------------------------------------------------
# The spec, with its documented errata
# --------------------------------------------------------------------------------------------

#: What the checks add to Vast's spec, each from ``API_NOTES.md`` (the spec itself is unchanged on disk):
SPEC_ERRATA = (
    "trailing slashes: the CLI and every reference client call /api/v0/asks/{id}/ etc.; paths are checked without "
    "the trailing slash (3.1)",
    "show instance: a destroyed or unknown id answers {\"instances\": null} with 200 (3.4)",
    "show instance: 'ports' is the dict form {\"8765/tcp\": [{HostIp, HostPort}]} and 'extra_env' [[k, v]], as the "
    "spec's own /api/v1/instances schema has them (the Instance component lists integers and strings) (3.4)",
    "429: the body is plain text 'API requests too frequent...' (text/plain) on every endpoint (3.6)",
    "401/403 {success, error, msg} may answer any call (a missing, wrong or scoped key lacking the permission) (3.1)",
    "5xx (500/502/503/504) may answer any call; the CLI retries 502/503/504 (3.9)",
    "GET /api/v0/instances/filters/ (called by `vastai show instances`) is not in the spec: not checked (3.9)",
    "search offers needs no key (gpuhunt, used by dstack, calls it without one) (3.2)",
    "search offers: 'order' is a list of [field, direction] pairs; the spec puts minItems/maxItems 2 on the outer "
    "list, which refuses the CLI's own {\"order\": [[\"score\", \"desc\"]]} (3.2, 3.9)",
)
_UNSPECIFIED = {"/api/v0/instances/filters"}
_METHODS = ("get", "put", "post", "delete", "patch")


def load_spec(path: str | Path) -> dict[str, Any]:
    """An OpenAPI document from YAML or JSON (a fresh copy each call; the parse is cached)."""
    return copy.deepcopy(_parsed_spec(str(Path(path).resolve())))


@functools.lru_cache(maxsize=4)
def _parsed_spec(path: str) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~8x faster on Vast's 10,000 lines
        data = yaml.load(text, Loader=loader)  # a safe loader (C or pure Python)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an OpenAPI document")
    return data


def apply_errata(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of Vast's spec with :data:`SPEC_ERRATA` applied."""
    spec = copy.deepcopy(spec)
    paths = spec["paths"]
    error_ref = {"$ref": "#/components/schemas/Error"}
    v1_row = (paths["/api/v1/instances"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
              ["properties"]["instances"]["items"]["properties"])
    inst = spec["components"]["schemas"]["Instance"]["properties"]
    inst["ports"] = copy.deepcopy(v1_row["ports"])
    inst["extra_env"] = copy.deepcopy(v1_row["extra_env"])
    order = (paths["/api/v0/bundles"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
             ["order"])
    search = paths["/api/v0/bundles"]["post"]
    search["security"] = [{}, *(search.get("security") or spec.get("security") or [])]
    order["items"] = {**order.get("items", {}), "minItems": order.pop("minItems", 2), "maxItems": order.pop("maxItems", 2)}
    show = paths["/api/v0/instances/{id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    show["properties"]["instances"] = {"anyOf": [{"$ref": "#/components/schemas/Instance"}, {"type": "null"}]}
    for item in paths.values():
        for method, op in item.items():
            if method not in _METHODS or not isinstance(op, dict):
                continue
            responses = op.setdefault("responses", {})
            r429 = responses.setdefault("429", {"description": "Too Many Requests"})
            r429.setdefault("content", {})["text/plain"] = {"schema": {"type": "string"}}
            for code in ("401", "403", "500", "502", "503", "504"):
                responses.setdefault(code, {"description": "error (API_NOTES errata)",
                                            "content": {"application/json": {"schema": error_ref}}})
    return spec


class VastSpecValidator(OpenAPIValidator):
    """:class:`~.base.OpenAPIValidator` over Vast's spec (YAML or JSON) with :data:`SPEC_ERRATA` applied
    (``errata=False``: the spec as it is)."""

    def __init__(self, spec_path: str | Path, *, server_url: str | None = None, errata: bool = True) -> None:
        from openapi_core import OpenAPI
        from openapi_core.configurations import Config

        spec = load_spec(spec_path)
        if errata:
            spec = apply_errata(spec)
        self.server_url = (server_url or spec.get("servers", [{}])[0].get("url", "")).rstrip("/")
        self._api = OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None))
        self._lock = threading.Lock()

    @classmethod
    def cached(cls, spec_path: str | Path, *, server_url: str | None = None) -> VastSpecValidator:
        return _cached_vast_validator(str(Path(spec_path).resolve()), server_url)

    def in_spec(self, path: str) -> bool:
        return not path.startswith("/_fake/") and _spec_path(path) not in _UNSPECIFIED

    def check_request(self, method: str, path: str, query: str, headers: Mapping[str, str],
                      body: bytes | None) -> list[str]:
        return super().check_request(method, path, query, headers, body) if self.in_spec(path) else []

    def check_response(self, method: str, path: str, query: str, req_headers: Mapping[str, str],
                       req_body: bytes | None, status: int, headers: Mapping[str, str], body: bytes) -> list[str]:
        if not self.in_spec(path):
            return []
        return super().check_response(method, path, query, req_headers, req_body, status, headers, body)

    def _request(self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes | None) -> Any:
        return super()._request(method, _spec_path(path), query, headers, body)


def _spec_path(path: str) -> str:
    return path.rstrip("/") or "/"


@functools.lru_cache(maxsize=4)
def _cached_vast_validator(spec_path: str, server_url: str | None) -> VastSpecValidator:
    return VastSpecValidator(spec_path, server_url=server_url)


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


class VastFake(FakeServer):
    """The fake Vast.ai API. See the module docstring for what it does.

    ``VastFake(api_keys={"k"}, provision_s=0.1, start_s=0.1).start()`` then ``fake.base_url``; ``fake.stop()``
    kills every instance's processes. Python helpers: :meth:`inject` (faults), :meth:`preempt`,
    :meth:`instance_ids`, :meth:`instance_process`, :meth:`scoped_key`, :meth:`port_of`.
    """

    provider = "vast"

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
        on_exit: str = "exited",
        kill_grace_s: float = 1.0,
        rate_limits: Mapping[str, Iterable[RateWindow]] | Iterable[RateWindow] | None = None,
        machines: Iterable[FakeMachine] = DEFAULT_MACHINES,
        default_cmd: list[str] | None = None,
        inherit_env: bool = False,
        extra_env: Mapping[str, str] | None = None,
        faults: Mapping[str, Any] | None = None,
        validator: SpecValidator | None = None,
        work_dir: str | Path | None = None,
        keep_dirs: bool = False,
        tick_s: float = 0.05,
    ) -> None:
        if on_exit not in ("exited", "restart", "error"):
            raise ValueError("on_exit must be 'exited', 'restart' or 'error' (what an args-runtype main process's end does)")
        super().__init__(host=host, port=port, rate_limits=(), validator=validator, work_dir=work_dir, tick_s=tick_s)
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.provision_s = provision_s
        self.start_s = start_s
        self.ports_delay_s = ports_delay_s
        self.restart_delay_s = restart_delay_s
        self.on_exit = on_exit
        self.kill_grace_s = kill_grace_s
        self.machines = {m.ask_id: m for m in machines}
        self.default_cmd = default_cmd or [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"]
        self.inherit_env = inherit_env
        self.extra_env = dict(extra_env or {})
        self.keep_dirs = keep_dirs
        self.taken_asks: set[int] = set()
        self.limits = self._limiters(rate_limits)
        self._instances: dict[int, _Instance] = {}
        self._keys: dict[str, int] = {}  # every instance key ever issued -> instance id
        self._next_id = 31_000_000 + secrets.randbelow(1_000_000)
        if faults:
            self.apply_faults(dict(faults))

    @staticmethod
    def spec_validator(spec_path: str | Path) -> VastSpecValidator:
        """The validator for Vast's spec (YAML) with its errata (``python -m trainorch_jupyter.fakes vast --spec``)."""
        return VastSpecValidator(spec_path)

    @staticmethod
    def _limiters(rate_limits: Any) -> dict[str, RateLimiter]:
        if rate_limits is None:
            spec: Mapping[str, Iterable[RateWindow]] = DEFAULT_RATE_LIMITS
        elif isinstance(rate_limits, Mapping):
            spec = rate_limits
        else:  # the same windows for each endpoint class, counted apart
            windows = tuple(rate_limits)
            spec = {e: windows for e in ENDPOINTS} if windows else {}
        return {e: RateLimiter(ws) for e, ws in spec.items()}

    # ---- Python helpers for tests

    def inject(self, **faults: Any) -> None:
        """Arm faults (same names as ``POST /_fake/faults``)."""
        self.apply_faults(faults)

    def preempt(self, instance_id: int, mode: str = "stopped") -> bool:
        """The host or the market takes the instance away now; False when there is no such instance."""
        if mode not in PREEMPT_MODES:
            raise ValueError(f"mode must be one of {', '.join(PREEMPT_MODES)}")
        with self.lock:
            inst = self._instances.get(int(instance_id))
            if inst is None:
                return False
            proc = self._preempt(inst, mode)
        if proc is not None:
            proc.kill(self.kill_grace_s, wait=False)
        return True

    def instance_ids(self) -> list[int]:
        with self.lock:
            return list(self._instances)

    def instance_process(self, instance_id: int) -> MachineProcess | None:
        with self.lock:
            inst = self._instances.get(int(instance_id))
            return inst.process if inst else None

    def scoped_key(self, instance_id: int) -> str | None:
        with self.lock:
            inst = self._instances.get(int(instance_id))
            return inst.scoped_key if inst else None

    def port_of(self, instance_id: int, port: int) -> int | None:
        """The external port of requested ``port`` of an instance (None before it runs)."""
        with self.lock:
            inst = self._instances.get(int(instance_id))
            return inst.port_map.get(port) if inst else None

    def instance_dir(self, instance_id: int) -> Path:
        return self.work_dir / str(instance_id)

    # ---- faults

    def apply_faults(self, body: dict[str, Any]) -> None:
        body = dict(body)
        if body.pop("clear", False):
            self.faults.clear()
            self.taken_asks.clear()
        if "taken_asks" in body:
            asks = body.pop("taken_asks")
            if not isinstance(asks, list) or not all(isinstance(a, int) for a in asks):
                raise ValueError("taken_asks: expected a list of offer ids")
            self.taken_asks = set(asks)
        if "preempt" in body:
            target = body.pop("preempt")
            iid, mode = (target, "stopped") if isinstance(target, int) else (target["instance_id"],
                                                                              target.get("mode", "stopped"))
            if not self.preempt(int(iid), mode):
                raise ValueError(f"preempt: no instance {iid!r}")
        for name in ("bad_start", "preempt_after_running"):
            value = body.get(name)
            mode = value.get("status" if name == "bad_start" else "mode") if isinstance(value, dict) else None
            allowed = BAD_STARTS if name == "bad_start" else PREEMPT_MODES
            if mode is not None and mode not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {mode!r}")
        known = {"capacity_errors", "fail_but_created", "create_timeout", "terminate_failures", "server_errors",
                 "drop_connections", "rate_limit_burst", "bad_start", "preempt_after_running"}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(known | {'taken_asks', 'preempt', 'clear'})}")
        super().apply_faults(body)

    # ---- dispatch

    def who(self, req: FakeRequest) -> str:
        token = req.bearer or req.q("api_key")
        if token is None:
            return "none"
        with self.lock:
            return "instance-key" if token in self._keys else "account-key"

    @staticmethod
    def _endpoint(method: str, parts: list[str]) -> str | None:
        """The rate-limit class of a request (None: not a path of this API)."""
        if parts == ["api", "v0", "bundles"] and method == "POST":
            return "search"
        if len(parts) == 4 and parts[:3] == ["api", "v0", "asks"] and method == "PUT":
            return "create"
        if parts == ["api", "v1", "instances"] and method == "GET":
            return "list"
        if parts == ["api", "v0", "instances", "filters"] and method == "GET":
            return "filters"
        if parts[:3] == ["api", "v0", "users"] and parts[3:] == ["current"] and method == "GET":
            return "user"
        if len(parts) == 4 and parts[:3] == ["api", "v0", "instances"]:
            return {"GET": "show", "PUT": "manage", "DELETE": "destroy"}.get(method)
        return None

    def route(self, req: FakeRequest) -> FakeResponse:
        parts = [unquote(p) for p in req.path.strip("/").split("/")]
        endpoint = self._endpoint(req.method, parts)
        if endpoint is None:
            return _error(404, "not_found", f"no API endpoint {req.method} {req.path}")
        # 1. auth: the account's key, an instance's own key, or none (only a search may go without)
        token = req.bearer or req.q("api_key")
        scoped: int | None = None
        if token is not None:
            with self.lock:
                scoped = self._keys.get(token)
                if scoped is not None and scoped not in self._instances:
                    return _error(401, "auth_error", "Invalid user key")
            if scoped is None and self.api_keys is not None and token not in self.api_keys:
                if endpoint == "search":  # the spec documents a 404 for a bad key here
                    return json_response(404, {"error": "auth_error", "msg": "Invalid user key"})
                return _error(401, "auth_error", "Invalid user key")
        elif endpoint != "search":
            return _error(401, "auth_error", "Invalid user key")
        # 2. rate limits: per identity and endpoint, as a minimum spacing
        limiter = self.limits.get(endpoint)
        if limiter is not None:
            decision = limiter.check(f"{token or 'anonymous'}")
            if not decision.allowed:
                self.ledger.record_rate_limit_violation(req.method, req.path, decision.window, 0)
                window = next(w for w in limiter.windows if w.name == decision.window)
                return _too_frequent(window.seconds / window.quota)
        # 3. injected transport and server faults
        if self.faults.take("rate_limit_burst") is not None:
            return _too_frequent(1.0)

        def same_method(p: dict[str, Any]) -> bool:
            return str(p.get("method", req.method)).upper() == req.method

        if self.faults.take("drop_connections", same_method) is not None:
            return FakeResponse(0, drop=True)
        fault = self.faults.take("server_errors", same_method)
        if fault is not None:
            return _error(int(fault.get("status", 503)), "server_error", "upstream temporarily unavailable; try again")
        # 4. an instance's own key: its own instance only (read, stop/start, destroy)
        if scoped is not None:
            own = endpoint in ("show", "manage", "destroy") and parts[3] == str(scoped)
            if not own:
                return _error(403, "not_authorized", "this key may only manage its own instance")
        return self._route(req, endpoint, parts, by_instance=scoped is not None)

    def _route(self, req: FakeRequest, endpoint: str, parts: list[str], *, by_instance: bool) -> FakeResponse:
        if endpoint == "search":
            return self._search(req)
        if endpoint == "create":
            return self._create(req, parts[3])
        if endpoint == "list":
            return self._list(req)
        if endpoint == "filters":
            return self._filters()
        if endpoint == "user":
            return json_response(200, {"id": 4242, "key_id": 1, "email": "fake-user@example.invalid", "balance": 100.0,
                                       "credit": 100.0, "ssh_key": "", "sid": "fake", "username": "fake",
                                       "host_agreement_accepted": False})
        try:
            iid = int(parts[3])
        except ValueError:
            return _error(400, "invalid_args", "invalid instance_id")
        if endpoint == "show":
            with self.lock:
                inst = self._instances.get(iid)
                return json_response(200, {"instances": self._instance_json(inst) if inst else None})
        if endpoint == "manage":
            return self._manage(req, iid, by_instance=by_instance)
        return self._destroy(iid, by_instance=by_instance)

    # ---- offers

    def _offer_json(self, m: FakeMachine, *, rentable: bool, allocated: float, bid: bool) -> dict[str, Any]:
        gpu_price = m.bid_floor if bid else m.dph_base
        storage = _storage_per_hour(m, allocated)
        dph_total = round(gpu_price + storage, 6)
        return {
            "id": m.ask_id, "ask_contract_id": m.ask_id, "bundle_id": m.ask_id + 900_000_000, "machine_id": m.machine_id,
            "host_id": m.host_id, "gpu_name": m.gpu_name, "num_gpus": m.num_gpus, "gpu_ram": m.gpu_ram,
            "gpu_total_ram": m.gpu_ram * m.num_gpus, "gpu_arch": "nvidia", "gpu_frac": 1.0, "cpu_arch": "amd64",
            "cpu_cores": m.cpu_cores, "cpu_cores_effective": float(m.cpu_cores), "cpu_ram": m.cpu_ram,
            "disk_space": m.disk_space, "dph_base": m.dph_base, "dph_total": dph_total, "min_bid": m.bid_floor,
            "storage_cost": m.storage_cost, "storage_total_cost": round(storage, 6),
            "inet_down": m.inet_down, "inet_up": m.inet_up, "inet_down_cost": m.inet_down_cost,
            "inet_up_cost": m.inet_up_cost, "reliability": m.reliability, "reliability2": m.reliability,
            "score": round(100.0 * m.reliability / max(dph_total, 0.01), 3), "dlperf": 40.0 * m.num_gpus,
            "cuda_max_good": m.cuda_max_good, "driver_version": "570.124.04", "compute_cap": m.compute_cap,
            "geolocation": m.geolocation, "public_ipaddr": "127.0.0.1", "direct_port_count": m.direct_port_count,
            "static_ip": m.datacenter, "verification": "verified" if m.verified else "unverified",
            "verified": m.verified, "rentable": rentable, "rented": False, "is_bid": bid,
            "hosting_type": 1 if m.datacenter else 0, "datacenter": m.datacenter, "external": False,
        }

    def _search(self, req: FakeRequest) -> FakeResponse:
        try:
            body = req.json() if req.body else {}
        except (ValueError, UnicodeDecodeError):
            return json_response(400, {"error": "invalid_request", "msg": "Invalid json body"})
        if not isinstance(body, dict):
            return json_response(400, {"error": "invalid_request", "msg": "Invalid json body"})
        kind = body.get("type", "on-demand")
        if kind not in ("on-demand", "ondemand", "bid", "reserved"):
            return json_response(400, {"error": "invalid_request", "msg": f"invalid type {kind!r}"})
        try:
            allocated = float(body.get("allocated_storage", 8.0))
            limit = int(body["limit"]) if body.get("limit") is not None else None
        except (TypeError, ValueError):
            return json_response(400, {"error": "invalid_request", "msg": "allocated_storage and limit must be numbers"})
        order = body.get("order", [["score", "desc"]])
        filters = {k: v for k, v in body.items() if isinstance(v, dict)}
        for k, ops in filters.items():
            bad = [op for op in ops if op not in _OPS]
            if bad:
                return json_response(400, {"error": "invalid_request", "msg": f"{k}: unknown operator {bad[0]!r}"})
        with self.lock:
            used = self._rented()
        offers = []
        for m in self.machines.values():
            if m.ask_id in self.taken_asks:
                continue
            rentable = used.get(m.ask_id, 0) < m.slots
            offer = self._offer_json(m, rentable=rentable, allocated=allocated, bid=kind == "bid")
            if all(self._filter_ok(offer, k, ops) for k, ops in filters.items()):
                offers.append(offer)
        try:
            for key, direction in reversed([tuple(o) for o in order]):
                offers.sort(key=_by(str(key)), reverse=direction == "desc")
        except (TypeError, ValueError):
            return json_response(400, {"error": "invalid_request", "msg": "order: expected [[field, asc|desc], ...]"})
        return json_response(200, {"offers": offers[:limit] if limit is not None and limit > 0 else offers})

    @staticmethod
    def _filter_ok(offer: dict[str, Any], key: str, ops: Mapping[str, Any]) -> bool:
        if key == "geolocation":  # country codes ({"in": ["US", "CA"]}) or the whole "City, CC"
            geo = str(offer.get("geolocation") or "")
            country = geo.rsplit(",", 1)[-1].strip()
            return _match(country, ops) or _match(geo, ops)
        if key not in offer:
            return True  # a filter on a field the fake does not model
        return _match(offer[key], ops)

    def _rented(self) -> dict[int, int]:
        used: dict[int, int] = {}
        for inst in self._instances.values():
            used[inst.machine.ask_id] = used.get(inst.machine.ask_id, 0) + 1
        return used

    # ---- create

    def _parse_env(self, env: Any) -> tuple[dict[str, str], list[int], str | None]:
        """(variables, ports, error) from the spec's docker-flags string or the CLI's object."""
        out: dict[str, str] = {}
        ports: list[int] = []
        entries: list[tuple[str, str]] = []
        if env is None:
            return out, ports, None
        if isinstance(env, dict):
            entries = [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in env.items()]
        elif isinstance(env, str):
            try:
                words = shlex.split(env)
            except ValueError as exc:
                return out, ports, f"env: {exc}"
            i = 0
            while i < len(words):
                flag = words[i]
                if flag in ("-e", "-p") and i + 1 < len(words):
                    if flag == "-e":
                        key, _, value = words[i + 1].partition("=")
                        entries.append((key, value))
                    else:
                        entries.append((f"-p {words[i + 1]}", "1"))
                    i += 2
                    continue
                if flag in ("-h", "-v", "-n") and i + 1 < len(words):
                    i += 2
                    continue
                return out, ports, f"env: unexpected {flag!r} (expected -e KEY=VALUE or -p PORT:PORT)"
        else:
            return out, ports, "env: expected a string of docker flags or an object"
        total = 0
        for key, value in entries:
            entry = f"{key}={value}"
            total += len(entry)
            if len(entry) > ENV_ENTRY_MAX:
                return out, ports, f"env entry {key.split()[0]!r} is {len(entry)} characters; the limit is {ENV_ENTRY_MAX}"
            match = re.fullmatch(r"-p (\d{1,6}):(\d{1,6})(?:/tcp)?", key)
            if match:
                if match.group(1) != match.group(2):
                    return out, ports, f"env: port mapping {key!r} must map a port to itself"
                ports.append(int(match.group(2)))
            elif key.startswith("-"):
                return out, ports, f"env: unsupported flag {key!r}"
            elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                return out, ports, f"env: {key!r} is not a variable name"
            else:
                out[key] = value
        if total > ENV_TOTAL_MAX:
            return out, ports, f"env is {total} characters; the limit is {ENV_TOTAL_MAX}"
        if len(ports) > 64:
            return out, ports, "at most 64 ports"
        return out, ports, None

    def _create(self, req: FakeRequest, raw_id: str) -> FakeResponse:
        def invalid(msg: str, error: str = "invalid_args") -> FakeResponse:
            return json_response(400, {"success": False, "error": error, "msg": f"error 400/3467: Invalid args: {msg}"})

        try:
            ask_id = int(raw_id)
        except ValueError:
            return invalid("'id' is required and must be a valid offer ID")
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            return invalid("the body is not valid JSON")
        if not isinstance(body, dict):
            return invalid("the body must be a JSON object")
        if body.get("template_hash_id"):
            return invalid(f"template {body['template_hash_id']!r} not found")
        image = body.get("image")
        if not isinstance(image, str) or not image.strip() or len(image) > 1024:
            return invalid("'image' is required (a docker image of at most 1024 characters)")
        disk = body.get("disk", 8.0)
        if isinstance(disk, bool) or not isinstance(disk, int | float) or disk < 8:
            return invalid("'disk' must be a number of GB, at least 8")
        label = body.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 256):
            return invalid("'label' must be a string of at most 256 characters")
        env, ports, env_error = self._parse_env(body.get("env"))
        if env_error:
            return invalid(env_error)
        onstart = body.get("onstart")
        args = body.get("args")
        args_str = body.get("args_str")
        if onstart is not None and not isinstance(onstart, str):
            return invalid("'onstart' must be a string")
        if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
            return invalid("'args' must be a list of strings")
        if args_str is not None and not isinstance(args_str, str):
            return invalid("'args_str' must be a string")
        used = len(onstart or "") + sum(len(a) + 1 for a in args or ()) + len(args_str or "")
        if used > ONSTART_ARGS_MAX:
            return invalid(f"onstart + args are {used} characters; the limit is {ONSTART_ARGS_MAX}")
        runtype = body.get("runtype") or ("args" if args or args_str else "ssh")
        if not isinstance(runtype, str) or not set(runtype.split()) <= RUNTYPE_TOKENS or not runtype.split():
            return invalid(f"'runtype' {runtype!r} is not one of {', '.join(sorted(RUNTYPE_TOKENS))}")
        price = body.get("price")
        if price is not None and (isinstance(price, bool) or not isinstance(price, int | float)
                                  or not 0.001 <= price <= 128):
            return invalid("'price' must be 0.001-128 $/h", "invalid_price")
        target = body.get("target_state") or "running"
        if target not in ("running", "stopped"):
            return invalid("'target_state' must be running or stopped")
        # the offer
        machine = self.machines.get(ask_id)
        capacity = self.faults.take("capacity_errors")
        with self.lock:
            taken = self._rented().get(ask_id, 0) >= machine.slots if machine else True
        if machine is None or ask_id in self.taken_asks or taken or capacity is not None:
            status = int((capacity or {}).get("status", 404))
            if status == 410:
                return json_response(410, {"success": False, "error": "no_such_ask", "ask_id": ask_id,
                                           "msg": f"error 410/3907: no_such_ask Instance type {ask_id} is no longer available."})
            return json_response(404, {"success": False, "error": "invalid_args", "ask_id": ask_id,
                                       "msg": f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available."})
        if args_str and not args:
            try:
                args = shlex.split(args_str)
            except ValueError:
                return invalid("'args_str' is not a valid command line")
        low_bid = price is not None and price < machine.bid_floor
        failed = self.faults.take("fail_but_created")
        timeout = self.faults.take("create_timeout")
        stopped = target == "stopped" or low_bid or (failed is not None and failed.get("state", "stopped") == "stopped")
        scoped_key = "vik_" + secrets.token_hex(24)
        with self.lock:
            self._next_id += 1
            inst = _Instance(
                id=self._next_id, label=label, machine=machine, image=image.strip(), disk=float(disk), runtype=runtype,
                onstart=onstart, args=list(args) if args else None, env=env, port_reqs=ports,
                bid=float(price) if price is not None else None, scoped_key=scoped_key,
            )
            if stopped:
                inst.intended_status = inst.cur_state = inst.next_state = "stopped"
                inst.actual_status = "stopped" if (low_bid or failed is not None) else None
                inst.status_msg = "outbid: the bid is below the minimum" if low_bid else None
            inst.next_at = time.monotonic() + self.provision_s
            bad = self.faults.take("bad_start")
            if bad is not None:
                inst.bad_start = str(bad.get("status", "exited"))
            preempt = self.faults.take("preempt_after_running")
            if preempt is not None:
                inst.preempt_mode = str(preempt.get("mode", "stopped"))
                inst.preempt_after_s = float(preempt.get("seconds", 1.0))
            self._instances[inst.id] = inst
            self._keys[scoped_key] = inst.id
            self.ledger.machine_created(str(inst.id), label or "", inst.cost, str(inst.actual_status))
        if low_bid:
            return json_response(400, {"success": False, "error": "invalid_price", "ask_id": ask_id,
                                       "new_contract": inst.id,
                                       "msg": f"error 400/3512: invalid_price bid {price} is below the minimum "
                                              f"{machine.bid_floor} for this machine; the instance was created stopped"})
        if failed is not None:
            status = int(failed.get("status", 400))
            error = str(failed.get("error", "invalid_price"))
            return json_response(status, {"success": False, "error": error, "ask_id": ask_id, "new_contract": inst.id,
                                          "msg": "the instance could not be started as asked"})
        answer = json_response(200, {"success": True, "new_contract": inst.id, "instance_api_key": scoped_key})
        if timeout is not None:
            answer.delay_s = float(timeout.get("seconds", 30.0))
        return answer

    # ---- manage, destroy

    def _manage(self, req: FakeRequest, iid: int, *, by_instance: bool) -> FakeResponse:
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "invalid_args", "the body is not valid JSON")
        if not isinstance(body, dict) or not ({"state", "label"} & set(body)):
            return _error(400, "invalid_args", "give 'state' (stopped or running) or 'label'")
        if by_instance and "label" in body:
            return _error(403, "not_authorized", "an instance key may only stop, start or destroy its instance")
        state = body.get("state")
        if state is not None and state not in ("stopped", "running"):
            return _error(400, "invalid_args", "'state' must be stopped or running")
        label = body.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 1024):
            return _error(400, "label_too_long", "'label' must be a string of at most 1024 characters")
        to_kill: MachineProcess | None = None
        with self.lock:
            inst = self._instances.get(iid)
            if inst is None:
                return _error(404, "no_such_instance", f"Instance {iid} not found")
            if label is not None:
                inst.label = label
            if state == "stopped" and inst.intended_status != "stopped":
                to_kill = self._stop(inst, "stopped")
            elif state == "running" and inst.intended_status != "running":
                inst.intended_status = inst.cur_state = inst.next_state = "running"
                inst.actual_status, inst.status_msg = None, None
                inst.next_at = time.monotonic() + self.provision_s
            self.ledger.machine_update(str(inst.id), cost_per_hr=inst.cost, status=str(inst.actual_status))
        if to_kill is not None:
            to_kill.kill(self.kill_grace_s, wait=not by_instance)
        return json_response(200, {"success": True})

    def _destroy(self, iid: int, *, by_instance: bool) -> FakeResponse:
        with self.lock:
            inst = self._instances.get(iid)
            if inst is None:
                return _error(404, "no_such_instance", f"Instance {iid} not found")
            fault = self.faults.take("terminate_failures")
            if fault is not None:
                status = int(fault.get("status", 200))
                return _error(status, "server_error", "failed to destroy the instance; try again")
            self._remove(inst, "destroyed by its own key (CONTAINER_API_KEY)" if by_instance else "destroyed")
        self._kill(inst, wait=not by_instance)
        return json_response(200, {"success": True, "msg": f"destroying instance {iid}."})

    # ---- lists

    def _list(self, req: FakeRequest) -> FakeResponse:
        def bad(msg: str, error: str = "invalid_request") -> FakeResponse:
            return json_response(400, {"error": error, "msg": msg})

        try:
            limit = int(req.q("limit") or 25)
        except ValueError:
            return bad("limit: expected an integer")
        limit = 5 if limit <= 0 else min(limit, 25)
        try:
            filters = json.loads(req.q("select_filters") or "{}")
            order_by = json.loads(req.q("order_by") or '[{"col":"id","dir":"asc"}]')
            cols = json.loads(req.q("select_cols") or '["*"]')
        except ValueError:
            return bad("Error in query parameters: select_filters, order_by and select_cols must be JSON")
        if not isinstance(filters, dict) or not isinstance(order_by, list) or not isinstance(cols, list):
            return bad("Error in query parameters: unexpected JSON types")
        for col, ops in filters.items():
            if col not in _FILTER_COLS:
                return bad(f"Error in query parameters: {col} is not a valid search key")
            if not isinstance(ops, dict) or any(op not in _OPS for op in ops):
                return bad(f"Error in query parameters: bad operator for {col}")
        offset = 0
        token = req.q("after_token")
        if token:
            try:
                offset = int(json.loads(base64.urlsafe_b64decode(token.encode()))["offset"])
            except (ValueError, KeyError, TypeError):
                return bad("invalid after_token", "invalid_token")
        with self.lock:
            rows = [self._instance_json(i) for i in self._instances.values()]
        rows = [r for r in rows if all(_match(r.get(c), ops) for c, ops in filters.items())]
        try:
            for o in reversed([*order_by, {"col": "id", "dir": "asc"}]):
                col = o["col"]
                if col not in _FILTER_COLS:
                    return bad(f"Error in query parameters: {col} is not a valid order key")
                rows.sort(key=_by(str(col)), reverse=o.get("dir") == "desc")
        except (KeyError, TypeError, AttributeError):
            return bad("Error in query parameters: order_by must be [{\"col\": ..., \"dir\": ...}]")
        labels: dict[str, int] = {}
        for r in rows:
            labels[r.get("label") or ""] = labels.get(r.get("label") or "", 0) + 1
        page = rows[offset:offset + limit]
        more = offset + limit < len(rows)
        next_token = (base64.urlsafe_b64encode(json.dumps({"offset": offset + limit}).encode()).decode()
                      if more else None)
        if cols != ["*"]:
            page = [{c: r.get(c) for c in cols} for r in page]
        return json_response(200, {"success": True, "instances_found": len(page), "total_instances": len(rows),
                                   "label_counts": labels, "next_token": next_token, "instances": page})

    def _filters(self) -> FakeResponse:
        with self.lock:
            insts = list(self._instances.values())
        return json_response(200, {"success": True, "filters": [
            {"col": "actual_status", "values": sorted({str(i.actual_status) for i in insts})},
            {"col": "gpu_name", "values": sorted({i.machine.gpu_name for i in insts})},
            {"col": "label", "values": sorted({i.label or "" for i in insts})},
        ]})

    # ---- time-driven state

    def tick(self) -> None:
        now = time.monotonic()
        to_kill: list[MachineProcess] = []
        with self.lock:
            for inst in list(self._instances.values()):
                if inst.intended_status != "running":
                    continue
                if inst.actual_status is None and now >= inst.next_at:
                    inst.actual_status, inst.status_msg = "loading", f"Pulling image {inst.image}"
                    inst.next_at = now + self.start_s
                elif inst.actual_status == "loading" and now >= inst.next_at:
                    if inst.bad_start is not None:
                        if inst.bad_start == "oci":
                            inst.actual_status, inst.status_msg = "created", OCI_MSG
                        else:
                            inst.actual_status = inst.bad_start
                            inst.status_msg = {"exited": "Exited (1)", "unknown": "no heartbeat from the host",
                                               "offline": "the host is offline"}[inst.bad_start]
                    else:
                        self._start(inst, now)
                elif inst.actual_status == "running" and inst.process is not None:
                    code = inst.process.poll()
                    if code is not None:
                        inst.exit_codes.append(code)
                        inst.process = None
                        if inst.main_is_args:  # the container's main process ended: the container ends
                            self._release_ports(inst)
                            if self.on_exit == "restart":
                                inst.actual_status, inst.status_msg = "loading", f"Exited ({code}); restarting"
                                inst.next_at = now + self.restart_delay_s
                            else:
                                inst.actual_status, inst.status_msg = "exited", f"Exited ({code})"
                        # ssh/jupyter runtypes: onstart ended; Vast's init (sshd) keeps the container up
                if inst.preempt_at is not None and now >= inst.preempt_at:
                    inst.preempt_at = None
                    proc = self._preempt(inst, inst.preempt_mode)
                    if proc is not None:
                        to_kill.append(proc)
                if inst.id in self._instances:
                    self.ledger.machine_update(str(inst.id), cost_per_hr=inst.cost, status=str(inst.actual_status))
        for proc in to_kill:
            proc.kill(self.kill_grace_s, wait=False)

    def _start(self, inst: _Instance, now: float) -> None:
        self._assign_ports(inst)
        self._spawn(inst)
        inst.actual_status = "running"
        inst.status_msg = f"success, running {inst.image}/{inst.runtype.split()[0]}"
        inst.running_since = now
        inst.ports_visible_at = now + self.ports_delay_s
        if inst.preempt_after_s is not None:
            inst.preempt_at, inst.preempt_after_s = now + inst.preempt_after_s, None

    def _preempt(self, inst: _Instance, mode: str) -> MachineProcess | None:
        """Take the instance away (call with the lock held); the process to kill."""
        if mode == "vanish":
            proc, inst.process = inst.process, None
            self._remove(inst, "preempted (gone)")
            return proc
        proc = self._stop(inst, mode)
        self.ledger.machine_update(str(inst.id), cost_per_hr=inst.cost, status=str(inst.actual_status))
        return proc

    def _stop(self, inst: _Instance, mode: str) -> MachineProcess | None:
        """Stop (mode ``stopped``) or lose (``exited``/``unknown``/``offline``) the container; lock held."""
        proc, inst.process = inst.process, None
        self._release_ports(inst)
        inst.running_since = None
        if mode == "stopped":
            inst.intended_status = inst.cur_state = inst.next_state = "stopped"
            inst.actual_status, inst.status_msg = "stopped", "stopped"
        else:
            inst.actual_status = mode
            inst.status_msg = {"exited": "Exited (137)", "unknown": "no heartbeat from the host",
                               "offline": "the host is offline"}[mode]
        return proc

    def shutdown_machines(self) -> None:
        with self.lock:
            insts = list(self._instances.values())
        for inst in insts:
            if inst.process is not None:
                inst.process.kill(self.kill_grace_s, wait=True)
            for fwd in inst.forwards:
                fwd.close()

    def extra_state(self) -> dict[str, Any]:
        with self.lock:
            out = []
            for i in self._instances.values():
                proc = i.process
                out.append({
                    "id": i.id, "label": i.label, "actual_status": i.actual_status, "intended_status": i.intended_status,
                    "ask_id": i.machine.ask_id, "cost": i.cost, "runtype": i.runtype,
                    "pid": proc.pid if proc else None, "alive": proc is not None and proc.poll() is None,
                    "exit_codes": list(i.exit_codes), "tcp_ports": {str(k): v for k, v in i.port_map.items()},
                })
        return {"instances": out, "taken_asks": sorted(self.taken_asks)}

    # ---- internals (call with the lock held unless said otherwise)

    def _remove(self, inst: _Instance, reason: str) -> None:
        self._instances.pop(inst.id, None)
        self._release_ports(inst)
        self.ledger.machine_gone(str(inst.id), reason)

    def _kill(self, inst: _Instance, *, wait: bool) -> None:
        """Kill the instance's processes (without the lock) and drop its directory."""
        proc, inst.process = inst.process, None
        if proc is not None:
            proc.kill(self.kill_grace_s, wait=wait)
        if not self.keep_dirs and wait:
            shutil.rmtree(self.instance_dir(inst.id), ignore_errors=True)

    def _assign_ports(self, inst: _Instance) -> None:
        self._release_ports(inst)
        wanted = list(inst.port_reqs)
        if inst.runtype.split()[0].startswith("ssh"):
            wanted.append(22)
        for p in dict.fromkeys(wanted):
            public = free_port()
            inst.port_map[p] = public
            if p <= 65535 and p != 22:
                try:
                    inst.forwards.append(_Forward(public, p))
                except OSError:  # the port went meanwhile: the mapping stays listed, unusable (a host's bad luck)
                    pass

    def _release_ports(self, inst: _Instance) -> None:
        for fwd in inst.forwards:
            fwd.close()
        inst.forwards = []
        inst.port_map = {}
        inst.ports_visible_at = None

    def _spawn(self, inst: _Instance) -> None:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_KEYS} if self.inherit_env else {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
        inst_dir = self.instance_dir(inst.id)
        env["HOME"] = str(inst_dir)
        env.update(self.extra_env)  # what the "image" brings (e.g. a PATH whose python3 is a venv's)
        env.update(inst.env)
        env.update({
            "CONTAINER_ID": str(inst.id), "CONTAINER_API_KEY": inst.scoped_key, "VAST_CONTAINERLABEL": f"C.{inst.id}",
            "PUBLIC_IPADDR": "127.0.0.1",
        })
        for private, public in inst.port_map.items():
            env[f"VAST_TCP_PORT_{private}"] = str(public)
        if inst.main_is_args:
            argv = list(inst.args) if inst.args else list(self.default_cmd)
        elif inst.onstart and inst.onstart.strip():
            argv = ["/bin/sh", "-c", inst.onstart]
        else:
            argv = list(self.default_cmd)
        proc = MachineProcess(argv, cwd=inst_dir, env=env, log_path=self.work_dir / f"{inst.id}.log")
        proc.start()
        inst.process = proc

    def _instance_json(self, inst: _Instance) -> dict[str, Any]:
        now = time.monotonic()
        m = inst.machine
        running = inst.actual_status == "running"
        uptime = (now - inst.running_since) / 60.0 if inst.running_since is not None else None
        out: dict[str, Any] = {
            "id": inst.id, "actual_status": inst.actual_status, "intended_status": inst.intended_status,
            "cur_state": inst.cur_state, "next_state": inst.next_state, "label": inst.label, "template_id": None,
            "template_hash_id": None, "template_name": None, "image_uuid": inst.image, "image_args": list(inst.args or []),
            "image_runtype": inst.runtype,
            "extra_env": [[k, v] for k, v in inst.env.items()] + [[f"-p {p}:{p}", "1"] for p in inst.port_reqs],
            "onstart": inst.onstart or "", "jupyter_token": inst.jupyter_token, "status_msg": inst.status_msg,
            "public_ipaddr": "127.0.0.1", "local_ipaddrs": "127.0.0.1 172.17.0.2 ", "ssh_host": "127.0.0.1",
            "ssh_idx": "1", "ssh_port": inst.ssh_port, "machine_dir_ssh_port": inst.ssh_port + 1,
            "machine_id": m.machine_id, "host_id": m.host_id, "bundle_id": m.ask_id + 900_000_000,
            "start_date": inst.created_wall, "end_date": inst.created_wall + 30 * 86400.0,
            "duration": time.time() - inst.created_wall, "uptime_mins": uptime,
            "gpu_name": m.gpu_name, "gpu_arch": "nvidia", "num_gpus": m.num_gpus, "gpu_ram": m.gpu_ram,
            "gpu_totalram": m.gpu_ram * m.num_gpus, "gpu_util": 0.0 if running else None, "gpu_frac": 1.0,
            "cpu_arch": "amd64", "cpu_cores": m.cpu_cores, "cpu_cores_effective": float(m.cpu_cores),
            "cpu_ram": m.cpu_ram, "disk_space": inst.disk, "disk_util": 0.01, "disk_usage": 0.1,
            "direct_port_count": m.direct_port_count, "direct_port_start": 40000, "direct_port_end": 40099,
            "static_ip": m.datacenter, "geolocation": m.geolocation, "verification": "verified" if m.verified else "unverified",
            "rentable": True, "hosting_type": 1 if m.datacenter else 0, "min_bid": m.bid_floor,
            "is_bid": inst.bid is not None, "dph_base": inst.gpu_price, "dph_total": inst.dph_total,
            "storage_cost": m.storage_cost, "storage_total_cost": round(inst.storage_hr, 6),
            "dlperf": 40.0 * m.num_gpus, "score": 1.0, "reliability2": m.reliability, "cuda_max_good": m.cuda_max_good,
            "os_version": "22.04", "external": False, "volume_info": [],
            "search": {"gpuCostPerHour": inst.gpu_price, "diskHour": round(inst.storage_hr, 6),
                       "totalHour": inst.dph_total, "discountTotalHour": 0, "discountedTotalPerHour": inst.dph_total},
            "instance": {"gpuCostPerHour": inst.gpu_price if running else 0, "diskHour": round(inst.storage_hr, 6),
                         "totalHour": inst.cost, "discountTotalHour": 0, "discountedTotalPerHour": inst.cost},
        }
        if running and inst.ports_visible_at is not None and now >= inst.ports_visible_at and inst.port_map:
            ports: dict[str, list[dict[str, str]]] = {}
            for private, public in inst.port_map.items():
                key = f"{public}/tcp" if private > 65535 else f"{private}/tcp"  # identical numbers above 65535
                ports[key] = [{"HostIp": "0.0.0.0", "HostPort": str(public)}]
            out["ports"] = ports
        return out
