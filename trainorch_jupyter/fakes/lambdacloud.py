"""A fake Lambda Cloud API v1 (``https://cloud.lambda.ai/api/v1/...``) that follows Lambda's OpenAPI spec (1.8.3).

What it serves (shapes, status codes and error envelopes as the spec has them):

- ``GET /api/v1/instance-types``, ``GET /api/v1/instances``, ``GET/POST /api/v1/instances/{id}``,
  ``POST /api/v1/instance-operations/launch|terminate|restart``, ``GET/POST /api/v1/ssh-keys``,
  ``DELETE /api/v1/ssh-keys/{id}``, ``GET/PUT /api/v1/firewall-rules`` (a PUT is counted in the state:
  ``firewall_changes``; Lambda's rules are account-wide).
- Auth: ``Authorization: Bearer <key>``, ``Basic base64(<key>:)`` or ``Basic <key>``; else 401
  ``global/invalid-api-key``. ``api_keys=None`` accepts any key (a dry run without an account).
- Envelopes: ``{"data": ...}``; errors ``{"error": {"code", "message", "suggestion"}}`` with the spec's codes
  (``instance-operations/launch/insufficient-capacity``, ``global/invalid-parameters``, ``global/quota-exceeded``,
  ``global/object-does-not-exist``, ``global/internal-error``...).
- Rate limits, per account: about 1 request/s (a token bucket of ``request_burst`` refilled at ``request_rate``
  per second, which absorbs network jitter) and one launch per ``launch_interval_s`` (12 s, ``launch_slack_s`` of
  jitter allowed). Over a limit: **429 with Cloudflare's plain-text body** ``error code: 1015`` and no
  ``Retry-After`` (what Lambda documents), counted in ``rate_limit_violations``.
- Statuses: ``booting`` (no ``ip``) for ``boot_s``, then ``active`` with ``ip`` ``127.0.0.1``; terminate answers the
  instances with ``terminating``, and ``terminate_s`` later the instance is gone (404, absent from the list). Launch
  takes exactly one SSH key name that exists, one instance (``quantity`` > 1 is ``global/invalid-parameters``
  "Requested too many instances"), and a region listed with capacity for the type (else 400 insufficient-capacity).

The machine: when an instance becomes ``active`` its ``user_data`` runs for real if it is a script (``#!...``; a
``#cloud-config`` document is stored but not run), in ``<work_dir>/<instance id>/`` standing in for the VM, in its
own process group, with a clean environment: ``PATH`` (a directory of the fake's commands first, then the host's or
``extra_env``'s), ``HOME`` (that directory), ``LANG``, ``extra_env`` (what the image brings),
``TRAINORCH_RUNNER_PORT`` (:data:`RUNNER_PORT_ENV`: a free local port that stands for the machine's port 8765) and
``TRAINORCH_FAKE_VM`` (the instance id: a halt, a terminate or a preemption kills every process that carries it, in any
session, as a VM's end would; the script itself may return at once, leaving its work in the background).
Lambda's VMs are reached on port 22 only (the default firewall), so each active instance also gets an **SSH server**
(asyncssh) on a free loopback port standing for its port 22: it accepts user ``ubuntu`` with the public key registered
under the launch's SSH key name, opens no shell, and allows direct-tcpip forwarding to ``127.0.0.1:8765`` (or
``localhost``), mapped to the stage-0's real port; anything else is refused. The fake tells its SSH port at
``GET /_fake/ssh-port/{instance id}`` (a client reaches it because the instance's ``ip`` is loopback).

The fake's commands on the machine's ``PATH``: ``sudo`` (runs its command; the fake VM has one user) and
``shutdown`` (any arguments), which halts the VM through ``POST /_fake/instances/{id}/shutdown``. Lambda has no stop:
a halted VM is still an instance and still bills until it is terminated through the API, so by default
(``shutdown="halt"``) the machine's processes are killed, its SSH server stops and it reads ``unhealthy`` (what
Lambda shows for a VM that halted itself is not documented) **and keeps billing**; ``shutdown="terminate"`` makes a
shutdown terminate the instance instead (a rehearsal of the optimistic case).

Faults (constructor ``faults={...}``, :meth:`LambdaFake.inject`, or ``POST /_fake/faults``):

==============================  =====================================================================
``capacity_errors: N``          the next N launches answer 400 insufficient-capacity
``quota_errors: N``             the next N launches answer 400 ``global/quota-exceeded``
``unavailable_types: [name]``   those instance types have no region with capacity (listing and launch)
``fail_but_created: N``         the next N launches make the instance (it bills) but answer 500
``create_timeout: {count, seconds}``  the next launches make the instance and answer only after ``seconds``
``terminate_failures: N``       the next N terminates answer 500; the instance stays
``server_errors: {count, method?, path?, status?}``  the next requests (of that method, whose path ends with
                                ``path``) answer 503 ``provider/internal-unavailable``
``drop_connections: {count, method?, path?}``  the next requests are closed without an answer
``rate_limit_burst: N``         the next N requests answer 429 (``error code: 1015``)
``preempt: id | {instance_id, mode?}``  that instance is preempted now
``preempt_after_active: {count, seconds, mode?}``  the next instances are preempted ``seconds`` after ``active``
``ssh_drop: id``                the SSH connections of that instance are cut now (its server stays)
``clear: true``                 disarm everything
==============================  =====================================================================

Preemption ``mode``: ``vanish`` (default: the instance is gone at once, it no longer bills), ``preempted`` (status
``preempted``, no longer bills, gone ``terminate_s`` later), ``unhealthy`` (its processes die, status ``unhealthy``,
it still bills).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Collection, Iterable, Mapping
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
    RateWindow,
    SpecValidator,
    free_port,
    json_response,
)

__all__ = ["DEFAULT_INSTANCE_TYPES", "RUNNER_PORT_ENV", "InstanceTypeOffer", "LambdaFake", "TokenBucket"]

API = "/api/v1"
#: the variable the machine's stage-0 reads its port from (the provider asks for it; see the module doc)
RUNNER_PORT_ENV = "TRAINORCH_RUNNER_PORT"
#: in the environment of every process of a fake VM (its id): what a halt or a terminate kills
VM_ENV = "TRAINORCH_FAKE_VM"
RUNNER_PORT = 8765  # the machine-side port the SSH server forwards (where the stage-0 listens on a real VM)
SSH_USER = "ubuntu"
RATE_LIMITED_BODY = b"error code: 1015"
#: the spec's ``PublicRegionCode`` values, with a description each
REGION_NAMES = {
    "us-east-1": "Virginia, USA", "us-west-1": "California, USA", "us-west-2": "Arizona, USA",
    "us-west-3": "Utah, USA", "us-south-1": "Texas, USA", "us-midwest-1": "Illinois, USA",
    "europe-central-1": "Germany", "asia-northeast-1": "Tokyo, Japan", "asia-south-1": "India",
    "australia-east-1": "Australia", "me-west-1": "Israel", "asia-northeast-2": "Osaka, Japan",
    "us-east-2": "Washington DC, USA", "us-east-3": "Pennsylvania, USA", "us-south-2": "North Texas, USA",
    "us-south-3": "Central Texas, USA", "us-midwest-2": "Ohio, USA",
}
_TAG_KEY = re.compile(r"^[a-z][a-z0-9-:]+$")
_HOSTNAME = re.compile(r"^[a-z0-9][0-9a-z-]{0,62}$")
_PUBKEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( .*)?$")
_LAUNCH_KEYS = {"region_name", "instance_type_name", "ssh_key_names", "file_system_names", "file_system_mounts",
                "hostname", "name", "image", "user_data", "tags", "firewall_rulesets", "quantity"}
_DEFAULT_FIREWALL = [{"protocol": "tcp", "port_range": [22, 22], "source_network": "0.0.0.0/0",
                      "description": "Allow SSH from anywhere"}]


@dataclass(frozen=True)
class InstanceTypeOffer:
    """One instance type of the fake's catalog (prices are illustrative, US cents per hour for the machine)."""

    name: str
    description: str
    gpu_description: str
    price_cents_per_hour: int
    gpus: int
    vcpus: int
    memory_gib: int
    storage_gib: int
    regions: tuple[str, ...] = ("us-east-1", "us-west-1")

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "gpu_description": self.gpu_description,
                "price_cents_per_hour": self.price_cents_per_hour,
                "specs": {"vcpus": self.vcpus, "memory_gib": self.memory_gib, "storage_gib": self.storage_gib,
                          "gpus": self.gpus}}


DEFAULT_INSTANCE_TYPES: tuple[InstanceTypeOffer, ...] = (
    InstanceTypeOffer("gpu_1x_rtx6000", "1x RTX 6000 (24 GB)", "RTX 6000 (24 GB)", 50, 1, 14, 46, 512, ("us-south-1",)),
    InstanceTypeOffer("gpu_1x_a10", "1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)", 75, 1, 30, 200, 1400,
                      ("us-east-1", "us-west-1")),
    InstanceTypeOffer("gpu_1x_a6000", "1x A6000 (48 GB)", "A6000 (48 GB)", 80, 1, 14, 100, 512, ("us-west-1",)),
    InstanceTypeOffer("gpu_1x_a100_sxm4", "1x A100 (40 GB SXM4)", "A100 (40 GB SXM4)", 129, 1, 30, 200, 512,
                      ("us-east-1",)),
    InstanceTypeOffer("gpu_1x_gh200", "1x GH200 (96 GB)", "GH200 (96 GB)", 149, 1, 64, 432, 4096, ()),
    InstanceTypeOffer("gpu_1x_h100_pcie", "1x H100 (80 GB PCIe)", "H100 (80 GB PCIe)", 249, 1, 26, 200, 1024,
                      ("us-west-3",)),
    InstanceTypeOffer("gpu_2x_a6000", "2x A6000 (48 GB)", "A6000 (48 GB)", 160, 2, 28, 200, 1024, ("us-west-1",)),
    InstanceTypeOffer("gpu_8x_a100_80gb_sxm4", "8x A100 (80 GB SXM4)", "A100 (80 GB SXM4)", 1432, 8, 240, 1800, 20480,
                      ("us-east-1",)),
    InstanceTypeOffer("gpu_8x_h100_sxm5", "8x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 2392, 8, 208, 1800, 24780,
                      ("us-west-3", "us-south-1")),
)


class TokenBucket:
    """``burst`` tokens refilled at ``rate`` per second; a request takes one. ``slack_s`` lets a request through
    that is up to that early (network jitter between a client that paces itself and the server's clock)."""

    def __init__(self, rate: float, burst: float = 1.0, slack_s: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self.slack = slack_s * rate
        self._tokens = burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0 - self.slack:
                return False
            self._tokens -= 1.0
            return True


def _err(status: int, code: str, message: str, suggestion: str | None = None,
         headers: Mapping[str, str] | None = None) -> FakeResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if suggestion is not None:
        error["suggestion"] = suggestion
    return json_response(status, {"error": error}, headers=headers)


def _ok(data: Any) -> FakeResponse:
    return json_response(200, {"data": data})


def _invalid(message: str) -> FakeResponse:
    return _err(400, "global/invalid-parameters", message, "Check the request body against the API documentation.")


def _not_found(what: str) -> FakeResponse:
    return _err(404, "global/object-does-not-exist", f"Specified {what} does not exist.",
                f"Check the {what}'s name or ID and try again.")


# --------------------------------------------------------------------------------------------
# The SSH side: one asyncio loop in a thread serves every instance's SSH server
# --------------------------------------------------------------------------------------------


@dataclass
class _SSHServerState:
    authorized: set[str]  # "type base64" of each accepted public key
    forward: dict[int, int]  # machine port -> real local port
    conns: set[Any] = field(default_factory=set)
    accepted: int = 0  # connections authenticated so far
    forwards: int = 0  # forwarded TCP connections opened


def _server_class() -> type:
    import asyncssh

    class FakeInstanceSSH(asyncssh.SSHServer):
        def __init__(self, state: _SSHServerState) -> None:
            self.state = state
            self.conn: Any = None

        def connection_made(self, conn: Any) -> None:
            self.conn = conn
            self.state.conns.add(conn)

        def connection_lost(self, exc: Exception | None) -> None:
            self.state.conns.discard(self.conn)

        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return False

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: Any) -> bool:
            body = " ".join(key.export_public_key().decode("ascii").split()[:2])
            return username == SSH_USER and body in self.state.authorized

        def auth_completed(self) -> None:
            self.state.accepted += 1

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
            real = self.state.forward.get(dest_port)
            if dest_host not in ("127.0.0.1", "localhost") or real is None:
                return False
            self.state.forwards += 1
            return self.conn.forward_connection("127.0.0.1", real)

        def server_requested(self, listen_host: str, listen_port: int) -> bool:
            return False

    return FakeInstanceSSH


class _SSHHub:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-lambda-ssh", daemon=True)
        self._thread.start()
        self._servers: dict[str, tuple[Any, _SSHServerState]] = {}
        self._cls = _server_class()

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, iid: str, host_key: Any, state: _SSHServerState) -> int:
        import asyncssh

        async def go() -> int:
            acceptor = await asyncssh.create_server(lambda: self._cls(state), "127.0.0.1", 0,
                                                    server_host_keys=[host_key], allow_scp=False,
                                                    keepalive_interval=0, login_timeout=30)
            self._servers[iid] = (acceptor, state)
            return int(acceptor.sockets[0].getsockname()[1])

        return int(self.call(go()))

    def drop(self, iid: str) -> int:
        """Cut the instance's SSH connections (its server stays); how many were cut."""
        async def go() -> int:
            entry = self._servers.get(iid)
            if entry is None:
                return 0
            conns = list(entry[1].conns)
            for c in conns:
                c.abort()
            return len(conns)

        return int(self.call(go()))

    def stop(self, iid: str) -> None:
        async def go() -> None:
            entry = self._servers.pop(iid, None)
            if entry is None:
                return
            acceptor, state = entry
            for c in list(state.conns):
                c.abort()
            acceptor.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(acceptor.wait_closed(), 5)

        with contextlib.suppress(Exception):
            self.call(go())

    def state(self, iid: str) -> _SSHServerState | None:
        entry = self._servers.get(iid)
        return entry[1] if entry else None

    def close(self) -> None:
        for iid in list(self._servers):
            self.stop(iid)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.loop.close()


# --------------------------------------------------------------------------------------------
# An instance
# --------------------------------------------------------------------------------------------


@dataclass
class _Instance:
    id: str
    name: str | None
    itype: InstanceTypeOffer
    region: str
    ssh_key_names: list[str]
    authorized: set[str]
    user_data: str | None
    tags: list[dict[str, str]]
    hostname: str | None
    image: dict[str, str] | None
    host_key: Any
    shutdown_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    jupyter_token: str = field(default_factory=lambda: secrets.token_hex(16))
    status: str = "booting"
    ip: str | None = None
    active_at: float = 0.0  # monotonic time of the move to active
    ssh_at: float | None = None  # monotonic time the SSH server comes up
    gone_at: float | None = None  # monotonic time it disappears (terminating, preempted)
    runner_port: int = 0
    ssh_port: int | None = None
    process: MachineProcess | None = None
    exit_codes: list[int] = field(default_factory=list)
    preempt_after_s: float | None = None
    preempt_at: float | None = None
    preempt_mode: str = "vanish"
    halted: bool = False
    billing: bool = True
    user_data_ran: bool = False
    script_done: bool = False  # the user_data script returned; what it started in the background still runs

    @property
    def cost(self) -> float:
        return round(self.itype.price_cents_per_hour / 100.0, 4) if self.billing else 0.0


class LambdaFake(FakeServer):
    """The fake Lambda Cloud API v1. See the module docstring for what it does.

    ``LambdaFake(api_keys={"k"}, boot_s=0.1).start()`` then ``fake.base_url``; ``fake.stop()`` kills every
    instance's processes and SSH servers. Python helpers: :meth:`inject` (faults), :meth:`preempt`,
    :meth:`instance_ids`, :meth:`instance_process`, :meth:`drop_ssh`, :meth:`change_host_key`, :meth:`ssh_state`.
    """

    provider = "lambda"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Collection[str] | None = None,
        boot_s: float = 1.0,
        ssh_delay_s: float = 0.0,
        terminate_s: float = 0.5,
        rate_limit: bool = True,
        request_rate: float = 1.0,
        request_burst: float = 2.0,
        launch_interval_s: float = 12.0,
        launch_slack_s: float = 0.5,
        instance_types: Iterable[InstanceTypeOffer] = DEFAULT_INSTANCE_TYPES,
        shutdown: str = "halt",
        kill_grace_s: float = 1.0,
        inherit_env: bool = False,
        extra_env: Mapping[str, str] | None = None,
        faults: Mapping[str, Any] | None = None,
        validator: SpecValidator | None = None,
        work_dir: str | Path | None = None,
        keep_instance_dirs: bool = False,
        tick_s: float = 0.05,
        rate_limits: Iterable[RateWindow] | None = None,
        provision_s: float | None = None,
        start_s: float | None = None,
        on_exit: str | None = None,
    ) -> None:
        """``rate_limits``, ``provision_s``, ``start_s`` and ``on_exit`` are the shared command line's options
        (``python -m trainorch_jupyter.fakes``): an empty ``rate_limits`` turns the limits off, a window named
        ``launch`` sets the launch bucket and any other the request bucket (``quota`` per ``seconds``, a burst of
        ``quota``); ``provision_s`` is the boot time, ``start_s`` the SSH server's delay after ``active``;
        ``on_exit`` is ignored (a VM does not run its user_data again when the script ends)."""
        if shutdown not in ("halt", "terminate"):
            raise ValueError("shutdown must be 'halt' or 'terminate'")
        super().__init__(host=host, port=port, rate_limits=(), validator=validator, work_dir=work_dir, tick_s=tick_s)
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.boot_s = boot_s if provision_s is None else provision_s
        self.ssh_delay_s = ssh_delay_s if start_s is None else start_s
        self.terminate_s = terminate_s
        self.rate_limit = rate_limit
        self.requests_bucket = TokenBucket(request_rate, request_burst, 0.0)
        self.launch_bucket = TokenBucket(1.0 / launch_interval_s if launch_interval_s > 0 else 1e9, 1.0, launch_slack_s)
        if rate_limits is not None:
            windows = list(rate_limits)
            self.rate_limit = rate_limit and bool(windows)
            for w in windows:
                bucket = TokenBucket(w.quota / w.seconds, float(w.quota), launch_slack_s if w.name == "launch" else 0.0)
                if w.name == "launch":
                    self.launch_bucket = bucket
                else:
                    self.requests_bucket = bucket
        self.catalog = {t.name: t for t in instance_types}
        self.shutdown_mode = shutdown
        self.kill_grace_s = kill_grace_s
        self.inherit_env = inherit_env
        self.extra_env = dict(extra_env or {})
        self.keep_instance_dirs = keep_instance_dirs
        self.unavailable_types: set[str] = set()
        self.firewall: list[dict[str, Any]] = [dict(r) for r in _DEFAULT_FIREWALL]
        self.firewall_changes = 0
        self._instances: dict[str, _Instance] = {}
        self._keys: dict[str, dict[str, str]] = {}  # id -> {id, name, public_key}
        self._hub: _SSHHub | None = None
        if faults:
            self.apply_faults(dict(faults))

    # ---- lifecycle

    def start(self) -> LambdaFake:
        if self._hub is None:
            self._hub = _SSHHub()
        super().start()
        return self

    def shutdown_machines(self) -> None:
        with self.lock:
            procs = [(i.id, i.process) for i in self._instances.values() if i.process is not None]
        for iid, proc in procs:
            self._kill_vm(iid, proc, wait=True)
        if self._hub is not None:
            self._hub.close()
            self._hub = None

    # ---- Python helpers for tests

    def inject(self, **faults: Any) -> None:
        """Arm faults (same names as ``POST /_fake/faults``)."""
        self.apply_faults(faults)

    def instance_ids(self) -> list[str]:
        with self.lock:
            return list(self._instances)

    def instance_process(self, iid: str) -> MachineProcess | None:
        with self.lock:
            inst = self._instances.get(iid)
            return inst.process if inst else None

    def instance_dir(self, iid: str) -> Path:
        return self.work_dir / iid

    def ssh_key_names(self) -> list[str]:
        with self.lock:
            return sorted(k["name"] for k in self._keys.values())

    def ssh_state(self, iid: str) -> dict[str, int] | None:
        """The instance's SSH server: its port, open connections, authenticated logins, forwarded connections."""
        state = self._hub.state(iid) if self._hub else None
        with self.lock:
            inst = self._instances.get(iid)
            port = inst.ssh_port if inst else None
        if state is None or port is None:
            return None
        return {"port": port, "connections": len(state.conns), "logins": state.accepted, "forwards": state.forwards}

    def vm_pids(self, iid: str | None = None) -> list[int]:
        """Live processes of VM ``iid`` (default: of every VM this fake made), found by their mark."""
        ids = [iid] if iid is not None else [m["id"] for m in self.ledger.machines()]
        return sorted(pid for i in ids for pid in _marked_pids(i))

    def drop_ssh(self, iid: str) -> int:
        """Cut every SSH connection to the instance now (a network blip); how many were cut."""
        return self._hub.drop(iid) if self._hub else 0

    def change_host_key(self, iid: str) -> None:
        """The instance presents another SSH host key from now on (a rebuilt host, or a man in the middle)."""
        import asyncssh

        with self.lock:
            inst = self._instances.get(iid)
            if inst is None:
                raise KeyError(iid)
            inst.host_key = asyncssh.generate_private_key("ssh-ed25519")
            running = inst.ssh_port is not None
        if running:
            self._stop_ssh(iid)
            self._start_ssh(iid)

    def preempt(self, iid: str, mode: str = "vanish") -> bool:
        """Lambda takes the instance away now; False when there is no such instance."""
        if mode not in ("vanish", "preempted", "unhealthy"):
            raise ValueError("mode must be 'vanish', 'preempted' or 'unhealthy'")
        with self.lock:
            inst = self._instances.get(iid)
            if inst is None:
                return False
            self._take_away(inst, mode)
        self._stop_ssh(iid)
        return True

    # ---- faults

    def apply_faults(self, body: dict[str, Any]) -> None:
        body = dict(body)
        if body.pop("clear", False):
            self.faults.clear()
            self.unavailable_types.clear()
        if "unavailable_types" in body:
            names = body.pop("unavailable_types")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("unavailable_types: expected a list of instance type names")
            self.unavailable_types = set(names)
        if "preempt" in body:
            target = body.pop("preempt")
            iid, mode = ((target, "vanish") if isinstance(target, str)
                         else (target["instance_id"], target.get("mode", "vanish")))
            if not self.preempt(iid, mode):
                raise ValueError(f"preempt: no instance {iid!r}")
        if "ssh_drop" in body:
            self.drop_ssh(str(body.pop("ssh_drop")))
        known = {"capacity_errors", "quota_errors", "fail_but_created", "create_timeout", "terminate_failures",
                 "server_errors", "drop_connections", "rate_limit_burst", "preempt_after_active"}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: "
                             f"{sorted(known | {'unavailable_types', 'preempt', 'ssh_drop', 'clear'})}")
        super().apply_faults(body)

    # ---- dispatch

    def _account_key(self, req: FakeRequest) -> tuple[str, str] | None:
        """(how, key) of the request's credential: Bearer, Basic base64("key:") or Basic key."""
        value = req.headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if not token:
            return None
        if scheme.lower() == "bearer":
            return "bearer", token
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(token, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return "basic", token
            return "basic", decoded[:-1] if decoded.endswith(":") else decoded.partition(":")[0] or token
        return None

    def who(self, req: FakeRequest) -> str:
        cred = self._account_key(req)
        return cred[0] if cred else "none"

    def _internal(self, req: FakeRequest) -> FakeResponse:
        parts = [unquote(p) for p in req.path.split("/")[1:]]
        if len(parts) == 3 and parts[:2] == ["_fake", "ssh-port"] and req.method == "GET":
            with self.lock:
                inst = self._instances.get(parts[2])
                port = inst.ssh_port if inst else None
            if port is None:
                return json_response(404, {"error": f"no SSH server for instance {parts[2]!r} (yet)"})
            return json_response(200, {"port": port})
        if len(parts) == 4 and parts[:2] == ["_fake", "instances"] and parts[3] == "shutdown" and req.method == "POST":
            return self._shutdown(parts[2], req.headers.get("X-Fake-Token") or "")
        return super()._internal(req)

    def route(self, req: FakeRequest) -> FakeResponse:
        # 1. auth (before any limit: an unauthenticated call is no account's)
        cred = self._account_key(req)
        if cred is None or (self.api_keys is not None and cred[1] not in self.api_keys):
            return _err(401, "global/invalid-api-key", "API key was invalid, expired, or deleted.",
                        "Check your API key or create a new one, then try again.")
        # 2. rate limits: the account's (one account, whichever of its keys)
        is_launch = req.path.rstrip("/") == API + "/instance-operations/launch" and req.method == "POST"
        if self.rate_limit:
            window = "" if self.requests_bucket.take() else "request"
            if not window and is_launch and not self.launch_bucket.take():
                window = "launch"
            if window:
                self.ledger.record_rate_limit_violation(req.method, req.path, window, 0)
                return FakeResponse(429, RATE_LIMITED_BODY, "text/plain; charset=UTF-8")
        # 3. injected transport and server faults
        if self.faults.take("rate_limit_burst") is not None:
            return FakeResponse(429, RATE_LIMITED_BODY, "text/plain; charset=UTF-8")

        def same_method(p: dict[str, Any]) -> bool:
            return (str(p.get("method", req.method)).upper() == req.method
                    and req.path.rstrip("/").endswith(str(p.get("path", "")).rstrip("/")))

        if self.faults.take("drop_connections", same_method) is not None:
            return FakeResponse(0, drop=True)
        fault = self.faults.take("server_errors", same_method)
        if fault is not None:
            return _err(int(fault.get("status", 503)), "provider/internal-unavailable",
                        "Upstream provider is temporarily unavailable.", "Try again shortly.")
        # 4. the paths
        if not req.path.startswith(API + "/"):
            return _not_found("resource")
        parts = [unquote(p) for p in req.path[len(API) + 1:].rstrip("/").split("/")]
        m = req.method
        if parts == ["instance-types"] and m == "GET":
            return self._instance_types()
        if parts == ["instances"] and m == "GET":
            return self._list()
        if len(parts) == 2 and parts[0] == "instances":
            if m == "GET":
                return self._get(parts[1])
            if m == "POST":
                return self._rename(req, parts[1])
        if len(parts) == 2 and parts[0] == "instance-operations" and m == "POST":
            op = {"launch": self._launch, "terminate": self._terminate, "restart": self._restart}.get(parts[1])
            if op is not None:
                return op(req)
        if parts == ["ssh-keys"]:
            if m == "GET":
                return self._list_keys()
            if m == "POST":
                return self._add_key(req)
        if len(parts) == 2 and parts[0] == "ssh-keys" and m == "DELETE":
            return self._delete_key(parts[1])
        if parts == ["firewall-rules"]:
            if m == "GET":
                return _ok([dict(r) for r in self.firewall])
            if m == "PUT":
                return self._put_firewall(req)
        return _not_found("resource")

    # ---- instance types

    def _regions_with_capacity(self, t: InstanceTypeOffer) -> list[str]:
        return [] if t.name in self.unavailable_types else list(t.regions)

    def _instance_types(self) -> FakeResponse:
        return _ok({t.name: {"instance_type": t.json(),
                             "regions_with_capacity_available": [{"name": r, "description": REGION_NAMES.get(r, r)}
                                                                 for r in self._regions_with_capacity(t)]}
                    for t in self.catalog.values()})

    # ---- instances

    def _list(self) -> FakeResponse:
        with self.lock:
            return _ok([self._json(i) for i in self._instances.values()])

    def _get(self, iid: str) -> FakeResponse:
        with self.lock:
            inst = self._instances.get(iid)
            if inst is None:
                return _err(404, "global/object-does-not-exist", "Specified instance does not exist.")
            return _ok(self._json(inst))

    def _rename(self, req: FakeRequest, iid: str) -> FakeResponse:
        body = _body(req)
        if not isinstance(body, dict) or set(body) - {"name"} or not isinstance(body.get("name", ""), str) \
                or len(body.get("name", "")) > 64:
            return _invalid("Invalid request data: expected {\"name\": <at most 64 characters>}.")
        with self.lock:
            inst = self._instances.get(iid)
            if inst is None:
                return _err(404, "global/object-does-not-exist", "Specified instance does not exist.")
            if "name" in body:
                inst.name = body["name"] or None
            return _ok(self._json(inst))

    def _launch(self, req: FakeRequest) -> FakeResponse:
        body = _body(req)
        problem = _check_launch(body)
        if problem:
            return _invalid(problem)
        assert isinstance(body, dict)
        if body.get("quantity", 1) != 1:
            return _invalid("Requested too many instances.")
        t = self.catalog.get(body["instance_type_name"])
        if t is None:
            return _err(404, "global/object-does-not-exist", f"Instance type {body['instance_type_name']!r} does not "
                        "exist.", "List the instance types (GET /instance-types) and choose one of them.")
        if body.get("file_system_names") or body.get("file_system_mounts"):
            return _err(404, "global/object-does-not-exist", "Specified file system does not exist.",
                        "The fake has no file systems: launch without one.")
        key_name = body["ssh_key_names"][0]
        with self.lock:
            authorized = {" ".join(k["public_key"].split()[:2]) for k in self._keys.values() if k["name"] == key_name}
        if not authorized:
            return _err(404, "global/object-does-not-exist", f"SSH key {key_name!r} does not exist.",
                        "Add the key (POST /ssh-keys) or use the name of an existing one.")
        if self.faults.take("quota_errors") is not None:
            return _err(400, "global/quota-exceeded", "Quota exceeded.", "Contact Support to increase your quota.")
        region = body["region_name"]
        if region not in self._regions_with_capacity(t) or self.faults.take("capacity_errors") is not None:
            return _err(400, "instance-operations/launch/insufficient-capacity",
                        "Not enough capacity to fulfill launch request.",
                        "Choose another instance type or region, or try again later.")
        import asyncssh

        inst = _Instance(
            id=self._new_id(), name=body.get("name") or None, itype=t, region=region, ssh_key_names=[key_name],
            authorized=authorized, user_data=body.get("user_data"),
            tags=[{"key": x["key"], "value": x["value"]} for x in body.get("tags") or ()],
            hostname=body.get("hostname"), image=body.get("image"),
            host_key=asyncssh.generate_private_key("ssh-ed25519"),
        )
        inst.active_at = time.monotonic() + self.boot_s
        timeout_fault = self.faults.take("create_timeout")
        failed_fault = None if timeout_fault is not None else self.faults.take("fail_but_created")
        with self.lock:
            self._instances[inst.id] = inst
            preempt = self.faults.take("preempt_after_active")
            if preempt is not None:
                inst.preempt_mode = str(preempt.get("mode", "vanish"))
                inst.preempt_after_s = float(preempt.get("seconds", 1.0))
            self.ledger.machine_created(inst.id, inst.name or "", inst.cost, inst.status)
        if failed_fault is not None:  # the instance exists and bills, yet the answer is an error
            return _err(int(failed_fault.get("status", 500)), "global/internal-error",
                        "An internal server error occurred.", "Try again later. Contact Support if the problem persists.")
        answer = _ok({"instance_ids": [inst.id]})
        if timeout_fault is not None:
            answer.delay_s = float(timeout_fault.get("seconds", 30.0))
        return answer

    def _ids(self, req: FakeRequest) -> list[str] | FakeResponse:
        body = _body(req)
        ids = body.get("instance_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return _invalid("Invalid request data: instance_ids must be a non-empty list of instance IDs.")
        return ids

    def _terminate(self, req: FakeRequest) -> FakeResponse:
        ids = self._ids(req)
        if isinstance(ids, FakeResponse):
            return ids
        stop_ssh: list[str] = []
        to_kill: list[tuple[str, MachineProcess]] = []
        with self.lock:
            if any(i not in self._instances for i in ids):
                return _err(404, "global/object-does-not-exist", "Specified instance does not exist.")
            if self.faults.take("terminate_failures") is not None:
                return _err(500, "global/internal-error", "An internal server error occurred.",
                            "Try again later. Contact Support if the problem persists.")
            out = []
            for iid in ids:
                inst = self._instances[iid]
                if inst.status not in ("terminating", "terminated"):
                    proc = self._halt(inst)
                    if proc is not None:
                        to_kill.append((iid, proc))
                    stop_ssh.append(iid)
                    inst.status, inst.gone_at = "terminating", time.monotonic() + self.terminate_s
                    self.ledger.machine_update(iid, status=inst.status)
                out.append(self._json(inst))
        for iid in stop_ssh:
            self._stop_ssh(iid)
        for iid, proc in to_kill:
            self._kill_vm(iid, proc, wait=False)
        return _ok({"terminated_instances": out})

    def _restart(self, req: FakeRequest) -> FakeResponse:
        ids = self._ids(req)
        if isinstance(ids, FakeResponse):
            return ids
        stop_ssh: list[str] = []
        to_kill: list[tuple[str, MachineProcess]] = []
        with self.lock:
            if any(i not in self._instances for i in ids):
                return _err(404, "global/object-does-not-exist", "Specified instance does not exist.")
            out = []
            for iid in ids:
                inst = self._instances[iid]
                if inst.status in ("active", "unhealthy"):  # a reboot: processes gone; cloud-init does not run again
                    proc = self._halt(inst)
                    if proc is not None:
                        to_kill.append((iid, proc))
                    stop_ssh.append(iid)
                    inst.status, inst.ip, inst.halted = "booting", None, False
                    inst.active_at = time.monotonic() + self.boot_s
                out.append(self._json(inst))
        for iid in stop_ssh:
            self._stop_ssh(iid)
        for iid, proc in to_kill:
            self._kill_vm(iid, proc, wait=False)
        return _ok({"restarted_instances": out})

    def _shutdown(self, iid: str, token: str) -> FakeResponse:
        """``shutdown`` on the machine (its own token): halt it (still billing) or terminate it (see the doc)."""
        with self.lock:
            inst = self._instances.get(iid)
            if inst is None or not secrets.compare_digest(token, inst.shutdown_token):
                return json_response(403, {"error": "not this instance's shutdown"})
            if inst.status in ("terminating", "terminated"):
                return json_response(200, {"ok": True})
            proc = self._halt(inst)
            if self.shutdown_mode == "terminate":
                inst.status, inst.gone_at = "terminating", time.monotonic() + self.terminate_s
            else:
                inst.status, inst.halted = "unhealthy", True
            self.ledger.machine_update(iid, status=inst.status)
        # Answer first (the caller is one of the processes about to die), then halt.
        threading.Timer(0.2, self._finish_halt, args=(iid, proc)).start()
        return json_response(200, {"ok": True})

    def _finish_halt(self, iid: str, proc: MachineProcess | None) -> None:
        self._stop_ssh(iid)
        self._kill_vm(iid, proc, wait=False)

    # ---- SSH keys

    def _list_keys(self) -> FakeResponse:
        with self.lock:
            return _ok([dict(k) for k in self._keys.values()])

    def _add_key(self, req: FakeRequest) -> FakeResponse:
        body = _body(req)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not 1 <= len(body["name"]) <= 64:
            return _invalid("Invalid request data: name must be 1-64 characters.")
        public = body.get("public_key")
        private = None
        if public is None:
            import asyncssh

            key = asyncssh.generate_private_key("ssh-ed25519")
            public = key.export_public_key().decode("ascii").strip()
            private = key.export_private_key().decode("ascii")
        if not isinstance(public, str) or len(public) > 4096 or not _PUBKEY.match(public.strip()):
            return _invalid("Invalid request data: public_key is not an OpenSSH public key.")
        with self.lock:
            if any(k["name"] == body["name"] for k in self._keys.values()):
                return _invalid(f"An SSH key named {body['name']!r} already exists.")
            entry = {"id": secrets.token_hex(16), "name": body["name"], "public_key": public.strip()}
            self._keys[entry["id"]] = entry
        out: dict[str, Any] = dict(entry)
        if private is not None:
            out["private_key"] = private
        return _ok(out)

    def _delete_key(self, key_id: str) -> FakeResponse:
        with self.lock:
            if self._keys.pop(key_id, None) is None:
                return _invalid("Specified SSH key does not exist.")
        return _ok({})

    def _put_firewall(self, req: FakeRequest) -> FakeResponse:
        body = _body(req)
        rules = body.get("data") if isinstance(body, dict) else None
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            return _invalid("Invalid request data: expected {\"data\": [rules]}.")
        self.firewall = [dict(r) for r in rules]
        self.firewall_changes += 1
        return _ok([dict(r) for r in self.firewall])

    # ---- time-driven state

    def tick(self) -> None:
        now = time.monotonic()
        start_ssh: list[str] = []
        stop_ssh: list[str] = []
        to_kill: list[tuple[str, MachineProcess]] = []
        with self.lock:
            for inst in list(self._instances.values()):
                if inst.status == "booting" and now >= inst.active_at:
                    inst.status, inst.ip = "active", "127.0.0.1"
                    if inst.runner_port == 0:
                        inst.runner_port = free_port()
                    if not inst.user_data_ran:  # cloud-init runs user_data once per instance, not per boot
                        inst.user_data_ran = True
                        self._spawn(inst)
                    inst.ssh_at = now + self.ssh_delay_s
                    if inst.preempt_after_s is not None:
                        inst.preempt_at, inst.preempt_after_s = now + inst.preempt_after_s, None
                if inst.ssh_at is not None and now >= inst.ssh_at and inst.status == "active":
                    inst.ssh_at = None
                    start_ssh.append(inst.id)
                if inst.process is not None and not inst.script_done:
                    code = inst.process.poll()
                    if code is not None:  # the script ended; the VM (and whatever it started) stays up
                        inst.exit_codes.append(code)
                        inst.script_done = True
                if inst.preempt_at is not None and now >= inst.preempt_at:
                    inst.preempt_at = None
                    proc = self._take_away(inst, inst.preempt_mode, kill=False)
                    if proc is not None:
                        to_kill.append((inst.id, proc))
                    stop_ssh.append(inst.id)
                if inst.gone_at is not None and now >= inst.gone_at:
                    self._remove(inst, "terminated" if inst.status == "terminating" else inst.status)
                    stop_ssh.append(inst.id)
                    if not self.keep_instance_dirs:
                        shutil.rmtree(self.instance_dir(inst.id), ignore_errors=True)
                self.ledger.machine_update(inst.id, cost_per_hr=inst.cost, status=inst.status)
        for iid in stop_ssh:
            self._stop_ssh(iid)
        for iid, proc in to_kill:
            self._kill_vm(iid, proc, wait=False)
        for iid in start_ssh:
            self._start_ssh(iid)

    def _start_ssh(self, iid: str) -> None:
        if self._hub is None:
            return
        with self.lock:
            inst = self._instances.get(iid)
            if inst is None or inst.status != "active":
                return
            state = _SSHServerState(set(inst.authorized), {RUNNER_PORT: inst.runner_port})
            host_key = inst.host_key
        port = self._hub.start(iid, host_key, state)
        with self.lock:
            inst = self._instances.get(iid)
            if inst is not None and inst.status == "active":
                inst.ssh_port = port
                return
        self._hub.stop(iid)  # it went away meanwhile

    def _stop_ssh(self, iid: str) -> None:
        with self.lock:
            inst = self._instances.get(iid)
            if inst is not None:
                inst.ssh_port = None
        if self._hub is not None:
            self._hub.stop(iid)

    def extra_state(self) -> dict[str, Any]:
        with self.lock:
            instances = []
            for i in self._instances.values():
                proc = i.process
                instances.append({
                    "id": i.id, "name": i.name, "status": i.status, "type": i.itype.name, "region": i.region,
                    "cost": i.cost, "pid": proc.pid if proc else None,
                    "script_alive": proc is not None and proc.poll() is None, "exit_codes": list(i.exit_codes),
                    "ssh_port": i.ssh_port, "runner_port": i.runner_port, "halted": i.halted,
                })
            keys = sorted(k["name"] for k in self._keys.values())
        return {"instances": instances, "ssh_keys": keys, "unavailable_types": sorted(self.unavailable_types),
                "firewall_changes": self.firewall_changes}

    # ---- internals (call with the lock held unless said otherwise)

    def _new_id(self) -> str:
        while True:
            iid = secrets.token_hex(16)
            if iid not in self._instances:
                return iid

    def _halt(self, inst: _Instance) -> MachineProcess | None:
        """The VM stops running anything: the caller kills the returned process's whole group (the user_data
        script's, which holds what it started in the background even after the script returned) and stops the SSH
        server."""
        proc, inst.process = inst.process, None
        inst.ssh_at = None
        return proc

    def _kill_vm(self, iid: str, proc: MachineProcess | None, *, wait: bool) -> None:
        """Everything that runs on the VM ends, as in a halt: SIGTERM to the user_data script's process group and to
        every process carrying the VM's mark (``TRAINORCH_FAKE_VM=<id>`` in its environment, inherited by whatever
        the script started, in any session: the runner's command runs in a session of its own), SIGKILL to what is
        left after ``kill_grace_s``. With ``wait=False`` this happens in a background thread."""

        def go() -> None:
            pgid = proc.pid if proc is not None else None

            def signal_all(sig: int) -> list[int]:
                if pgid is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, sig)
                pids = _marked_pids(iid)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                return pids

            signal_all(signal.SIGTERM)
            deadline = time.monotonic() + self.kill_grace_s
            while time.monotonic() < deadline and (_marked_pids(iid) or (proc is not None and proc.poll() is None)):
                time.sleep(0.05)
            signal_all(signal.SIGKILL)
            if proc is not None and proc.proc is not None:
                with contextlib.suppress(Exception):
                    proc.proc.wait(timeout=5.0)

        if wait:
            go()
        else:
            threading.Thread(target=go, name=f"fake-lambda-halt-{iid[:8]}", daemon=True).start()

    def _take_away(self, inst: _Instance, mode: str, *, kill: bool = True) -> MachineProcess | None:
        proc = self._halt(inst)
        if mode == "vanish":
            self._remove(inst, "preempted")
        elif mode == "preempted":
            inst.status, inst.billing = "preempted", False
            inst.gone_at = time.monotonic() + self.terminate_s
            self.ledger.machine_gone(inst.id, "preempted")
        else:
            inst.status = "unhealthy"
            self.ledger.machine_update(inst.id, status=inst.status)
        if proc is not None and kill:
            self._kill_vm(inst.id, proc, wait=False)
            return None
        return proc

    def _remove(self, inst: _Instance, reason: str) -> None:
        self._instances.pop(inst.id, None)
        inst.status, inst.billing, inst.ssh_port = "terminated", False, None
        self.ledger.machine_gone(inst.id, reason)

    def _fake_bin(self, inst: _Instance) -> Path:
        """The fake's ``sudo`` and ``shutdown`` for this machine."""
        path = self.work_dir / f"{inst.id}.bin"
        path.mkdir(parents=True, exist_ok=True)
        sudo = path / "sudo"
        sudo.write_text("#!/bin/sh\n# the fake VM has one user: run the command as it is\n"
                        'while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done\nexec "$@"\n')
        python = sys.executable if not any(c.isspace() for c in sys.executable) else "/usr/bin/env python3"
        url = f"{self.base_url}/_fake/instances/{inst.id}/shutdown"
        shutdown = path / "shutdown"
        shutdown.write_text(
            f"#!{python}\n# the fake's shutdown: halt this VM through the fake (any arguments)\n"
            "import sys, urllib.request\n"
            f"req = urllib.request.Request({url!r}, data=b'{{}}', method='POST',\n"
            f"                             headers={{'X-Fake-Token': {inst.shutdown_token!r}}})\n"
            "try:\n    urllib.request.urlopen(req, timeout=10).read()\n"
            "except Exception as exc:\n    sys.exit(f'shutdown: {exc}')\n")
        for p in (sudo, shutdown):
            p.chmod(0o700)
        return path

    def _spawn(self, inst: _Instance) -> None:
        if not inst.user_data or not inst.user_data.startswith("#!"):
            return  # a #cloud-config document (or none): nothing of ours to run
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_KEYS} if self.inherit_env else {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
        home = self.instance_dir(inst.id)
        home.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
        env.update(self.extra_env)
        env["PATH"] = f"{self._fake_bin(inst)}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env[RUNNER_PORT_ENV] = str(inst.runner_port)
        env[VM_ENV] = inst.id  # marks every process of this VM (see _kill_vm)
        script = self.work_dir / f"{inst.id}.user-data"
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(inst.user_data)
        proc = MachineProcess([str(script)], cwd=home, env=env, log_path=self.work_dir / f"{inst.id}.log")
        proc.start()
        inst.process = proc

    def _json(self, inst: _Instance) -> dict[str, Any]:
        def action(ok: bool, code: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"available": ok}
            if not ok and code:
                out["reason_code"] = code
                out["reason_description"] = {"vm-has-not-launched": "The instance has not launched yet.",
                                             "vm-is-terminating": "The instance is terminating."}.get(code, code)
            return out

        launched = inst.status not in ("booting",)
        going = inst.status in ("terminating", "terminated", "preempted")
        blocked = "vm-is-terminating" if going else "vm-has-not-launched"
        d: dict[str, Any] = {
            "id": inst.id, "status": inst.status, "ssh_key_names": list(inst.ssh_key_names), "file_system_names": [],
            "region": {"name": inst.region, "description": REGION_NAMES.get(inst.region, inst.region)},
            "instance_type": inst.itype.json(),
            "actions": {
                "migrate": action(False, blocked if going or not launched else "vm-is-too-old"),
                "rebuild": action(launched and not going, blocked),
                "restart": action(launched and not going, blocked),
                "cold_reboot": action(launched and not going, blocked),
                "terminate": action(not going, "vm-is-terminating"),
            },
            "tags": [dict(t) for t in inst.tags],
        }
        if inst.name:
            d["name"] = inst.name
        if inst.ip:
            d["ip"] = inst.ip
            d["private_ip"] = "10.0." + ".".join(str(int(inst.id[i:i + 2], 16)) for i in (0, 2))
            d["hostname"] = inst.hostname or inst.ip
            d["jupyter_token"] = inst.jupyter_token
            d["jupyter_url"] = f"https://jupyter-{inst.id}.lambdaspaces.example/?token={inst.jupyter_token}"
        return d


def _marked_pids(iid: str) -> list[int]:
    """This user's live processes whose environment marks them as VM ``iid``'s (Linux ``/proc``; elsewhere none:
    the process group alone is killed)."""
    marker = f"{VM_ENV}={iid}".encode()
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    me = os.getpid()
    out = []
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            out.append(int(name))
    return out


def _body(req: FakeRequest) -> Any:
    try:
        return req.json()
    except (ValueError, UnicodeDecodeError):
        return None


def _check_launch(body: Any) -> str:
    """What is wrong with a launch body ("" when nothing), as ``global/invalid-parameters`` words it."""
    if not isinstance(body, dict):
        return "Invalid request data: expected a JSON object."
    for key in ("region_name", "instance_type_name", "ssh_key_names"):
        if key not in body:
            return f"Invalid request data: {key} is required."
    if body["region_name"] not in REGION_NAMES:
        return f"Invalid request data: region_name {body['region_name']!r} is not a region."
    if not isinstance(body["instance_type_name"], str) or not body["instance_type_name"]:
        return "Invalid request data: instance_type_name must be a string."
    keys = body["ssh_key_names"]
    if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], str):
        return "Invalid request data: exactly one SSH key name must be specified."
    if "name" in body and (not isinstance(body["name"], str) or len(body["name"]) > 64):
        return "Invalid request data: name must be a string of at most 64 characters."
    if "hostname" in body and (not isinstance(body["hostname"], str) or not _HOSTNAME.fullmatch(body["hostname"])):
        return "Invalid request data: hostname must match ^[a-z0-9][0-9a-z-]{0,62}$."
    if "user_data" in body and (not isinstance(body["user_data"], str) or len(body["user_data"].encode()) > 1 << 20):
        return "Invalid request data: user_data must be plain text of at most 1 MB."
    if "image" in body:
        image = body["image"]
        if not isinstance(image, dict) or set(image) not in ({"id"}, {"family"}) \
                or not all(isinstance(v, str) and v for v in image.values()):
            return "Invalid request data: image must be {\"id\": ...} or {\"family\": ...}."
    for key in ("file_system_names", "firewall_rulesets", "file_system_mounts"):
        if key in body and not isinstance(body[key], list):
            return f"Invalid request data: {key} must be a list."
    for tag in body.get("tags") or ():
        if not isinstance(tag, dict) or set(tag) != {"key", "value"} or not isinstance(tag["key"], str) \
                or not isinstance(tag["value"], str) or len(tag["key"]) > 55 or not _TAG_KEY.fullmatch(tag["key"]) \
                or len(tag["value"]) > 128:
            return "Invalid request data: each tag is {key: ^[a-z][a-z0-9-:]+$ (<= 55), value: <= 128 characters}."
    if "quantity" in body and (not isinstance(body["quantity"], int) or isinstance(body["quantity"], bool)):
        return "Invalid request data: quantity must be an integer."
    unknown = sorted(set(body) - _LAUNCH_KEYS)
    if unknown:
        return f"Invalid request data: unknown fields {unknown}."
    return ""

