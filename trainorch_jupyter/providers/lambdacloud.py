"""The Lambda Cloud provider (API v1): a GPU VM whose cloud-init ``user_data`` starts the stage-0, reached through an
SSH tunnel on port 22.

Provisioning only (:mod:`.lambda_api` is the HTTP client; :mod:`trainorch_jupyter.remote` the stage-0 and the pinned
channel). How it works, and how it keeps money safe:

- **The firewall is left alone.** Lambda's inbound rules are account-wide (``PUT /firewall-rules`` replaces them
  all) and by default only 22/tcp is open, so this provider never touches them. The stage-0 (then the runner)
  listens on the machine's port 8765; the provider opens an **SSH local port forward** (``ubuntu@<ip>:22``, the
  job's own key) from ``127.0.0.1:<a free local port>`` to the machine's ``127.0.0.1:8765``, and :meth:`poll`
  returns ``READY`` with ``runner_url = https://127.0.0.1:<local port>``. The tunnel is kept per machine and made
  again by :meth:`poll` when its connection dropped or the kernel restarted (the same local port when it is free).
- **The SSH host key is not what protects the job.** Inside the tunnel the channel is the job's TLS, pinned to the
  certificate the orchestrator made for this job (:mod:`trainorch_jupyter.remote.tls`): a host that is not the job's
  machine cannot present it, never sees the runner's token, and cannot serve bytes of its own. So the host key
  needs no out-of-band check (Lambda's API does not publish it anyway): it is recorded at the first connection
  (trust on first use) and a changed one is refused (the machine is then treated as failed and destroyed).
- **A key pair per job.** :meth:`launch` makes an Ed25519 key pair, keeps the private half in the workspace's
  private folder (``.trainorch/lambda-ssh/<name>``, 0600: it must survive a kernel restart to reach the machine
  again) and registers the public half under the job's tag name (``POST /ssh-keys``; Lambda keeps no private key);
  :meth:`terminate` deletes both once the instance is confirmed gone.
- **Tag before launch.** Each instance is named ``trainorch-<workspace id>-<job id>`` (cut to Lambda's 64
  characters with a hash suffix when longer) and tagged ``trainorch-workspace``/``trainorch-job``, so
  :meth:`reconcile` (by job) and :meth:`list_machines` (``%train cleanup``) find it again from Lambda's own list.
- **Nothing is launched that cannot be afforded**: the key is checked by :meth:`validate` (before the job is even
  written), the GPU is resolved against ``/instance-types`` and its price compared with
  ``resources.max_price_per_hour``; only a region listed with capacity is tried (``regions_with_capacity_available``;
  a launch is never used as a capacity probe, it costs 12 s of the account's launch budget).
- **A launch that may have made an instance** (a 5xx, a timeout, a cut connection) is never retried: the instances
  named with the job's tag are listed, one healthy instance is adopted and every other is terminated. Otherwise the
  error goes up and the orchestrator's reap list looks for the tag again until it is settled.
- **Every wait ends**: :meth:`poll` reads ``booting`` as provisioning, ``terminating``/``terminated``/``preempted``
  (or a missing instance) as GONE and ``unhealthy`` (once it lasted ``unhealthy_grace_s``) as FAILED; the
  orchestrator's deadline is ``provision_timeout_s`` (30 min, as dstack allows on Lambda).
- **Terminate** asks ``instance-operations/terminate`` and then confirms by reading the instance back until it is
  gone (``global/object-does-not-exist`` or ``terminated``); "already gone" is success; any other error propagates
  so the orchestrator retries through its reap list.
- **Pacing**: every request of the account is spaced ``request_interval_s`` (1 s) and every launch
  ``launch_interval_s`` (12 s), client-side; polls of many machines share one ``GET /instances`` per ``list_ttl_s``.
- **The dead-man switch is weaker here.** Lambda has no key scoped to one instance, and the user's key never goes
  to a machine, so a machine cannot terminate itself: :meth:`on_exit_hook` is ``sudo -n shutdown -h now`` (the
  runner's last act when its life ends), which stops the job's work, and the orchestrator's persisted reap list
  (and ``%train cleanup``, which finds every tagged instance) terminates the instance. **Lambda has no stop: a VM
  that shut itself down still exists and is still billed until it is terminated through the API** (the notes:
  "terminate is the only way to stop billing"). So if both the kernel and the machine's runner are lost, the
  instance bills until this workspace is opened again (its reaper runs at once) or ``%train cleanup --yes`` is run.

Provider config (``Orchestrator(provider_config={"lambda": {...}})``), all optional:

=====================  =======================================================================================
``workspace_id``       the workspace's id in instance names (the orchestrator passes ``Store.workspace_id()``)
``base_url``           the API (default ``$TRAINORCH_LAMBDA_URL``, else ``https://cloud.lambda.ai``)
``gpu``                GPU when the spec has none (default: the cheapest type with capacity within the price cap)
``region``             preferred region when the spec has none (default: the first with capacity)
``image_family``,      the machine image (default: Lambda's latest Lambda Stack); ``resources.image`` may say
``image_id``           ``family:<name>`` or ``id:<id>`` too
``provision_timeout_s``  seconds from launch to a reachable runner (default 1800)
``request_interval_s``, ``launch_interval_s``: the pacing (default 1 and 12 s: Lambda's documented limits)
``api_timeout_s``, ``launch_timeout_s``, ``max_attempts``, ``api_backoff_s``: the API client's settings
``catalog_ttl_s``      how long ``/instance-types`` is reused (default 60); ``list_ttl_s`` the shared instance list
                       (default 2)
``adopt_wait_s``       how long a failed launch's instance is looked for by name (default 10)
``terminate_wait_s``   how long a terminate waits for the instance to be gone (default 120)
``unhealthy_grace_s``  how long ``unhealthy`` may last before the machine counts as failed (default 120)
``ssh_user``, ``ssh_timeout_s``: the SSH login (default ``ubuntu``) and connect timeout (default 20 s)
``key_dir``            where the per-job private keys and recorded host keys go (default
                       ``<workspace>/.trainorch/lambda-ssh``)
=====================  =======================================================================================

The API key is never config: it comes from ``LAMBDA_API_KEY`` or the system keyring (:mod:`trainorch_jupyter.keys`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import keys
from ..gpus import canonical_gpu, matches, squash, vram_of
from ..model import Job, JobSpec, ProviderError, Resources, SpecError
from . import Bootstrap, MachineHandle, MachineStatus, Offer, PollResult, Provider
from .lambda_api import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    LAUNCH_INTERVAL_S,
    MAX_NAME,
    REGIONS,
    REQUEST_INTERVAL_S,
    Instance,
    InstanceType,
    LambdaAPI,
    LambdaAuthError,
    LambdaError,
    LambdaNoCapacity,
    LambdaQuotaExceeded,
    LambdaUnavailable,
    LaunchPacer,
    SSHKey,
    check_base_url,
    gpu_name_and_vram,
    launch_body,
)
from .runpod import PriceAboveMax, parse_tag
from .runpod_api import RateLimitPacer

__all__ = [
    "DEADMAN_HOOK",
    "RUNNER_PORT_ENV",
    "TAG_JOB",
    "TAG_PREFIX",
    "TAG_WORKSPACE",
    "LambdaProvider",
    "user_data_script",
]

log = logging.getLogger(__name__)

TAG_PREFIX = "trainorch-"
TAG_WORKSPACE = "trainorch-workspace"
TAG_JOB = "trainorch-job"
#: The variable the stage-0 reads its port from. Lambda sets none (cloud-init), so the stage-0 listens on the
#: bootstrap's port (8765); a fake sets it to the free local port that stands for the machine's 8765.
RUNNER_PORT_ENV = "TRAINORCH_RUNNER_PORT"
#: The runner's ``--on-exit`` hook on a Lambda VM: halt the machine (see the module doc: it still bills).
DEADMAN_HOOK = "sudo -n shutdown -h now"
GPU_COUNTS = (1, 2, 4, 8)
SSH_PORT = 22
#: GPU names of Lambda's catalog outside the shared vocabulary (known before any catalog is fetched)
_LAMBDA_GPUS = frozenset({"rtx6000", "quadrortx6000", "gh200", "a10", "a6000", "v100"})
_INSTANCE_TYPE = re.compile(r"^gpu_\d+x_[a-z0-9_]+$")
_WORKSPACE_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_CONFIG_KEYS = frozenset({
    "workspace_id", "base_url", "gpu", "region", "image_family", "image_id", "provision_timeout_s", "request_interval_s",
    "launch_interval_s", "api_timeout_s", "launch_timeout_s", "max_attempts", "api_backoff_s", "catalog_ttl_s",
    "list_ttl_s", "adopt_wait_s", "terminate_wait_s", "unhealthy_grace_s", "ssh_user", "ssh_timeout_s", "key_dir",
})


def user_data_script(stage0: str, job_id: str) -> str:
    """The instance's cloud-init ``user_data``: a ``#!/bin/sh`` script (cloud-init runs it once, as root, late in
    the first boot) that starts the stage-0 in the background, its output in ``$HOME/trainorch-stage0.log``, and
    returns (so that cloud-init finishes; its unit keeps the background process)."""
    if "'" in stage0:
        raise ValueError("the stage-0 command must hold no single quote")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", job_id):
        raise ValueError(f"job id {job_id!r}")
    return ("#!/bin/sh\n"
            f"# trainorch: the stage-0 of job {job_id} (reached through SSH; see trainorch_jupyter.providers.lambdacloud)\n"
            'export HOME="${HOME:-/root}"\n'
            'cd "$HOME" 2>/dev/null || cd /\n'
            f"nohup sh -c '{stage0}' >>\"$HOME/trainorch-stage0.log\" 2>&1 </dev/null &\n")


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.2f}/h"


def _is_loopback(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def _pubkey_body(public_key: str) -> str:
    """``"ssh-ed25519 AAAA... comment"`` -> ``"ssh-ed25519 AAAA..."`` (to compare keys)."""
    return " ".join(public_key.split()[:2])


def _asyncssh() -> Any:
    try:
        import asyncssh
    except ImportError:
        raise SpecError("provider", "lambda: the Lambda provider reaches its machines over SSH and needs the "
                        "'asyncssh' package: pip install asyncssh; nothing was created") from None
    return asyncssh


class _Unreachable(Exception):
    """The machine does not answer on SSH yet (or the tunnel could not be opened): keep waiting."""


class _Refused(Exception):
    """The machine cannot be reached safely (a changed host key, the job's key missing): it must go."""


@dataclass
class _Tunnel:
    conn: Any  # asyncssh.SSHClientConnection
    listener: Any  # asyncssh.SSHListener
    port: int
    target: tuple[str, int]
    loop: asyncio.AbstractEventLoop

    def alive(self) -> bool:
        try:
            same = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            same = False
        return same and not self.conn.is_closed()

    def close(self) -> None:
        try:
            same = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            same = False
        if same and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.listener.close()
            with contextlib.suppress(Exception):
                self.conn.close()


class LambdaProvider(Provider):
    """Lambda Cloud VMs through API v1, reached over an SSH tunnel. See the module docstring."""

    name = "lambda"
    remote = True
    provision_timeout_s = 30 * 60.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg = dict(self.config)
        unknown = sorted(set(cfg) - _CONFIG_KEYS)
        if unknown:
            raise SpecError("provider_config.lambda", f"unknown keys {unknown}; known: {', '.join(sorted(_CONFIG_KEYS))}")
        try:
            self.base_url = check_base_url(str(cfg.get("base_url") or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL))
        except ValueError as exc:
            raise SpecError(BASE_URL_ENV, str(exc)) from None
        ws = cfg.get("workspace_id")
        if ws is None:
            ws = hashlib.sha256(str(self.workspace).encode()).hexdigest()[:8]
        if not isinstance(ws, str) or not _WORKSPACE_ID.match(ws):
            raise SpecError("provider_config.lambda.workspace_id", f"must be 1-32 letters or digits, got {ws!r}")
        self.workspace_id = ws
        self.default_gpu = str(cfg.get("gpu") or "") or None
        self.default_region = _region(cfg.get("region"), "provider_config.lambda.region")
        self.image: dict[str, str] | None = None
        if cfg.get("image_family") and cfg.get("image_id"):
            raise SpecError("provider_config.lambda", "give image_family or image_id, not both")
        if cfg.get("image_family"):
            self.image = {"family": str(cfg["image_family"])}
        elif cfg.get("image_id"):
            self.image = {"id": str(cfg["image_id"])}
        if "provision_timeout_s" in cfg:
            self.provision_timeout_s = float(cfg["provision_timeout_s"])
        self.catalog_ttl_s = float(cfg.get("catalog_ttl_s", 60.0))
        self.list_ttl_s = float(cfg.get("list_ttl_s", 2.0))
        self.adopt_wait_s = float(cfg.get("adopt_wait_s", 10.0))
        self.terminate_wait_s = float(cfg.get("terminate_wait_s", 120.0))
        self.unhealthy_grace_s = float(cfg.get("unhealthy_grace_s", 120.0))
        self.ssh_user = str(cfg.get("ssh_user") or "ubuntu")
        self.ssh_timeout_s = float(cfg.get("ssh_timeout_s", 20.0))
        self.key_dir = Path(cfg["key_dir"]) if cfg.get("key_dir") else Path(self.workspace) / ".trainorch" / "lambda-ssh"
        self._api_options: dict[str, Any] = {}
        for key, option in (("api_timeout_s", "timeout_s"), ("launch_timeout_s", "launch_timeout_s"),
                            ("max_attempts", "max_attempts"), ("api_backoff_s", "backoff_s")):
            if key in cfg:
                self._api_options[option] = cfg[key]
        # One pair of pacers per provider (per account key): pacing survives a key change.
        self._pacer = RateLimitPacer(min_interval_s=float(cfg.get("request_interval_s", REQUEST_INTERVAL_S)),
                                     max_wait_s=600.0)
        self._launch_pacer = LaunchPacer(float(cfg.get("launch_interval_s", LAUNCH_INTERVAL_S)))
        # The API client, made from the key and made again when the key changes (keys.KeyedClient).
        self._clients = keys.KeyedClient(
            self.name, lambda key: LambdaAPI(key, base_url=self.base_url, http=self.http, pacer=self._pacer,
                                   launch_pacer=self._launch_pacer, **self._api_options),
            lambda: LambdaAuthError(self._missing_key_message()))
        self._catalog_cache: tuple[float, list[InstanceType]] | None = None
        self._listed: dict[str, Instance] = {}
        self._listed_at = -1e9
        self._list_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tunnels: dict[str, _Tunnel] = {}
        self._tunnel_locks: dict[str, asyncio.Lock] = {}
        self._unhealthy_since: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"LambdaProvider(base_url={self.base_url!r}, workspace_id={self.workspace_id!r})"

    # ---- the API client and the key

    def _client(self) -> LambdaAPI:
        """The API client, made again when the key changed (it is read at most every keys.KEY_RECHECK_S)."""
        return self._clients.get()

    @staticmethod
    def _missing_key_message() -> str:
        return (f"no Lambda API key: set {API_KEY_ENV} to a key from the Lambda Cloud console (API keys), or store "
                f"it in the system keyring (`keyring set {keys.KEYRING_SERVICE} lambda`); nothing was created")

    def _loop_state(self) -> None:
        """Locks and tunnels belong to one event loop: forget them when called from another."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._list_lock = asyncio.Lock()
            self._tunnel_locks = {}
            self._tunnels = {}  # a tunnel of a closed loop is dead with it

    # ---- names and tags

    def tag(self, job_id: str) -> str:
        """The instance (and SSH key) name of ``job_id``: ``trainorch-<workspace id>-<job id>``, cut to Lambda's 64
        characters with a hash of the whole when longer (the tags then carry the full ids)."""
        full = f"{TAG_PREFIX}{self.workspace_id}-{job_id}"
        if len(full) <= MAX_NAME:
            return full
        return f"{full[: MAX_NAME - 11]}-{hashlib.sha256(full.encode()).hexdigest()[:10]}"

    def _tags(self, job_id: str) -> dict[str, str]:
        return {TAG_WORKSPACE: self.workspace_id, TAG_JOB: job_id}

    def _owner(self, inst: Instance) -> tuple[str | None, str | None]:
        """(workspace id, job id) of an instance this tool made; (None, None) for any other."""
        ws, job = inst.tags.get(TAG_WORKSPACE), inst.tags.get(TAG_JOB)
        if ws and job:
            return ws, job
        parsed = parse_tag(inst.name) if len(inst.name) < MAX_NAME else None
        return parsed if parsed else (None, None)

    def _is_ours(self, inst: Instance) -> bool:
        return inst.name.startswith(TAG_PREFIX) or TAG_JOB in inst.tags

    def _of_job(self, inst: Instance, job_id: str) -> bool:
        ws, job = self._owner(inst)
        return inst.name == self.tag(job_id) or (ws == self.workspace_id and job == job_id)

    # ---- validate (no network)

    def validate(self, spec: JobSpec) -> None:
        if not keys.get_key(self.name):
            raise SpecError("provider", f"lambda: {self._missing_key_message()}")
        _asyncssh()
        r = spec.resources
        gpu = r.gpu or self.default_gpu
        if gpu is not None and not self._known_offline(gpu):
            raise SpecError("resources.gpu", self._unknown_gpu_message(gpu, self._catalog_names()))
        if r.gpu_count not in GPU_COUNTS:
            raise SpecError("resources.gpu_count", f"Lambda machines have 1, 2, 4 or 8 GPUs, not {r.gpu_count}")
        _region(r.region, "resources.region")
        _image(r.image)

    def _known_offline(self, gpu: str) -> bool:
        g = gpu.strip()
        if _INSTANCE_TYPE.match(g.lower()):
            return True
        name, vram = gpu_name_and_vram(g)
        if vram_of(canonical_gpu(name, vram)) is not None or squash(name) in _LAMBDA_GPUS:
            return True
        cached = self._catalog_cache[1] if self._catalog_cache else []
        return any(self._matches(g, t) for t in cached)

    def _catalog_names(self) -> list[str]:
        cached = self._catalog_cache[1] if self._catalog_cache else []
        return sorted({f"{t.gpu_description} ({t.name})" for t in cached}) or [
            "A10", "A100", "A100-80GB", "A6000", "H100", "GH200", "B200", "or an instance type such as gpu_1x_a10"]

    @staticmethod
    def _unknown_gpu_message(gpu: str, names: list[str]) -> str:
        return (f"Lambda has no GPU called {gpu!r}. Give one of: {', '.join(names)} (the provider's offers() lists "
                "what is for rent now)")

    # ---- the catalog

    async def _catalog(self, api: LambdaAPI) -> list[InstanceType]:
        cached = self._catalog_cache
        if cached is not None and time.monotonic() - cached[0] < self.catalog_ttl_s:
            return cached[1]
        types = [t for t in await api.list_instance_types() if t.gpus > 0]
        self._catalog_cache = (time.monotonic(), types)
        return types

    @staticmethod
    def canonical(t: InstanceType) -> str:
        """The instance type's GPU in the shared vocabulary (``A100-40GB``, ``H100``, ...)."""
        name, vram = gpu_name_and_vram(t.gpu_description)
        return canonical_gpu(name or t.name, vram)

    def _matches(self, wanted: str, t: InstanceType) -> bool:
        """``wanted``: an instance type name (``gpu_1x_a10``), Lambda's own GPU description (``A100 (40 GB SXM4)``)
        or a GPU in any spelling of the shared vocabulary (``A100`` matches both sizes)."""
        w = wanted.strip()
        if w.lower() == t.name.lower() or squash(w) == squash(t.gpu_description):
            return True
        name, vram = gpu_name_and_vram(w)
        return matches(canonical_gpu(name, vram) if vram is not None else name, self.canonical(t))

    # ---- launch

    async def launch(self, job: Job, bootstrap: Bootstrap) -> MachineHandle:
        api = self._client()
        asyncssh = _asyncssh()
        self._loop_state()
        res = job.spec.resources
        start = getattr(bootstrap, "start_command", None)
        if start is None:
            raise ProviderError(self.name, "this orchestrator's Bootstrap has no start_command(): a Lambda machine needs "
                                "the remote stage-0 (trainorch_jupyter.remote) to bring up the runner; nothing was "
                                "created")
        try:
            user_data = user_data_script(str(start(port_env=RUNNER_PORT_ENV)), job.id)
        except ValueError as exc:
            raise ProviderError(self.name, f"the machine's start command could not be made ({exc}); nothing was "
                                "created") from None
        itype, region = await self._choose(api, res)
        name = self.tag(job.id)
        image = _image(res.image) or self.image
        private = asyncssh.generate_private_key("ssh-ed25519")
        public = private.export_public_key().decode("ascii").strip()
        self._write_private_key(name, private.export_private_key())
        ssh_key = await self._register_key(api, name, public)
        body = launch_body(region_name=region, instance_type_name=itype.name, ssh_key_name=name, name=name,
                           user_data=user_data, tags=self._tags(job.id), image=image)
        adopted = False
        try:
            ids = await api.launch(body)
        except (LambdaNoCapacity, LambdaQuotaExceeded) as exc:
            await self._forget_key(api, name)
            if isinstance(exc, LambdaQuotaExceeded):
                raise
            self._catalog_cache = None  # the listing was stale
            alternatives = await self._alternatives(api, itype, res)
            raise LambdaNoCapacity(self._capacity_message(itype, region, alternatives), status=exc.status,
                                   code=exc.code or "", api_message=exc.api_message, operation=exc.operation) from None
        except LambdaUnavailable as exc:
            if not exc.maybe_created:
                await self._forget_key(api, name)
                raise
            inst = await self._adopt(api, name, job.id, exc)
            ids = [inst.id]
            adopted = True
        except LambdaError:
            await self._forget_key(api, name)
            raise
        if not ids:
            await self._forget_key(api, name)
            raise LambdaUnavailable(f"Lambda accepted the launch of {itype.name} in {region} but named no instance; "
                                    "it will be looked for by its tag", maybe_created=True, operation="launch")
        for extra in ids[1:]:  # one instance per launch: anything more is destroyed at once
            with contextlib.suppress(LambdaError):
                await api.terminate([extra])
        self._listed_at = -1e9  # the next poll lists again
        data: dict[str, Any] = {
            "instance_id": ids[0], "name": name, "workspace_id": self.workspace_id, "job_id": job.id,
            "instance_type": itype.name, "region": region, "gpu_description": itype.gpu_description,
            "gpu_count": itype.gpus, "ssh_key_name": name, "ssh_key_id": ssh_key.id, "ssh_user": self.ssh_user,
            "runner_port": int(getattr(bootstrap, "port", 8765) or 8765), "base_url": self.base_url,
            "status": "booting", "list_price_per_hour": itype.price_per_hour,
        }
        if image:
            data["image"] = dict(image)
        if adopted:
            data["adopted"] = True
        return MachineHandle(provider=self.name, machine_id=ids[0], runner_url=None, data=data,
                             price_per_hour=itype.price_per_hour, gpu=self.canonical(itype))

    async def _choose(self, api: LambdaAPI, res: Resources) -> tuple[InstanceType, str]:
        """The cheapest instance type that fits ``res`` and has capacity, and a region for it."""
        types = await self._catalog(api)
        wanted = res.gpu or self.default_gpu
        count = res.gpu_count
        region = _region(res.region, "resources.region") or None
        if wanted is not None:
            named = [t for t in types if self._matches(wanted, t)]
            if not named:
                raise SpecError("resources.gpu", self._unknown_gpu_message(
                    wanted, sorted({f"{t.gpu_description} ({t.name})" for t in types})))
            fits = [t for t in named if t.gpus == count]
            if not fits:
                counts = sorted({t.gpus for t in named})
                raise SpecError("resources.gpu_count", f"Lambda's {named[0].gpu_description} machines have "
                                f"{' or '.join(str(c) for c in counts)} GPUs, not {count}: ask for that many")
        else:
            fits = [t for t in types if t.gpus == count]
        fits = [t for t in fits if t.storage_gib == 0 or t.storage_gib >= res.disk_gb]
        if not fits:
            raise SpecError("resources.disk_gb", f"no Lambda machine with {count} GPU(s) has {res.disk_gb} GB of disk")
        cap = res.max_price_per_hour
        affordable = [t for t in fits if cap is None or t.price_per_hour <= cap + 1e-9]
        if not affordable:
            cheapest = min(fits, key=lambda t: t.price_per_hour)
            raise PriceAboveMax(self.name, f"{cheapest.description} ({cheapest.name}) costs {_usd(cheapest.price_per_hour)}, "
                                f"above the max price {_usd(cap)}: raise --max-price or choose a cheaper GPU; nothing "
                                "was created")
        stocked = [t for t in affordable if any(region is None or r == region for r in t.regions)]
        if not stocked:
            best = min(affordable, key=lambda t: t.price_per_hour)
            where = f"in {region}" if region else "in any region"
            others = sorted({r for t in affordable for r in t.regions})
            hint = f" (capacity now in {', '.join(others)})" if region and others else ""
            raise LambdaNoCapacity(f"Lambda has no capacity for {best.description} ({best.name}) {where} right now"
                                   f"{hint}. " + self._alternatives_text(await self._alternatives(api, best, res))
                                   + "try another region, or later; nothing was created",
                                   operation="check the capacity (instance types)")
        t = min(stocked, key=lambda t: (t.price_per_hour, -(t.vram_gb or 0)))
        if region is None:
            region = self.default_region if self.default_region in t.regions else t.regions[0]
        return t, region

    async def _alternatives(self, api: LambdaAPI, itype: InstanceType, res: Resources) -> list[str]:
        """Types with capacity now for the same GPU count (within the cap), cheapest first, as 'A10 $0.75/h'."""
        try:
            types = await self._catalog(api)
        except LambdaError:
            return []
        cap = res.max_price_per_hour
        out = sorted((t for t in types if t.name != itype.name and t.gpus == res.gpu_count and t.regions
                      and (cap is None or t.price_per_hour <= cap + 1e-9)), key=lambda t: t.price_per_hour)
        return [f"{t.gpu_description} ({t.name}) {_usd(t.price_per_hour)}" for t in out[:4]]

    @staticmethod
    def _alternatives_text(alternatives: list[str]) -> str:
        return f"With capacity now: {', '.join(alternatives)}; " if alternatives else ""

    def _capacity_message(self, itype: InstanceType, region: str, alternatives: list[str]) -> str:
        return (f"Lambda has no {itype.description} ({itype.name}) free in {region} right now (it was listed with "
                f"capacity, which is no reservation). {self._alternatives_text(alternatives)}choose another GPU "
                "(--gpu) or region, or try again later; nothing is billed for it")

    async def _adopt(self, api: LambdaAPI, name: str, job_id: str, failure: LambdaUnavailable) -> Instance:
        """After a launch that may have made the instance: adopt the one healthy instance of this job and terminate
        any other; raise (the orchestrator then reconciles by tag) when that cannot be settled."""
        deadline = time.monotonic() + self.adopt_wait_s
        delay = 1.0
        while True:
            try:
                found = [i for i in await api.list_instances() if self._of_job(i, job_id)]
            except LambdaError as exc:
                raise LambdaUnavailable(f"{failure} Looking for it by name failed too ({exc}); it will be looked for "
                                        "again", maybe_created=True, operation=failure.operation) from None
            if found or time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)  # an instance made by a failed launch may take a moment to be listed
            delay = min(3.0, delay * 2)
        if not found:
            log.info("Lambda: the launch of %s failed and no instance of that name exists", name)
            await self._forget_key(api, name)
            raise failure
        healthy = [i for i in found if not i.gone and i.status != "unhealthy"]
        keep = healthy[-1] if healthy else None
        for inst in found:
            if inst is keep or inst.gone:
                continue
            try:
                await api.terminate([inst.id])
            except LambdaError as exc:
                raise LambdaUnavailable(f"{failure} An instance named {name!r} ({inst.id}) was made anyway and could "
                                        f"not be terminated yet ({exc}); it will be tried again", maybe_created=True,
                                        operation=failure.operation) from None
        if keep is None:
            raise LambdaUnavailable(f"{failure} The instance it made anyway was in a bad state and was terminated",
                                    maybe_created=True, operation=failure.operation)
        log.info("Lambda: the launch of %s failed but made instance %s: adopted", name, keep.id)
        return keep

    # ---- SSH keys (one pair per job)

    def _key_path(self, name: str) -> Path:
        return self.key_dir / name

    def _host_path(self, name: str) -> Path:
        return self.key_dir / f"{name}.hostkey"

    def _write_private_key(self, name: str, data: bytes) -> None:
        self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            os.chmod(self.key_dir, 0o700)
        path = self._key_path(name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with contextlib.suppress(FileNotFoundError):
            self._host_path(name).unlink()  # a new job key: a new machine, whose host key is not known yet

    def _drop_local_key(self, name: str) -> None:
        for path in (self._key_path(name), self._host_path(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _register_key(self, api: LambdaAPI, name: str, public: str) -> SSHKey:
        """Register ``public`` under ``name``. A key of that name left by an earlier try of this job (whose private
        half was replaced) is deleted first; an ambiguous failure is settled by listing the keys."""
        try:
            return await api.add_ssh_key(name, public)
        except LambdaAuthError:
            self._drop_local_key(name)
            raise
        except LambdaError as first:
            try:
                same = [k for k in await api.list_ssh_keys() if k.name == name]
                for k in same:
                    if _pubkey_body(k.public_key) == _pubkey_body(public):
                        return k  # the failed call registered it after all
                for k in same:
                    await api.delete_ssh_key(k.id)
                if not same:
                    raise first
                return await api.add_ssh_key(name, public)
            except LambdaError:
                self._drop_local_key(name)
                raise first from None

    async def _forget_key(self, api: LambdaAPI, name: str, key_id: str | None = None) -> None:
        """Delete the SSH key ``key_id`` (else every key named ``name``) from the account, and the private key here
        (best effort: a key costs nothing; a leftover one is deleted by the next reconcile of the job)."""
        try:
            if key_id:
                await api.delete_ssh_key(key_id)
            else:
                for k in await api.list_ssh_keys():
                    if k.name == name:
                        await api.delete_ssh_key(k.id)
        except LambdaError as exc:
            log.warning("Lambda: the SSH key %s could not be deleted yet (%s)", name, exc)
            return
        self._drop_local_key(name)

    # ---- poll, terminate, reconcile

    def _same_api(self, handle: MachineHandle) -> None:
        made_at = handle.data.get("base_url")
        if made_at and str(made_at).rstrip("/") != self.base_url:
            raise ProviderError(self.name, f"instance {handle.machine_id} was launched through {made_at}, but the Lambda "
                                f"API is now {self.base_url}: set {BASE_URL_ENV}={made_at} to reach (and terminate) it",
                                retryable=True)

    async def _instances(self, api: LambdaAPI) -> dict[str, Instance]:
        """The account's instances, listed at most every ``list_ttl_s`` however many machines are polled."""
        self._loop_state()
        if time.monotonic() - self._listed_at < self.list_ttl_s:
            return self._listed
        assert self._list_lock is not None
        async with self._list_lock:
            if time.monotonic() - self._listed_at >= self.list_ttl_s:
                self._listed = {i.id: i for i in await api.list_instances()}
                self._listed_at = time.monotonic()
        return self._listed

    async def _find(self, api: LambdaAPI, instance_id: str) -> Instance | None:
        inst = (await self._instances(api)).get(instance_id)
        if inst is None:  # not listed (yet, or any more): the instance's own record decides
            inst = await api.find_instance(instance_id)
        return inst

    async def poll(self, handle: MachineHandle) -> PollResult:
        self._same_api(handle)
        api = self._client()
        iid = handle.machine_id
        inst = await self._find(api, iid)
        if inst is None or inst.gone:
            self._close_tunnel(iid)
            self._unhealthy_since.pop(iid, None)
            why = {"preempted": "Lambda took the machine back (preempted)",
                   "terminating": "it is being terminated", "terminated": "it was terminated"}.get(
                inst.status if inst else "", "it was terminated, or Lambda took the machine back")
            return PollResult(MachineStatus.GONE, None, f"Lambda has no instance {iid} any more: {why}")
        if inst.status == "unhealthy":
            since = self._unhealthy_since.setdefault(iid, time.monotonic())
            lasted = time.monotonic() - since
            if lasted >= self.unhealthy_grace_s:
                self._close_tunnel(iid)
                return PollResult(MachineStatus.FAILED, None, f"Lambda reports instance {iid} unhealthy for "
                                  f"{lasted:.0f}s (it halted, or its host failed); it must be terminated")
            return PollResult(MachineStatus.PROVISIONING, None, f"instance {iid} is unhealthy ({lasted:.0f}s); waiting "
                              f"up to {self.unhealthy_grace_s:g}s for it to recover")
        self._unhealthy_since.pop(iid, None)
        if inst.status != "active" or not inst.ip:
            return PollResult(MachineStatus.PROVISIONING, None, f"instance {iid} is {inst.status or 'being launched'}")
        try:
            tunnel = await self._tunnel(handle, inst)
        except _Refused as exc:
            self._close_tunnel(iid)
            return PollResult(MachineStatus.FAILED, None, f"instance {iid}: {exc}")
        except _Unreachable as exc:
            return PollResult(MachineStatus.PROVISIONING, None, f"instance {iid} is active; waiting for SSH ({exc})")
        return PollResult(MachineStatus.READY, f"https://127.0.0.1:{tunnel.port}",
                          f"instance {iid} is active, reached through an SSH tunnel")

    async def terminate(self, handle: MachineHandle) -> None:
        """Terminate the instance and confirm it is gone (read back: not found, or ``terminated``), then delete the
        job's SSH key. "Already gone" is success; any other error propagates (the orchestrator keeps the instance
        on its reap list and tries again)."""
        self._same_api(handle)
        api = self._client()
        iid = handle.machine_id
        self._close_tunnel(iid)
        inst = None
        with contextlib.suppress(LambdaError):
            inst = await api.find_instance(iid)
        if inst is None or inst.status != "terminated":
            if inst is None or inst.status != "terminating":
                try:
                    await api.terminate([iid])
                except LambdaError as exc:
                    if not (exc.code == "global/object-does-not-exist" or exc.status == 404):
                        raise
            await self._confirm_gone(api, iid)
        self._listed.pop(iid, None)
        self._unhealthy_since.pop(iid, None)
        own = str(handle.data.get("ssh_key_name") or "")
        if own:
            await self._forget_key(api, own, str(handle.data.get("ssh_key_id") or "") or None)
        if inst is not None:
            for name in {k for k in inst.ssh_key_names if k.startswith(TAG_PREFIX) and k != own}:
                await self._forget_key(api, name)

    async def _confirm_gone(self, api: LambdaAPI, iid: str) -> None:
        deadline = time.monotonic() + self.terminate_wait_s
        delay = 0.25
        while True:
            inst = await api.find_instance(iid)
            if inst is None or inst.status == "terminated":
                return
            if time.monotonic() >= deadline:
                raise LambdaUnavailable(f"instance {iid} is still {inst.status} {self.terminate_wait_s:.0f}s after Lambda "
                                        "accepted its termination; it will be tried again",
                                        operation=f"terminate instance {iid!r}")
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def reconcile(self, job: Job) -> list[MachineHandle]:
        """The instances of ``job`` (by its tags or name), after a launch error or a crash between launch and record.
        With none left, the job's SSH key goes too."""
        api = self._client()
        found = [i for i in await api.list_instances() if self._of_job(i, job.id) and i.status != "terminated"]
        if not found:
            await self._forget_key(api, self.tag(job.id))
        return [self._handle(i) for i in found]

    async def list_machines(self) -> list[MachineHandle]:
        """Every instance of this tool on the account (named ``trainorch-...`` or tagged), of any workspace. Each
        handle's ``data`` has ``workspace_id``, ``job_id``, ``status``, ``this_workspace``; ``price_per_hour`` is
        its type's price. Destroy one with :meth:`terminate`."""
        out = []
        for inst in await self._client().list_instances():
            if not self._is_ours(inst) or inst.status == "terminated":
                continue
            handle = self._handle(inst)
            handle.data["this_workspace"] = handle.data["workspace_id"] == self.workspace_id
            out.append(handle)
        return out

    def _handle(self, inst: Instance) -> MachineHandle:
        ws, job_id = self._owner(inst)
        keys_ = [k for k in inst.ssh_key_names if k.startswith(TAG_PREFIX)]
        data: dict[str, Any] = {
            "instance_id": inst.id, "name": inst.name, "workspace_id": ws, "job_id": job_id,
            "instance_type": inst.instance_type, "region": inst.region, "gpu_description": inst.gpu_description,
            "gpu_count": inst.gpus, "ssh_key_name": keys_[0] if keys_ else None, "ssh_user": self.ssh_user,
            "base_url": self.base_url, "status": inst.status,
        }
        name, vram = gpu_name_and_vram(inst.gpu_description)
        return MachineHandle(provider=self.name, machine_id=inst.id, runner_url=None, data=data,
                             price_per_hour=inst.price_per_hour, gpu=canonical_gpu(name, vram) if name else None)

    # ---- the tunnel

    def _close_tunnel(self, iid: str) -> None:
        tunnel = self._tunnels.pop(iid, None)
        if tunnel is not None:
            tunnel.close()

    async def _tunnel(self, handle: MachineHandle, inst: Instance) -> _Tunnel:
        self._loop_state()
        iid = handle.machine_id
        lock = self._tunnel_locks.setdefault(iid, asyncio.Lock())
        async with lock:
            tunnel = self._tunnels.get(iid)
            ssh_port = await self._ssh_port(inst)
            assert inst.ip is not None
            if tunnel is not None and tunnel.alive() and tunnel.target == (inst.ip, ssh_port):
                return tunnel
            previous = tunnel.port if tunnel is not None else 0
            self._close_tunnel(iid)
            tunnel = await self._open_tunnel(handle, inst.ip, ssh_port, previous)
            self._tunnels[iid] = tunnel
            return tunnel

    async def _ssh_port(self, inst: Instance) -> int:
        """22 on a real machine. A fake's instances have a loopback IP (a real Lambda instance never has one): the
        fake says which local port stands for the machine's 22 (``GET /_fake/ssh-port/{id}``, no key sent)."""
        if not _is_loopback(inst.ip):
            return SSH_PORT
        try:
            resp = await self.http.get(f"{self.base_url}/_fake/ssh-port/{inst.id}", timeout=10.0)
            if resp.status_code == 200:
                return int(resp.json()["port"])
        except Exception as exc:  # the fake's own endpoint: anything wrong means "not yet"
            raise _Unreachable(f"the fake's SSH port is unknown ({type(exc).__name__})") from None
        raise _Unreachable("the fake's SSH server is not up yet")

    async def _open_tunnel(self, handle: MachineHandle, ip: str, ssh_port: int, prefer_port: int) -> _Tunnel:
        asyncssh = _asyncssh()
        name = str(handle.data.get("ssh_key_name") or handle.data.get("name") or "")
        key_path = self._key_path(name)
        if not name or not key_path.exists():
            raise _Refused(f"the job's SSH key is not in {self.key_dir} (was the workspace moved?): the machine "
                           "cannot be reached")
        try:
            client_key = asyncssh.read_private_key(str(key_path))
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            raise _Refused(f"the job's SSH key {key_path} cannot be read ({type(exc).__name__})") from None
        host_path = self._host_path(name)
        known: Any = None  # first connection: record the host key (trust on first use; see the module doc)
        if host_path.exists():
            try:
                known = ([asyncssh.import_public_key(host_path.read_text())], [], [])
            except (OSError, ValueError, asyncssh.KeyImportError) as exc:
                raise _Refused(f"the recorded SSH host key {host_path} cannot be read ({type(exc).__name__})") from None
        user = str(handle.data.get("ssh_user") or self.ssh_user)
        try:
            conn = await asyncio.wait_for(asyncssh.connect(
                ip, ssh_port, username=user, client_keys=[client_key], known_hosts=known, config=[], agent_path=None,
                password_auth=False, kbdint_auth=False, gss_auth=False, host_based_auth=False,
                keepalive_interval=15, keepalive_count_max=4, connect_timeout=self.ssh_timeout_s,
            ), self.ssh_timeout_s + 5)
        except asyncssh.HostKeyNotVerifiable:
            raise _Refused(f"its SSH host key changed since the first connection ({host_path}): refused (not the "
                           "machine it was, or it was rebuilt)") from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise _Unreachable(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        try:
            if known is None:
                host_key = conn.get_server_host_key()
                if host_key is not None:
                    host_path.write_text(host_key.export_public_key().decode("ascii"))
            runner_port = int(handle.data.get("runner_port") or 8765)
            listener = None
            for port in dict.fromkeys([prefer_port, 0]):
                try:
                    listener = await conn.forward_local_port("127.0.0.1", port, "127.0.0.1", runner_port)
                    break
                except OSError:
                    continue
            if listener is None:
                raise _Unreachable("no local port for the tunnel")
        except BaseException:
            conn.close()
            raise
        return _Tunnel(conn, listener, int(listener.get_port()), (ip, ssh_port), asyncio.get_running_loop())

    async def aclose(self) -> None:
        tunnels = list(self._tunnels.values())
        self._tunnels.clear()
        for tunnel in tunnels:
            tunnel.close()
        for tunnel in tunnels:
            if tunnel.loop is asyncio.get_running_loop():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(tunnel.conn.wait_closed(), 2.0)

    # ---- offers

    async def offers(self, resources: Resources) -> list[Offer]:
        """What Lambda rents now for ``resources`` from ``/instance-types``: one offer per instance type with
        ``gpu_count`` GPUs and region with capacity (one unavailable offer for a type with none), price of the whole
        machine, cheapest first. ``gpu`` is the shared vocabulary, ``provider_gpu`` Lambda's own GPU description;
        ``data["instance_type"]`` and ``region`` launch exactly this offer."""
        api = self._client()
        cap = resources.max_price_per_hour
        region = _region(resources.region, "resources.region") or None
        out: list[Offer] = []
        for t in await self._catalog(api):
            if t.gpus != resources.gpu_count or (resources.gpu and not self._matches(resources.gpu, t)):
                continue
            if cap is not None and t.price_per_hour > cap + 1e-9:
                continue
            data = {"instance_type": t.name, "description": t.description, "vcpus": t.vcpus,
                    "memory_gib": t.memory_gib, "storage_gib": t.storage_gib, "memory_gb": t.vram_gb}
            regions = [r for r in t.regions if region is None or r == region]
            places: list[tuple[str | None, bool]] = [(r, True) for r in regions] or [(region, False)]
            for r, available in places:
                out.append(Offer(provider=self.name, gpu=self.canonical(t), gpu_count=t.gpus,
                                 price_per_hour=t.price_per_hour, region=r, available=available,
                                 data={**data, "region": r} if r else dict(data), vram_gb=t.vram_gb,
                                 provider_gpu=t.gpu_description))
        return sorted(out, key=lambda o: (not o.available, o.price_per_hour, o.gpu, o.region or ""))

    # ---- the dead-man switch

    def on_exit_hook(self) -> str:
        """``sudo -n shutdown -h now``: the runner halts its VM when its life ends. Lambda has no key scoped to one
        instance, so the machine cannot terminate itself, and a halted Lambda VM is still billed: the reap list
        (and ``%train cleanup``) terminates it. See the module docstring."""
        return DEADMAN_HOOK


def _region(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    region = str(value).strip().lower()
    if region not in REGIONS:
        raise SpecError(where, f"{value!r} is not a Lambda region; give one of {', '.join(sorted(REGIONS))}")
    return region


def _image(value: str | None) -> dict[str, str] | None:
    """``resources.image`` on Lambda: ``family:<name>`` or ``id:<id>`` of a machine image (Lambda runs VMs, not
    container images); None for Lambda's default (the latest Lambda Stack)."""
    if value is None:
        return None
    kind, sep, what = value.strip().partition(":")
    if sep and kind in ("family", "id") and what.strip() and not any(c.isspace() for c in what.strip()):
        return {kind: what.strip()}
    raise SpecError("resources.image", f"Lambda runs virtual machines, not container images: give a machine image as "
                    f"'family:<name>' or 'id:<id>' (default: Lambda Stack), not {value!r}")
