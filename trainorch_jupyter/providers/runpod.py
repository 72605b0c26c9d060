"""The RunPod provider (REST v2): a GPU pod whose start command brings up the runner, reached over TCP.

Provisioning only (:mod:`.runpod_api` is the HTTP client; :mod:`trainorch_jupyter.remote` the stage-0 and the
pinned channel). What it does, and how it keeps money safe:

- **Tag before create.** Every pod is named ``trainorch-<workspace id>-<job id>`` before it is created, so
  :meth:`RunPodProvider.reconcile` (by job) and :meth:`RunPodProvider.list_machines` (every pod of this tool,
  for ``%train cleanup``) find it again from RunPod's own list.
- **Nothing is created that cannot be afforded or cannot start**: the key is checked by :meth:`validate`
  (before the job is even written), the GPU name is resolved against the catalog, and the catalog's list
  price (x GPU count, for the chosen cloud) is compared with ``resources.max_price_per_hour`` before the
  create call; a pod that then bills more than the cap is destroyed at once.
- **A create that may have made a pod** (a 5xx, a timeout, a cut connection: RunPod can fail a create yet
  make the pod) is never retried: the pods named with the job's tag are listed, one healthy pod is adopted,
  and every other is destroyed. If that cannot be settled the error goes up and the orchestrator's reap list
  (its persisted "create" intent) looks for the tag again until it is.
- **Every wait ends**: :meth:`poll` turns ``EXITED``/``ERROR`` into FAILED and a missing pod (404, or a
  preemption) into GONE, each with its reason; the orchestrator's deadline is ``provision_timeout_s``.
- **Terminate** deletes and then confirms by reading the pod back (404 = gone; "already gone" is success);
  every other error propagates so the orchestrator retries through its reap list.
- **Dead-man switch**: :meth:`RunPodProvider.self_destroy_hook` is the runner's ``--on-exit`` command: it
  deletes its own pod with the pod-scoped key RunPod puts in the pod (``$RUNPOD_API_KEY``), never the user's;
  its code rides in the pod's environment (``TRAINORCH_DEADMAN``) so that the stage-0 command stays short.

Provider config (``Orchestrator(provider_config={"runpod": {...}})``), all optional:

=====================  =======================================================================================
``workspace_id``       the workspace's id in pod names (the orchestrator passes ``Store.workspace_id()``;
                       default: a hash of the workspace path). Letters and digits only.
``base_url``           the API (default ``$TRAINORCH_RUNPOD_URL``, else ``https://api.runpod.io``)
``image``              container image when the spec has none (default :data:`DEFAULT_IMAGE`)
``cloud``              ``SECURE`` (default) or ``COMMUNITY`` when the spec has none
``gpu``                GPU when the spec has none (default: the cheapest one in stock within the price cap)
``volume_gb``          a persistent volume at /workspace (default none: the container disk is enough)
``min_cuda_version``   lowest host CUDA (default ``12.8`` with the default image, else none)
``data_center_ids``    allowed data centers (the spec's ``resources.region`` wins; comma-separated)
``port``               the container port exposed as ``<port>/tcp`` (default 8765); the stage-0 listens on
                       ``$RUNPOD_TCP_PORT_<port>`` when RunPod sets it (a symmetric mapping: RunPod documents
                       one for ports above 70000, e.g. ``70000``), else on the bootstrap's port
``provision_timeout_s``  seconds from create to a reachable runner (default 1200)
``api_timeout_s``, ``create_timeout_s``, ``max_attempts``, ``api_backoff_s``: the API client's
``timeout_s``/``create_timeout_s``/``max_attempts``/``backoff_s``;
``catalog_ttl_s``      how long a fetched GPU catalog is reused (default 60)
``adopt_wait_s``       how long a failed create's pod is looked for by name (default 6)
=====================  =======================================================================================

The API key is never config: it comes from ``RUNPOD_API_KEY`` or the system keyring (:mod:`trainorch_jupyter.keys`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import os
import re
import shlex
import time
import zlib
from collections.abc import Iterable
from typing import Any

from .. import keys
from ..model import Job, JobSpec, ProviderError, Resources, SpecError
from . import Bootstrap, MachineHandle, MachineStatus, Offer, PollResult, Provider
from .runpod_api import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    GpuType,
    Pod,
    RateLimitPacer,
    RunPodAPI,
    RunPodAuthError,
    RunPodError,
    RunPodNoCapacity,
    RunPodUnavailable,
    check_base_url,
    pod_create_body,
)

__all__ = [
    "DEADMAN_ENV",
    "DEFAULT_IMAGE",
    "GPU_ALIASES",
    "TAG_PREFIX",
    "PriceAboveMax",
    "RunPodProvider",
    "deadman_code",
    "normalise_gpu",
    "parse_tag",
]

log = logging.getLogger(__name__)

#: a PyTorch CUDA image of RunPod's (CUDA 12.8.1, torch 2.8, Ubuntu 24.04: python3 3.12)
DEFAULT_IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"
DEFAULT_IMAGE_MIN_CUDA = "12.8"
DEFAULT_PORT = 8765
#: every pod this tool makes is named ``trainorch-<workspace id>-<job id>``
TAG_PREFIX = "trainorch-"
MAX_GPUS = 8  # the largest RunPod machine has 8 GPUs (the catalog's maxCount says per type and cloud)
CLOUDS = ("SECURE", "COMMUNITY")

#: catalog id -> the short names people use (matched after :func:`normalise_gpu`); the catalog's own ``name``
#: and id are matched too, so a GPU missing here is still found at launch.
GPU_ALIASES: dict[str, tuple[str, ...]] = {
    "NVIDIA GeForce RTX 4090": ("RTX 4090", "4090"),
    "NVIDIA GeForce RTX 5090": ("RTX 5090", "5090"),
    "NVIDIA GeForce RTX 3090": ("RTX 3090", "3090"),
    "NVIDIA RTX A6000": ("RTX A6000", "A6000"),
    "NVIDIA RTX A5000": ("RTX A5000", "A5000"),
    "NVIDIA RTX A4000": ("RTX A4000", "A4000"),
    "NVIDIA RTX 6000 Ada Generation": ("RTX 6000 Ada", "6000 Ada"),
    "NVIDIA RTX 4000 Ada Generation": ("RTX 4000 Ada", "4000 Ada"),
    "NVIDIA L40S": ("L40S",),
    "NVIDIA L40": ("L40",),
    "NVIDIA L4": ("L4",),
    "NVIDIA A40": ("A40",),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe", "A100 80GB", "A100"),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM", "A100 SXM4"),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", "H100 80GB", "H100"),
    "NVIDIA H100 PCIe": ("H100 PCIe",),
    "NVIDIA H100 NVL": ("H100 NVL",),
    "NVIDIA H200": ("H200 SXM", "H200"),
    "NVIDIA B200": ("B200",),
    "AMD Instinct MI300X OAM": ("MI300X",),
}
_VENDOR_WORDS = re.compile(r"\b(nvidia|geforce|amd|instinct)\b")
_WORKSPACE_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_DATA_CENTER = re.compile(r"^[A-Z]{2,4}-[A-Z0-9]{2,6}-\d{1,3}$")  # US-KS-2, EUR-IS-1, CA-MTL-1
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_CONFIG_KEYS = frozenset({
    "workspace_id", "base_url", "image", "cloud", "gpu", "volume_gb", "min_cuda_version", "data_center_ids", "port",
    "provision_timeout_s", "api_timeout_s", "create_timeout_s", "max_attempts", "api_backoff_s", "catalog_ttl_s",
    "adopt_wait_s",
})


def normalise_gpu(name: str) -> str:
    """``"NVIDIA GeForce RTX 4090"``, ``"RTX 4090"``, ``"rtx-4090"`` -> ``"rtx4090"`` (for matching only)."""
    return re.sub(r"[^a-z0-9]", "", _VENDOR_WORDS.sub("", name.lower()))


_ALIAS_INDEX: dict[str, str] = {}
for _gpu_id, _names in GPU_ALIASES.items():
    for _n in (_gpu_id, *_names):
        _ALIAS_INDEX.setdefault(normalise_gpu(_n), _gpu_id)


def parse_tag(name: str) -> tuple[str, str] | None:
    """``"trainorch-ab12cd34-myjob-20260101-120000-abcdef"`` -> ``("ab12cd34", "myjob-20260101-...")``; None
    for a name this tool did not make."""
    if not name.startswith(TAG_PREFIX):
        return None
    workspace_id, sep, job_id = name[len(TAG_PREFIX):].partition("-")
    if not sep or not workspace_id or not job_id or not _WORKSPACE_ID.match(workspace_id):
        return None
    return workspace_id, job_id


class PriceAboveMax(ProviderError):
    """The machine would cost more per hour than ``resources.max_price_per_hour`` allows."""


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.2f}/h"


class RunPodProvider(Provider):
    """RunPod pods through REST v2. See the module docstring for the config keys and the money-safety rules."""

    name = "runpod"
    remote = True
    provision_timeout_s = 20 * 60.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg = dict(self.config)
        unknown = sorted(set(cfg) - _CONFIG_KEYS)
        if unknown:
            raise SpecError("provider_config.runpod", f"unknown keys {unknown}; known: {', '.join(sorted(_CONFIG_KEYS))}")
        try:
            self.base_url = check_base_url(str(cfg.get("base_url") or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL))
        except ValueError as exc:
            raise SpecError(BASE_URL_ENV, str(exc)) from None
        ws = cfg.get("workspace_id")
        if ws is None:
            ws = hashlib.sha256(str(self.workspace).encode()).hexdigest()[:8]
        if not isinstance(ws, str) or not _WORKSPACE_ID.match(ws):
            raise SpecError("provider_config.runpod.workspace_id", f"must be 1-32 letters or digits, got {ws!r}")
        self.workspace_id = ws
        self.image = str(cfg.get("image") or "") or None
        self.cloud = _cloud(cfg.get("cloud"), "provider_config.runpod.cloud") or "SECURE"
        self.default_gpu = str(cfg.get("gpu") or "") or None
        self.volume_gb = int(cfg["volume_gb"]) if cfg.get("volume_gb") else None
        self.min_cuda_version: str | None = cfg.get("min_cuda_version") if "min_cuda_version" in cfg else "default"
        self.data_center_ids = _data_centers(cfg.get("data_center_ids"), "provider_config.runpod.data_center_ids")
        self.port = int(cfg.get("port") or DEFAULT_PORT)
        if "provision_timeout_s" in cfg:
            self.provision_timeout_s = float(cfg["provision_timeout_s"])
        self.catalog_ttl_s = float(cfg.get("catalog_ttl_s", 60.0))
        self.adopt_wait_s = float(cfg.get("adopt_wait_s", 6.0))
        self._api_options: dict[str, Any] = {}
        for key, option in (("api_timeout_s", "timeout_s"), ("create_timeout_s", "create_timeout_s"),
                            ("max_attempts", "max_attempts"), ("api_backoff_s", "backoff_s")):
            if key in cfg:
                self._api_options[option] = cfg[key]
        self._pacer = RateLimitPacer()  # one per provider (per key): pacing survives a key change
        # The API client, made from the key and made again when the key changes (keys.KeyedClient).
        self._clients = keys.KeyedClient(
            self.name, lambda key: RunPodAPI(key, base_url=self.base_url, http=self.http, pacer=self._pacer, **self._api_options),
            lambda: RunPodAuthError(self._missing_key_message()))
        self._catalogs: dict[tuple[str, int], tuple[float, list[GpuType]]] = {}
        self._known_gpus: dict[str, str] = {}  # normalised name -> catalog id, from every catalog fetched

    def __repr__(self) -> str:
        return f"RunPodProvider(base_url={self.base_url!r}, workspace_id={self.workspace_id!r})"

    # ---- the API client and the key

    def _client(self) -> RunPodAPI:
        """The API client, made again when the key changed (it is read at most every keys.KEY_RECHECK_S)."""
        return self._clients.get()

    @staticmethod
    def _missing_key_message() -> str:
        return (f"no RunPod API key: set {API_KEY_ENV} to a key from the RunPod console (Settings > API Keys), or "
                f"store it in the system keyring (`keyring set {keys.KEYRING_SERVICE} runpod`); nothing was created")

    def tag(self, job_id: str) -> str:
        """The pod name of ``job_id``: ``trainorch-<workspace id>-<job id>``."""
        return f"{TAG_PREFIX}{self.workspace_id}-{job_id}"

    # ---- validate (no network: called in the notebook's thread before anything is written)

    def validate(self, spec: JobSpec) -> None:
        if not keys.get_key(self.name):
            raise SpecError("provider", f"runpod: {self._missing_key_message()}")
        r = spec.resources
        gpu = r.gpu or self.default_gpu
        if gpu is not None and self._resolve_offline(gpu) is None:
            raise SpecError("resources.gpu", self._unknown_gpu_message(gpu, sorted(self._display_names())))
        if r.gpu_count > MAX_GPUS:
            raise SpecError("resources.gpu_count", f"RunPod machines have at most {MAX_GPUS} GPUs, got {r.gpu_count}")
        _cloud(getattr(r, "cloud", None), "resources.cloud")
        _data_centers(r.region, "resources.region")
        if r.image is not None and (any(c.isspace() for c in r.image) or len(r.image) > 512):
            raise SpecError("resources.image", f"must be one image reference such as {DEFAULT_IMAGE!r}")

    def _resolve_offline(self, gpu: str) -> str | None:
        """The catalog id of ``gpu`` from the alias table and any catalog fetched so far; a full vendor id
        (``NVIDIA ...``/``AMD ...``) is taken as it is (checked against the catalog at launch)."""
        n = normalise_gpu(gpu)
        found = self._known_gpus.get(n) or _ALIAS_INDEX.get(n)
        if found:
            return found
        if re.match(r"^(nvidia|amd)\s+\S", gpu.strip(), re.IGNORECASE):
            return gpu.strip()
        return None

    def _display_names(self) -> set[str]:
        return {names[0] for names in GPU_ALIASES.values()}

    @staticmethod
    def _unknown_gpu_message(gpu: str, names: Iterable[str]) -> str:
        return (f"RunPod has no GPU called {gpu!r}. Give one of: {', '.join(names)} (or RunPod's full GPU id, e.g. "
                "'NVIDIA GeForce RTX 4090'; the provider's offers() lists what is for rent now)")

    # ---- launch

    async def launch(self, job: Job, bootstrap: Bootstrap) -> MachineHandle:
        api = self._client()
        res = job.spec.resources
        cloud = _cloud(getattr(res, "cloud", None), "resources.cloud") or self.cloud
        count = res.gpu_count
        start = getattr(bootstrap, "start_command", None)
        if start is None:
            raise ProviderError(self.name, "this orchestrator's Bootstrap has no start_command(): a RunPod pod needs the "
                                "remote stage-0 (trainorch_jupyter.remote) to bring up the runner; nothing was created")
        try:
            command = str(start(port_env=f"RUNPOD_TCP_PORT_{self.port}"))
        except ValueError as exc:
            raise ProviderError(self.name, f"the pod's start command could not be made ({exc}); nothing was "
                                "created") from None
        gpu = await self._choose_gpu(api, res, cloud, count)
        price = gpu.price(cloud, count)
        self._check_price(gpu, cloud, count, price, res.max_price_per_hour)
        if gpu.availability == "NONE":
            raise RunPodNoCapacity(self._capacity_message(gpu, cloud, count, await self._alternatives(api, gpu, cloud, count, res)),
                                   operation="check the GPU stock")
        name = self.tag(job.id)
        image = res.image or self.image or DEFAULT_IMAGE
        min_cuda = self.min_cuda_version
        if min_cuda == "default":
            min_cuda = DEFAULT_IMAGE_MIN_CUDA if image == DEFAULT_IMAGE else None
        env = {DEADMAN_ENV: deadman_code(self.base_url)}  # public code, no secret: pod reads echo the env
        if self.base_url != DEFAULT_BASE_URL:
            env[BASE_URL_ENV] = self.base_url
        body = pod_create_body(
            name=name, image=image, gpu_id=gpu.id, gpu_count=count, cloud=cloud, disk_gb=res.disk_gb,
            volume_gb=self.volume_gb, ports=[f"{self.port}/tcp"], env=env, args="bash -c " + shlex.quote(command),
            data_center_ids=_data_centers(res.region, "resources.region") or self.data_center_ids or None,
            min_cuda_version=min_cuda or None,
        )
        adopted = False
        try:
            pod = await api.create_pod(body)
        except RunPodNoCapacity as exc:
            alternatives = await self._alternatives(api, gpu, cloud, count, res)
            raise RunPodNoCapacity(self._capacity_message(gpu, cloud, count, alternatives), status=exc.status,
                                   title=exc.title, detail=exc.detail, operation=exc.operation) from None
        except RunPodUnavailable as exc:
            if not exc.maybe_created:
                raise
            pod = await self._adopt(api, name, exc)
            adopted = True
        handle = self._handle(pod, job_id=job.id, cloud=cloud, gpu=gpu, count=count, list_price=price, image=image,
                              adopted=adopted)
        cap = res.max_price_per_hour
        if cap is not None and pod.cost_per_hr > cap + 1e-9:
            fate = "it was destroyed"
            try:
                await api.terminate_pod(pod.id)
            except RunPodError:  # the orchestrator's reconcile finds it by its tag and tries again
                fate = "it is being destroyed"
            raise PriceAboveMax(self.name, f"the pod for {gpu.name} x{count} on {cloud} cloud bills "
                                f"{_usd(pod.cost_per_hr)}, above the max price {_usd(cap)}; {fate}. Raise the max "
                                "price (--max-price) or choose a cheaper GPU or cloud")
        return handle

    async def _choose_gpu(self, api: RunPodAPI, res: Resources, cloud: str, count: int) -> GpuType:
        catalog = await self._catalog(api, cloud, count)
        wanted = res.gpu or self.default_gpu
        if wanted is not None:
            gpu = self._resolve(wanted, catalog)
            if gpu is None:
                raise SpecError("resources.gpu", self._unknown_gpu_message(wanted, sorted({g.name for g in catalog})))
            if not gpu.offered(cloud):
                other = "COMMUNITY" if cloud == "SECURE" else "SECURE"
                raise RunPodNoCapacity(f"RunPod does not offer {gpu.name} on {cloud} cloud (only up to "
                                       f"{gpu.max_count(other)} on {other}): choose --cloud {other.lower()} or "
                                       "another GPU", operation="check the GPU catalog")
            if gpu.max_count(cloud) < count:
                raise SpecError("resources.gpu_count", f"RunPod's {gpu.name} machines on {cloud} cloud have at most "
                                f"{gpu.max_count(cloud)} GPUs, not {count}: ask for fewer GPUs")
            return gpu
        # No GPU named: the cheapest one in stock (within the price cap).
        cap = res.max_price_per_hour
        choices = sorted((g for g in catalog if g.offered(cloud) and g.max_count(cloud) >= count
                          and g.availability not in (None, "NONE") and g.price(cloud, count) is not None
                          and (cap is None or (g.price(cloud, count) or 0.0) <= cap + 1e-9)),
                         key=lambda g: (g.price(cloud, count) or 0.0, -g.memory_gb))
        if not choices:
            raise RunPodNoCapacity(f"RunPod has no GPU in stock for {count} GPU(s) on {cloud} cloud"
                                   f"{' within ' + _usd(cap) if cap is not None else ''} right now: raise the max "
                                   "price, try the other cloud (--cloud), fewer GPUs, or later",
                                   operation="check the GPU stock")
        return choices[0]

    def _resolve(self, wanted: str, catalog: list[GpuType]) -> GpuType | None:
        by_id = {g.id.lower(): g for g in catalog}
        if wanted.strip().lower() in by_id:
            return by_id[wanted.strip().lower()]
        n = normalise_gpu(wanted)
        matches = {g.id: g for g in catalog if n in (normalise_gpu(g.id), normalise_gpu(g.name))}
        if len(matches) == 1:
            return next(iter(matches.values()))
        alias = _ALIAS_INDEX.get(n)
        if alias is not None and alias.lower() in by_id:
            return by_id[alias.lower()]
        return None

    async def _catalog(self, api: RunPodAPI, cloud: str, count: int) -> list[GpuType]:
        """GPU types with their stock for ``count`` GPUs on ``cloud`` (reused for ``catalog_ttl_s``)."""
        cached = self._catalogs.get((cloud, count))
        if cached is not None and time.monotonic() - cached[0] < self.catalog_ttl_s:
            return cached[1]
        gpus = await api.list_gpu_types(availability=True, cloud=cloud, gpu_count=count)
        self._catalogs[(cloud, count)] = (time.monotonic(), gpus)
        for g in gpus:
            self._known_gpus.setdefault(normalise_gpu(g.id), g.id)
            self._known_gpus.setdefault(normalise_gpu(g.name), g.id)
        return gpus

    def _check_price(self, gpu: GpuType, cloud: str, count: int, price: float | None, cap: float | None) -> None:
        if cap is None:
            return
        if price is None:
            raise PriceAboveMax(self.name, f"RunPod lists no price for {gpu.name} on {cloud} cloud, so the max price "
                                f"{_usd(cap)} cannot be checked: choose another GPU or cloud; nothing was created")
        if price > cap + 1e-9:
            other = "COMMUNITY" if cloud == "SECURE" else "SECURE"
            other_price = gpu.price(other, count) if gpu.offered(other) else None
            hint = (f", or --cloud {other.lower()} ({_usd(other_price)})"
                    if other_price is not None and other_price <= cap else "")
            raise PriceAboveMax(self.name, f"{gpu.name} x{count} on {cloud} cloud costs {_usd(price)}, above the max "
                                f"price {_usd(cap)}: raise --max-price, choose a cheaper GPU{hint}; nothing was created")

    async def _alternatives(self, api: RunPodAPI, gpu: GpuType, cloud: str, count: int, res: Resources) -> list[str]:
        """GPUs in stock now for the same request (from the catalog), cheapest first, as 'RTX A6000 $0.49/h'."""
        try:
            catalog = await self._catalog(api, cloud, count)
        except RunPodError:
            return []
        cap = res.max_price_per_hour
        out = sorted((g for g in catalog if g.id != gpu.id and g.offered(cloud) and g.max_count(cloud) >= count
                      and g.availability not in (None, "NONE") and g.price(cloud, count) is not None
                      and (cap is None or (g.price(cloud, count) or 0.0) <= cap + 1e-9)),
                     key=lambda g: g.price(cloud, count) or 0.0)
        return [f"{g.name} {_usd(g.price(cloud, count))}" for g in out[:4]]

    def _capacity_message(self, gpu: GpuType, cloud: str, count: int, alternatives: list[str]) -> str:
        other = "community" if cloud == "SECURE" else "secure"
        msg = (f"RunPod has no {gpu.name} x{count} free on {cloud} cloud right now. Choose another GPU (--gpu"
               f"{': in stock now ' + ', '.join(alternatives) if alternatives else ''}), try --cloud {other}")
        if count > 1:
            msg += ", ask for fewer GPUs"
        return msg + ", or try again later; nothing is billed for it"

    async def _adopt(self, api: RunPodAPI, name: str, failure: RunPodUnavailable) -> Pod:
        """After a create that may have made the pod: adopt the one healthy pod named ``name`` and destroy any
        other; raise (the orchestrator then reconciles by tag) when that cannot be settled."""
        deadline = time.monotonic() + self.adopt_wait_s
        delay = 0.5
        while True:
            try:
                pods = await api.list_pods(name=name)
            except RunPodError as exc:
                raise RunPodUnavailable(f"{failure} Looking for it by name failed too ({exc}); it will be looked "
                                        "for again", maybe_created=True, operation=failure.operation) from None
            if pods or time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)  # a pod made by a failed create may take a moment to be listed
            delay = min(2.0, delay * 2)
        if not pods:
            log.info("RunPod: the create of %s failed and no pod of that name exists", name)
            raise failure
        healthy = sorted((p for p in pods if not p.bad), key=lambda p: p.created_at or "")
        keep = healthy[-1] if healthy else None
        for p in pods:
            if p is keep:
                continue
            try:
                await api.terminate_pod(p.id)
            except RunPodError as exc:
                raise RunPodUnavailable(f"{failure} A pod named {name!r} ({p.id}) was made anyway and could not be "
                                        f"destroyed yet ({exc}); it will be tried again", maybe_created=True,
                                        operation=failure.operation) from None
        if keep is None:
            raise RunPodUnavailable(f"{failure} The pod it made anyway was in a bad state and was destroyed",
                                    operation=failure.operation)
        log.info("RunPod: the create of %s failed but made pod %s: adopted", name, keep.id)
        return keep

    def _handle(self, pod: Pod, *, job_id: str | None, cloud: str | None, gpu: GpuType | None, count: int | None,
                list_price: float | None = None, image: str | None = None, adopted: bool = False) -> MachineHandle:
        parsed = parse_tag(pod.name)
        data: dict[str, Any] = {
            "pod_id": pod.id, "name": pod.name, "workspace_id": parsed[0] if parsed else None,
            "job_id": job_id if job_id is not None else (parsed[1] if parsed else None),
            "cloud": cloud or pod.cloud, "gpu_id": gpu.id if gpu else pod.gpu_id,
            "gpu_count": count if count is not None else pod.gpu_count, "image": image or pod.image,
            "port": self.port, "base_url": self.base_url, "status": pod.status,
        }
        if list_price is not None:
            data["list_price_per_hour"] = list_price
        if adopted:
            data["adopted"] = True
        price = pod.cost_per_hr if pod.cost_per_hr > 0 else list_price
        return MachineHandle(provider=self.name, machine_id=pod.id, runner_url=None, data=data, price_per_hour=price,
                             gpu=gpu.name if gpu else pod.gpu_id)

    # ---- poll, terminate, reconcile

    def _same_api(self, handle: MachineHandle) -> None:
        """A pod is only reachable through the API that made it: a 404 from another one (a changed
        TRAINORCH_RUNPOD_URL) must not read as "gone"."""
        made_at = handle.data.get("base_url")
        if made_at and str(made_at).rstrip("/") != self.base_url:
            raise ProviderError(self.name, f"pod {handle.machine_id} was created through {made_at}, but the RunPod "
                                f"API is now {self.base_url}: set {BASE_URL_ENV}={made_at} to reach (and destroy) it",
                                retryable=True)

    async def poll(self, handle: MachineHandle) -> PollResult:
        self._same_api(handle)
        pod = await self._client().find_pod(handle.machine_id)
        if pod is None or pod.status == "TERMINATED":
            return PollResult(MachineStatus.GONE, None, f"RunPod has no pod {handle.machine_id} any more: it was "
                              "deleted, or RunPod took the machine back (preempted)")
        if pod.status == "ERROR":
            return PollResult(MachineStatus.FAILED, None, f"RunPod reports pod {pod.id} in ERROR (it cannot run: "
                              "bad image, start command or host); it must be destroyed")
        if pod.status == "EXITED":
            return PollResult(MachineStatus.FAILED, None, f"pod {pod.id} is EXITED: it was stopped, or its main "
                              "process ended and RunPod did not restart it (it no longer runs the runner)")
        port = int(handle.data.get("port") or self.port)
        endpoint = pod.tcp_endpoint(port)
        if endpoint is None and port > 65535 and pod.running:
            # A symmetric mapping (RunPod: a port above 70000): it may be listed under the port it got.
            same = [(p.ip, p.public) for p in pod.ports if p.type == "tcp" and p.ip and p.public
                    and p.public == p.private and not _is_cgnat(p.ip)]
            endpoint = same[0] if len(same) == 1 else None
        if endpoint is not None:
            ip, public = endpoint
            host = f"[{ip}]" if ":" in ip else ip
            return PollResult(MachineStatus.READY, f"https://{host}:{public}", f"pod {pod.id} is RUNNING")
        detail = f"pod {pod.id} is {pod.status or 'being created'}"
        if pod.running:
            cgnat = [p for p in pod.ports if p.private == port and p.ip and _is_cgnat(p.ip)]
            detail += (f"; RunPod gave it no public IP for port {port}/tcp (a carrier-grade NAT address): choose "
                       "SECURE cloud or another data center" if cgnat
                       else f"; waiting for RunPod to publish port {port}/tcp")
        return PollResult(MachineStatus.PROVISIONING, None, detail)

    async def terminate(self, handle: MachineHandle) -> None:
        """Delete the pod and confirm it is gone (404 on read). "Already gone" is success; any other error
        propagates (the orchestrator keeps the pod on its reap list and tries again)."""
        self._same_api(handle)
        await self._client().terminate_pod(handle.machine_id)

    async def reconcile(self, job: Job) -> list[MachineHandle]:
        """The pods named with ``job``'s tag (after a create error, or a crash between create and record)."""
        pods = await self._client().list_pods(name=self.tag(job.id))
        return [self._handle(p, job_id=job.id, cloud=None, gpu=None, count=None) for p in pods]

    async def list_machines(self) -> list[MachineHandle]:
        """Every pod of this tool on the account (named ``trainorch-<workspace>-<job>``), of any workspace.

        Each handle's ``data`` has ``workspace_id``, ``job_id``, ``status``, ``this_workspace`` (made from
        this workspace); ``price_per_hour`` is what it bills now. Destroy one with :meth:`terminate`."""
        pods = await self._client().list_pods(name_prefix=TAG_PREFIX)
        out = []
        for p in pods:
            handle = self._handle(p, job_id=None, cloud=None, gpu=None, count=None)
            handle.price_per_hour = p.cost_per_hr
            handle.data["this_workspace"] = handle.data["workspace_id"] == self.workspace_id
            out.append(handle)
        return out

    # ---- offers

    async def offers(self, resources: Resources) -> list[Offer]:
        """What RunPod rents now for ``resources`` from its GPU catalog: one offer per GPU type and cloud
        (both clouds unless one is asked for), with the list price of ``gpu_count`` GPUs, cheapest first."""
        api = self._client()
        asked = _cloud(getattr(resources, "cloud", None), "resources.cloud")
        count = resources.gpu_count
        cap = resources.max_price_per_hour
        out: list[Offer] = []
        for cloud in (asked,) if asked else CLOUDS:
            catalog = await self._catalog(api, cloud, count)
            wanted = self._resolve(resources.gpu, catalog) if resources.gpu else None
            if resources.gpu and wanted is None:
                continue
            for g in catalog:
                price = g.price(cloud, count)
                if (wanted is not None and g.id != wanted.id) or not g.offered(cloud) or g.max_count(cloud) < count:
                    continue
                if price is None or (cap is not None and price > cap + 1e-9):
                    continue
                out.append(Offer(provider=self.name, gpu=g.name, gpu_count=count, price_per_hour=price, region=None,
                                 available=g.availability not in (None, "NONE"),
                                 data={"gpu_id": g.id, "cloud": cloud, "memory_gb": g.memory_gb,
                                       "availability": g.availability, "data_centers": list(g.data_centers),
                                       "max_count": g.max_count(cloud)}))
        return sorted(out, key=lambda o: (not o.available, o.price_per_hour, o.gpu))

    # ---- the dead-man switch

    def on_exit_hook(self) -> str:
        """:meth:`self_destroy_hook` for this provider's pods (for ``Bootstrap.on_exit``)."""
        return self.self_destroy_hook(self.base_url)

    @classmethod
    def self_destroy_hook(cls, base_url: str = DEFAULT_BASE_URL, *, inline: bool = False) -> str:
        """The runner's ``--on-exit`` shell command on a RunPod pod: delete this pod.

        The code (:func:`deadman_code`) runs inside the pod with what RunPod puts there: ``$RUNPOD_POD_ID`` and
        the pod-scoped key ``$RUNPOD_API_KEY`` (read from the environment; never on a command line), against
        ``$TRAINORCH_RUNPOD_URL`` or else ``base_url``: ``DELETE /v2/pods/<id>`` retried with backoff, 404 =
        gone; a key that may not delete (401/403) stops the pod instead (no GPU billed, only its disk).
        Python 3 stdlib (urllib) only: no curl needed.

        By default the command is short (``python3 -c "${TRAINORCH_DEADMAN:?}"``): :meth:`launch` puts the code
        in the pod's environment (``TRAINORCH_DEADMAN``), because the hook travels inside the stage-0 command,
        whose length is bounded (Vast.ai's limit). It fails loudly where that variable is missing. ``inline``
        gives a self-contained command instead (~700 characters; single-quoted once, no single quote inside)."""
        if not inline:
            return f'python3 -c "${{{DEADMAN_ENV}:?}}"'
        blob = base64.b64encode(zlib.compress(deadman_code(base_url).encode(), 9)).decode()
        return f"python3 -c 'import base64,zlib;exec(zlib.decompress(base64.b64decode(\"{blob}\")))'"


#: the pod's environment variable holding the dead-man hook's code (see ``self_destroy_hook``)
DEADMAN_ENV = "TRAINORCH_DEADMAN"

# The dead-man hook's code (run by the pod's python3; 3.6+ compatible). ``@BASE@``: the API.
# DELETE this pod (8 tries, backoff; 404 = gone); a key that may not delete (401/403): stop the pod instead.
_HOOK_SOURCE = """\
import json,os,sys,time,urllib.request as u
E=os.environ;b=(E.get("TRAINORCH_RUNPOD_URL") or "@BASE@").rstrip("/");p=E.get("RUNPOD_POD_ID");k=E.get("RUNPOD_API_KEY")
if not(p and k):sys.exit("dead-man hook: no RUNPOD_POD_ID/RUNPOD_API_KEY")
def c(m,t="",d=None):
 try:return u.urlopen(u.Request(b+"/v2/pods/"+p+t,d,{"Authorization":"Bearer "+k,"Content-Type":"application/json"},method=m),timeout=30).status
 except u.HTTPError as e:return e.code
 except Exception:return 0
for n in range(8):
 r=c("DELETE")
 if r in(200,204,404):sys.exit(0)
 if r in(401,403):sys.exit(0 if c("POST","/action",json.dumps({"action":"stop"}).encode())in(200,204) else "dead-man hook: key refused")
 time.sleep(min(30,2**n))
sys.exit("dead-man hook: pod not deleted")
"""


def deadman_code(base_url: str = DEFAULT_BASE_URL) -> str:
    """The Python source of the dead-man hook for pods of the API at ``base_url``."""
    return _HOOK_SOURCE.replace("@BASE@", check_base_url(base_url))


def _is_cgnat(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in _CGNAT
    except ValueError:
        return False


def _cloud(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value.strip().upper() not in CLOUDS:
        raise SpecError(where, f"must be 'secure' or 'community' (RunPod's clouds), got {value!r}")
    return value.strip().upper()


def _data_centers(value: Any, where: str) -> list[str]:
    """``"US-KS-2, EU-RO-1"`` or a list -> ``["US-KS-2", "EU-RO-1"]``; SpecError for anything else."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise SpecError(where, "must be RunPod data center ids such as 'US-KS-2' (comma-separated)")
    out = []
    for item in items:
        dc = str(item).strip().upper()
        if not _DATA_CENTER.match(dc):
            raise SpecError(where, f"{item!r} is not a RunPod data center id such as 'US-KS-2' or 'EU-RO-1'")
        out.append(dc)
    return out
