"""The Vast.ai provider: an instance rented from an offer, whose ``onstart`` is the stage-0 that brings up the
runner, reached on a direct TCP port.

Provisioning only (:mod:`.vast_api` is the HTTP client; :mod:`trainorch_jupyter.remote` the stage-0 and the pinned
channel). What it does, and how it keeps money safe:

- **Tag before create.** Every instance is labelled ``trainorch-<workspace id>-<job id>`` in its create call, so
  :meth:`VastProvider.reconcile` (by job) and :meth:`VastProvider.list_machines` (every instance of this tool, for
  ``%train cleanup``) find it again from Vast's own list.
- **Nothing is created that cannot be afforded or cannot start**: the key is checked by :meth:`validate`, the start
  is checked against Vast's limits (``onstart`` + ``args`` <= 4,096 characters, each env entry <= 256) before any
  call, and the offers are searched fresh (offers go stale fast) with the job's GPU, count, disk and region; the
  cheapest within ``resources.max_price_per_hour`` is taken (``dph_total``: what Vast charges per hour for the
  whole machine, its disk included). An offer taken by someone else meanwhile (``no_such_ask``) makes the next
  one be tried (``max_offers_tried``); when none is left the error is a :class:`~trainorch_jupyter.model.CapacityError`
  (``--provider auto`` falls over on it). An instance that then bills more than the cap fails its poll (and is
  destroyed by the orchestrator).
- **A create that may have made an instance** (a 5xx, a timeout, a cut connection) is never retried: the
  instances labelled with the job's tag are listed, one healthy instance is adopted and every other destroyed. A
  create that *fails yet names the instance it made* (``new_contract``: an interruptible bid below the minimum
  leaves a stopped instance billing its disk) adopts it when it is coming up, and destroys it otherwise before
  the next offer is tried. What cannot be settled goes up; the orchestrator's reap list looks for the tag again.
- **Every wait ends**: ``actual_status`` goes ``null`` -> ``loading`` -> ``running`` and ``ports`` appears late;
  :meth:`poll` turns ``exited``/``unknown``/``offline``, an OCI runtime error and an all-``stopped`` contract (an
  interruptible one outbid) into FAILED, a missing instance into GONE, each with its reason; the orchestrator's
  deadline is ``provision_timeout_s`` (10 minutes by default, as dstack's; large images may need more). Polls of
  many instances share one paged list call (``GET /api/v1/instances/`` filtered by id), as Vast's limits ask.
- **Terminate** destroys and then confirms by reading the instance back (``{"instances": null}`` = gone; "already
  gone" is success); every other error propagates so the orchestrator retries through its reap list.
- **Reaching the runner**: the instance asks for one direct port (``-p <port>:<port>`` in its env). The default
  port, 70000, is above 65535: Vast then gives identical internal and external numbers and tells the machine which
  in ``$VAST_TCP_PORT_70000``, where the stage-0 listens; the orchestrator reaches
  ``https://<public_ipaddr>:<that port>`` (TLS pinned to the job's own certificate). A ``port`` below 65536 is
  mapped by Vast to a random external port instead (``ports["<port>/tcp"]``); the stage-0 then listens on the
  port itself. Offers need ``direct_port_count >= 1``.
- **Dead-man switch**: :meth:`VastProvider.on_exit_hook` is the runner's ``--on-exit`` command: it destroys its own
  instance with the key Vast puts in the container (``$CONTAINER_API_KEY``, which can start, stop or destroy only
  that instance) for ``$CONTAINER_ID``, never the user's key; a key that may not destroy stops it instead (then
  only its disk bills). Its code (Python 3 stdlib, base64) rides in the instance's environment split into
  ``TJDM0..`` (each env entry <= 256 characters), so the hook in the stage-0 stays ~80 characters.

Provider config (``Orchestrator(provider_config={"vast": {...}})``), all optional:

=====================  =======================================================================================
``workspace_id``       the workspace's id in labels (the orchestrator passes ``Store.workspace_id()``)
``base_url``           the API (default ``$TRAINORCH_VAST_URL``, else ``https://console.vast.ai``)
``image``              container image when the spec has none (default :data:`DEFAULT_IMAGE`)
``port``               the runner's direct port (default 70000: identical numbers; see above)
``provision_timeout_s``  seconds from create to a reachable runner (default 600)
``interruptible``      rent interruptible (a bid of the offer's ``min_bid`` x (1 + ``bid_margin``)); default False
``bid_margin``         default 0.1
``min_reliability``    lowest ``reliability2`` of an offer (default 0.95)
``min_inet_down``      lowest download bandwidth, MB/s (default 100: images must be pulled)
``min_cuda``           lowest ``cuda_max_good`` (default 12.8 with the default image, else none)
``verified``           only verified machines (default True)
``max_offers_tried``   offers tried by one launch when they are taken meanwhile (default 3)
``search_limit``       offers asked of one search (default 64)
``poll_cache_s``       how long one instance list serves every poll (default 2.0)
``min_intervals``      seconds between calls per endpoint class (search, create, destroy, show, list, manage,
                       user), over :data:`~.vast_api.DEFAULT_MIN_INTERVALS` (Vast's own limits)
``api_timeout_s``, ``create_timeout_s``, ``max_attempts``, ``api_backoff_s``: the API client's
``timeout_s``/``create_timeout_s``/``max_attempts``/``backoff_s``;
``adopt_wait_s``       how long a failed create's instance is looked for by label (default 6)
=====================  =======================================================================================

The API key is never config: it comes from ``VAST_API_KEY`` or the system keyring (:mod:`trainorch_jupyter.keys`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

from .. import keys
from ..gpus import canonical_gpu, matches
from ..model import Job, JobSpec, ProviderError, Resources, SpecError
from . import Bootstrap, MachineHandle, MachineStatus, Offer, PollResult, Provider
from .runpod import TAG_PREFIX, PriceAboveMax, parse_tag
from .vast_api import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    ENV_ENTRY_MAX,
    MIN_DISK_GB,
    Instance,
    VastAPI,
    VastAuthError,
    VastCreateFailed,
    VastError,
    VastNoCapacity,
    VastOffer,
    VastPacer,
    VastUnavailable,
    check_base_url,
    instance_create_body,
    offer_query,
)

__all__ = [
    "DEADMAN_ENV_PREFIX",
    "DEFAULT_IMAGE",
    "DEFAULT_PORT",
    "VAST_GPU_NAMES",
    "VastProvider",
    "deadman_code",
    "deadman_env",
]

log = logging.getLogger(__name__)

#: PyTorch's own CUDA image (CUDA 12.8, torch 2.8; its python3 is the image's conda Python 3.11)
DEFAULT_IMAGE = "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime"
DEFAULT_IMAGE_MIN_CUDA = 12.8
#: above 65535: Vast gives identical internal and external numbers (``$VAST_TCP_PORT_70000`` says which)
DEFAULT_PORT = 70000
MAX_GPUS = 16
RUNTYPE = "ssh"  # Vast's init runs ``onstart`` (our stage-0) and keeps the container up; the image's python3 runs it

#: canonical GPU (:mod:`trainorch_jupyter.gpus`) -> Vast's own ``gpu_name`` values (with spaces, as Vast spells them)
VAST_GPU_NAMES: dict[str, tuple[str, ...]] = {
    "RTX3090": ("RTX 3090",), "RTX4090": ("RTX 4090",), "RTX5090": ("RTX 5090",),
    "A4000": ("RTX A4000",), "A5000": ("RTX A5000",), "A6000": ("RTX A6000",),
    "RTX4000-ADA": ("RTX 4000Ada",), "RTX6000-ADA": ("RTX 6000Ada",),
    "A10": ("A10",), "A40": ("A40",), "L4": ("L4",), "L40": ("L40",), "L40S": ("L40S",),
    "A100": ("A100 SXM4", "A100 PCIE", "A100X"), "A100-40GB": ("A100 SXM4", "A100 PCIE"),
    "A100-80GB": ("A100 SXM4", "A100 PCIE", "A100X"),
    "H100": ("H100 SXM", "H100 PCIE", "H100 NVL"), "H200": ("H200", "H200 NVL"), "GH200": ("GH200 SXM",),
    "B200": ("B200",), "V100": ("Tesla V100",), "T4": ("Tesla T4",),
}
_GPU_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")
_WORKSPACE_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")
_CONFIG_KEYS = frozenset({
    "workspace_id", "base_url", "image", "port", "provision_timeout_s", "interruptible", "bid_margin",
    "min_reliability", "min_inet_down", "min_cuda", "verified", "max_offers_tried", "search_limit", "poll_cache_s",
    "min_intervals", "api_timeout_s", "create_timeout_s", "max_attempts", "api_backoff_s", "adopt_wait_s",
})
_WATCH_FORGET_S = 120.0  # an instance not polled for this long leaves the shared list's filter


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.2f}/h"


class VastProvider(Provider):
    """Vast.ai instances. See the module docstring for the config keys and the money-safety rules."""

    name = "vast"
    remote = True
    provision_timeout_s = 10 * 60.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cfg = dict(self.config)
        unknown = sorted(set(cfg) - _CONFIG_KEYS)
        if unknown:
            raise SpecError("provider_config.vast", f"unknown keys {unknown}; known: {', '.join(sorted(_CONFIG_KEYS))}")
        try:
            self.base_url = check_base_url(str(cfg.get("base_url") or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL))
        except ValueError as exc:
            raise SpecError(BASE_URL_ENV, str(exc)) from None
        ws = cfg.get("workspace_id")
        if ws is None:
            ws = hashlib.sha256(str(self.workspace).encode()).hexdigest()[:8]
        if not isinstance(ws, str) or not _WORKSPACE_ID.match(ws):
            raise SpecError("provider_config.vast.workspace_id", f"must be 1-32 letters or digits, got {ws!r}")
        self.workspace_id = ws
        self.image = str(cfg.get("image") or "") or None
        self.port = int(cfg.get("port") or DEFAULT_PORT)
        if not (0 < self.port < 65536 or 70000 <= self.port < 100000):
            raise SpecError("provider_config.vast.port", f"must be a TCP port, or 70000-99999 for identical numbers; "
                            f"got {self.port}")
        if "provision_timeout_s" in cfg:
            self.provision_timeout_s = float(cfg["provision_timeout_s"])
        self.interruptible = bool(cfg.get("interruptible", False))
        self.bid_margin = float(cfg.get("bid_margin", 0.1))
        self.min_reliability = None if cfg.get("min_reliability", 0.95) is None else float(cfg.get("min_reliability", 0.95))
        self.min_inet_down = None if cfg.get("min_inet_down", 100.0) is None else float(cfg.get("min_inet_down", 100.0))
        self.min_cuda: float | str | None = float(cfg["min_cuda"]) if cfg.get("min_cuda") is not None else (
            None if "min_cuda" in cfg else "default")
        self.verified = bool(cfg.get("verified", True))
        self.max_offers_tried = max(1, int(cfg.get("max_offers_tried", 3)))
        self.search_limit = max(1, int(cfg.get("search_limit", 64)))
        self.poll_cache_s = float(cfg.get("poll_cache_s", 2.0))
        self.adopt_wait_s = float(cfg.get("adopt_wait_s", 6.0))
        intervals = cfg.get("min_intervals") or {}
        if not isinstance(intervals, dict):
            raise SpecError("provider_config.vast.min_intervals", "must map endpoint classes to seconds")
        self._api_options: dict[str, Any] = {}
        for key, option in (("api_timeout_s", "timeout_s"), ("create_timeout_s", "create_timeout_s"),
                            ("max_attempts", "max_attempts"), ("api_backoff_s", "backoff_s")):
            if key in cfg:
                self._api_options[option] = cfg[key]
        self._pacer = VastPacer({k: float(v) for k, v in intervals.items()})  # one per provider: survives a key change
        # The API client, made from the key and made again when the key changes (keys.KeyedClient).
        self._clients = keys.KeyedClient(
            self.name, lambda key: VastAPI(key, base_url=self.base_url, http=self.http, pacer=self._pacer, **self._api_options),
            lambda: VastAuthError(self._missing_key_message()))
        # polls share one list call: ids watched (-> last asked), the last snapshot and the ids it covered
        self._watched: dict[int, float] = {}
        self._snapshot: dict[int, Instance] = {}
        self._snapshot_ids: set[int] = set()
        self._snapshot_at = -1e9
        self._refresh_lock: asyncio.Lock | None = None
        self._refresh_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"VastProvider(base_url={self.base_url!r}, workspace_id={self.workspace_id!r})"

    # ---- the API client and the key

    def _client(self) -> VastAPI:
        """The API client, made again when the key changed (it is read at most every keys.KEY_RECHECK_S)."""
        return self._clients.get()

    @staticmethod
    def _missing_key_message() -> str:
        return (f"no Vast.ai API key: set {API_KEY_ENV} to a key from https://cloud.vast.ai/manage-keys/, or store it in "
                f"the system keyring (`keyring set {keys.KEYRING_SERVICE} vast`); nothing was created")

    def tag(self, job_id: str) -> str:
        """The label of ``job_id``'s instance: ``trainorch-<workspace id>-<job id>``."""
        return f"{TAG_PREFIX}{self.workspace_id}-{job_id}"

    # ---- validate (no network)

    def validate(self, spec: JobSpec) -> None:
        if not keys.get_key(self.name):
            raise SpecError("provider", f"vast: {self._missing_key_message()}")
        r = spec.resources
        if r.gpu is not None and not _GPU_NAME.match(r.gpu.strip()):
            raise SpecError("resources.gpu", f"{r.gpu!r} is not a GPU name; give one such as "
                            f"{', '.join(sorted(VAST_GPU_NAMES)[:8])} or Vast's own ('RTX 4090', 'A100 SXM4')")
        if r.gpu_count > MAX_GPUS:
            raise SpecError("resources.gpu_count", f"Vast.ai machines have at most {MAX_GPUS} GPUs, got {r.gpu_count}")
        if r.disk_gb < MIN_DISK_GB:
            raise SpecError("resources.disk_gb", f"Vast.ai instances need at least {MIN_DISK_GB} GB of disk, got {r.disk_gb}")
        if getattr(r, "cloud", None):
            raise SpecError("resources.cloud", "Vast.ai has no clouds to choose (that is RunPod's secure/community); "
                            "leave it out")
        _countries(r.region, "resources.region")
        if r.image is not None and (any(c.isspace() for c in r.image) or len(r.image) > 1024):
            raise SpecError("resources.image", f"must be one image reference such as {DEFAULT_IMAGE!r}")
        tag = self.tag(spec.name + "-20260101-000000-abcdef")  # a job id is the name plus 23 characters
        if len(tag) > 256:
            raise SpecError("name", "too long for a Vast.ai label (256 characters with the workspace tag)")

    # ---- launch

    async def launch(self, job: Job, bootstrap: Bootstrap) -> MachineHandle:
        api = self._client()
        res = job.spec.resources
        start = getattr(bootstrap, "start_command", None)
        if start is None:
            raise ProviderError(self.name, "this orchestrator's Bootstrap has no start_command(): a Vast.ai instance "
                                "needs the remote stage-0 (trainorch_jupyter.remote) to bring up the runner; nothing "
                                "was created")
        label = self.tag(job.id)
        image = res.image or self.image or DEFAULT_IMAGE
        try:
            if self.port > 65535:  # identical numbers: the machine learns its port from $VAST_TCP_PORT_<port>
                command = str(start(port_env=f"VAST_TCP_PORT_{self.port}"))
            else:  # Vast maps an external port to this one: the stage-0 listens on it
                boot = bootstrap if getattr(bootstrap, "port", self.port) == self.port else dataclasses.replace(
                    bootstrap, port=self.port)
                command = str(boot.start_command(port_env=None))
            # Vast's limits, checked before anything is asked of it (a body it would refuse or cut)
            # cancel_unavail: an error, never a stopped instance, when the offer cannot start now
            base = instance_create_body(image=image, disk_gb=res.disk_gb, label=label, onstart=command,
                                        runtype=RUNTYPE, env=deadman_env(self.base_url), ports=[self.port],
                                        cancel_unavail=True)
        except (ValueError, TypeError) as exc:
            raise ProviderError(self.name, f"the instance's start could not be made for Vast.ai ({exc}); nothing was "
                                "created") from None
        cap = res.max_price_per_hour
        candidates = await self._candidates(api, res)
        tried: list[str] = []
        for offer in candidates[: self.max_offers_tried]:
            body = dict(base)
            bid = self._bid(offer)
            if bid is not None:
                body["price"] = bid
            price = self._price(offer)
            try:
                instance_id = await api.create_instance(offer.ask_id, body)
            except VastNoCapacity as exc:
                tried.append(f"offer {offer.ask_id} ({offer.gpu_name} x{offer.num_gpus} {_usd(price)}): {exc.msg or 'taken'}")
                continue
            except VastCreateFailed as exc:
                kept = await self._settle_failed_create(api, exc, label)
                if kept is None:
                    tried.append(f"offer {offer.ask_id}: the create failed ({exc.error or exc.msg}); the instance it "
                                 f"made ({exc.new_contract}) was destroyed")
                    continue
                return self._handle(kept.id, offer, job_id=job.id, image=image, cap=cap, adopted=True)
            except VastUnavailable as exc:
                if not exc.maybe_created:
                    raise
                inst = await self._adopt(api, label, exc)
                return self._handle(inst.id, offer, job_id=job.id, image=image, cap=cap, adopted=True)
            return self._handle(instance_id, offer, job_id=job.id, image=image, cap=cap)
        raise VastNoCapacity(f"Vast.ai's offers for {self._what(res)} were all taken before they could be rented "
                             f"({'; '.join(tried)}); try again, relax --gpu or --max-price, or use another provider; "
                             "nothing is billed for them", operation="create an instance")

    async def _candidates(self, api: VastAPI, res: Resources) -> list[VastOffer]:
        """Offers that fit ``res`` now, cheapest first; a clear error when there is none (or none within the cap)."""
        offers = await self._search(api, res)
        cap = res.max_price_per_hour
        fitting = sorted(offers, key=self._price)
        within = [o for o in fitting if cap is None or self._price(o) <= cap + 1e-9]
        if within:
            return within
        what = self._what(res)
        if fitting:
            cheapest = fitting[0]
            raise PriceAboveMax(self.name, f"the cheapest Vast.ai offer for {what} costs {_usd(self._price(cheapest))} "
                                f"({cheapest.gpu_name} in {cheapest.geolocation or 'an unknown place'}), above the max "
                                f"price {_usd(cap)}: raise --max-price or choose a cheaper GPU; nothing was created")
        raise VastNoCapacity(f"Vast.ai has no offer for {what} right now{self._filters_note()}: choose another GPU "
                             "(%train offers --provider vast lists what is for rent), fewer GPUs, another region, or "
                             "try later; nothing is billed for it", operation="search offers")

    async def _search(self, api: VastAPI, res: Resources, *, limit: int | None = None) -> list[VastOffer]:
        wanted = res.gpu.strip() if res.gpu else None
        names: tuple[str, ...] = ()
        if wanted:
            names = VAST_GPU_NAMES.get(canonical_gpu(wanted), ()) or (wanted.replace("_", " "),)
        min_cuda = self.min_cuda
        if min_cuda == "default":
            min_cuda = DEFAULT_IMAGE_MIN_CUDA if (res.image or self.image or DEFAULT_IMAGE) == DEFAULT_IMAGE else None
        query = offer_query(
            gpu_names=names, num_gpus=res.gpu_count, disk_gb=res.disk_gb, countries=_countries(res.region, "resources.region"),
            min_reliability=self.min_reliability, min_direct_ports=1, min_inet_down=self.min_inet_down,
            min_cuda=float(min_cuda) if isinstance(min_cuda, float | int) else None, verified=self.verified or None,
            interruptible=self.interruptible, limit=limit or self.search_limit,
        )
        offers = await api.search_offers(query)
        return [o for o in offers if o.num_gpus == res.gpu_count and o.direct_port_count >= 1
                and (wanted is None or matches(wanted, canonical_gpu(o.gpu_name, o.vram_gb)))]

    def _filters_note(self) -> str:
        parts = ["verified" if self.verified else "", f"reliability >= {self.min_reliability:g}" if self.min_reliability else "",
                 f"download >= {self.min_inet_down:g} MB/s" if self.min_inet_down else "", "a direct port"]
        return " (" + ", ".join(p for p in parts if p) + ")"

    @staticmethod
    def _what(res: Resources) -> str:
        return f"{res.gpu or 'any GPU'} x{res.gpu_count} with {res.disk_gb} GB disk" + (
            f" in {res.region}" if res.region else "")

    def _bid(self, offer: VastOffer) -> float | None:
        """The bid for an interruptible instance (None: on-demand)."""
        if not self.interruptible:
            return None
        base = offer.min_bid if offer.min_bid else offer.dph_base
        return round(max(0.001, base * (1.0 + self.bid_margin)), 4)

    def _price(self, offer: VastOffer) -> float:
        """What the instance would bill per hour: ``dph_total`` (its disk included); with a bid, the bid for the GPUs."""
        bid = self._bid(offer)
        if bid is None or offer.min_bid is None:
            return round(offer.dph_total, 4)
        return round(offer.dph_total - offer.min_bid + bid, 4)

    async def _settle_failed_create(self, api: VastAPI, failure: VastCreateFailed, label: str) -> Instance | None:
        """A create failed but made instance ``failure.new_contract``: adopt it when it is coming up, destroy it
        otherwise (None). Raises (the orchestrator reconciles by label) when that cannot be done now."""
        iid = failure.new_contract
        try:
            inst = await api.get_instance(iid)
            if inst is not None and inst.label == label and inst.bad_reason() is None \
                    and inst.intended_status != "stopped" and not inst.released:
                log.info("Vast.ai: the create of %s failed but made instance %s, which is starting: adopted", label, iid)
                return inst
            if inst is not None:
                await api.terminate_instance(iid)
        except VastError as exc:
            raise VastUnavailable(f"{failure} It could not be destroyed yet ({exc}); it will be tried again",
                                  maybe_created=True, operation=failure.operation) from None
        log.info("Vast.ai: the create of %s failed but made instance %s: destroyed", label, iid)
        return None

    async def _adopt(self, api: VastAPI, label: str, failure: VastUnavailable) -> Instance:
        """After a create that may have made the instance: adopt the one healthy instance labelled ``label`` and
        destroy any other; raise (the orchestrator then reconciles by label) when that cannot be settled."""
        deadline = time.monotonic() + self.adopt_wait_s
        delay = 0.5
        while True:
            try:
                found = await api.find_by_label(label)
            except VastError as exc:
                raise VastUnavailable(f"{failure} Looking for it by label failed too ({exc}); it will be looked for "
                                      "again", maybe_created=True, operation=failure.operation) from None
            if found or time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)  # an instance made by a failed create may take a moment to be listed
            delay = min(2.0, delay * 2)
        if not found:
            log.info("Vast.ai: the create of %s failed and no instance has that label", label)
            raise failure
        healthy = sorted((i for i in found if i.bad_reason() is None and not i.released
                          and i.intended_status != "stopped"), key=lambda i: i.id)
        keep = healthy[-1] if healthy else None
        for inst in found:
            if inst is keep:
                continue
            try:
                await api.terminate_instance(inst.id)
            except VastError as exc:
                raise VastUnavailable(f"{failure} An instance labelled {label!r} ({inst.id}) was made anyway and could "
                                      f"not be destroyed yet ({exc}); it will be tried again", maybe_created=True,
                                      operation=failure.operation) from None
        if keep is None:
            raise VastUnavailable(f"{failure} The instance it made anyway was in a bad state and was destroyed",
                                  operation=failure.operation)
        log.info("Vast.ai: the create of %s failed but made instance %s: adopted", label, keep.id)
        return keep

    def _handle(self, instance_id: int, offer: VastOffer | None, *, job_id: str | None, image: str | None,
                cap: float | None, adopted: bool = False, instance: Instance | None = None) -> MachineHandle:
        label = instance.label if instance is not None else self.tag(job_id or "")
        parsed = parse_tag(label or "")
        data: dict[str, Any] = {
            "instance_id": instance_id, "label": label, "workspace_id": parsed[0] if parsed else None,
            "job_id": job_id if job_id is not None else (parsed[1] if parsed else None),
            "image": image or (instance.image if instance else None), "port": self.port, "base_url": self.base_url,
            "interruptible": self.interruptible,
        }
        price: float | None = None
        gpu: str | None = None
        if offer is not None:
            price = self._price(offer)
            gpu = offer.gpu_name
            data.update({"ask_id": offer.ask_id, "gpu_name": offer.gpu_name, "gpu_count": offer.num_gpus,
                         "vram_gb": offer.vram_gb, "geolocation": offer.geolocation, "machine_id": offer.machine_id,
                         "offer_price_per_hour": price})
            bid = self._bid(offer)
            if bid is not None:
                data["bid_per_hour"] = bid
        if instance is not None:
            price = instance.dph_total or price
            gpu = instance.gpu_name or gpu
            data.update({"gpu_name": instance.gpu_name, "gpu_count": instance.num_gpus, "status": instance.actual_status})
        if cap is not None:
            data["max_price_per_hour"] = cap
        if adopted:
            data["adopted"] = True
        return MachineHandle(provider=self.name, machine_id=str(instance_id), runner_url=None, data=data,
                             price_per_hour=price, gpu=gpu)

    # ---- poll, terminate, reconcile

    def _same_api(self, handle: MachineHandle) -> None:
        """An instance is only reachable through the API that made it: an answer from another one (a changed
        TRAINORCH_VAST_URL) must not read as "gone"."""
        made_at = handle.data.get("base_url")
        if made_at and str(made_at).rstrip("/") != self.base_url:
            raise ProviderError(self.name, f"instance {handle.machine_id} was created through {made_at}, but the Vast.ai "
                                f"API is now {self.base_url}: set {BASE_URL_ENV}={made_at} to reach (and destroy) it",
                                retryable=True)

    def _get_refresh_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._refresh_lock is None or self._refresh_loop is not loop:
            self._refresh_lock, self._refresh_loop = asyncio.Lock(), loop
        return self._refresh_lock

    async def _instance(self, instance_id: int) -> Instance | None:
        """The instance as the latest shared list shows it (one ``GET /api/v1/instances/`` for every instance
        polled, at most every ``poll_cache_s``); one missing from the list is read alone (null = gone)."""
        api = self._client()
        self._watched[instance_id] = time.monotonic()
        async with self._get_refresh_lock():
            now = time.monotonic()
            if instance_id not in self._snapshot_ids or now - self._snapshot_at >= self.poll_cache_s:
                for iid, asked in list(self._watched.items()):
                    if now - asked > _WATCH_FORGET_S:
                        del self._watched[iid]
                ids = sorted(self._watched)
                rows = await api.list_instances(select_filters={"id": {"in": ids}})
                self._snapshot = {i.id: i for i in rows}
                self._snapshot_ids = set(ids)
                self._snapshot_at = time.monotonic()
            inst = self._snapshot.get(instance_id)
        if inst is not None:
            return inst
        return await api.get_instance(instance_id)  # not listed: gone, or not listed yet

    def _forget(self, instance_id: int) -> None:
        self._watched.pop(instance_id, None)
        self._snapshot.pop(instance_id, None)

    async def poll(self, handle: MachineHandle) -> PollResult:
        self._same_api(handle)
        iid = int(handle.machine_id)
        inst = await self._instance(iid)
        if inst is None or inst.released:
            self._forget(iid)
            return PollResult(MachineStatus.GONE, None, f"Vast.ai has no instance {iid} any more: it was destroyed (by "
                              "its own key, by you, or its host)")
        reason = inst.bad_reason()
        if reason is not None:
            return PollResult(MachineStatus.FAILED, None, f"Vast.ai reports instance {iid} {reason}; it will not come "
                              "up and must be destroyed")
        cap = handle.data.get("max_price_per_hour")
        if cap is not None and inst.dph_total > float(cap) + 1e-9:
            return PollResult(MachineStatus.FAILED, None, f"instance {iid} bills {_usd(inst.dph_total)}, above the max "
                              f"price {_usd(float(cap))}; it must be destroyed (raise --max-price to keep such offers)")
        port = int(handle.data.get("port") or self.port)
        endpoint = inst.tcp_endpoint(port)
        if endpoint is not None:
            ip, public = endpoint
            host = f"[{ip}]" if ":" in ip else ip
            return PollResult(MachineStatus.READY, f"https://{host}:{public}", f"instance {iid} is running")
        status = inst.actual_status
        detail = {None: "being created", "created": "created, starting its container",
                  "loading": "loading its image (not billed yet)", "rebooting": "rebooting",
                  "stopped": "stopped, waiting for its GPU (scheduling)"}.get(status, str(status))
        if inst.running:
            detail = f"running; waiting for Vast.ai to publish port {port}/tcp"
        return PollResult(MachineStatus.PROVISIONING, None, f"instance {iid} is {detail}")

    async def terminate(self, handle: MachineHandle) -> None:
        """Destroy the instance and confirm it is gone (null on read). "Already gone" is success; any other error
        propagates (the orchestrator keeps it on its reap list and tries again)."""
        self._same_api(handle)
        iid = int(handle.machine_id)
        await self._client().terminate_instance(iid)
        self._forget(iid)

    async def reconcile(self, job: Job) -> list[MachineHandle]:
        """The instances labelled with ``job``'s tag (after a create error, or a crash between create and record)."""
        found = await self._client().find_by_label(self.tag(job.id))
        return [self._handle(i.id, None, job_id=job.id, image=None, cap=None, instance=i) for i in found]

    async def list_machines(self) -> list[MachineHandle]:
        """Every instance of this tool on the account (labelled ``trainorch-<workspace>-<job>``), of any workspace.

        Each handle's ``data`` has ``workspace_id``, ``job_id``, ``status``, ``this_workspace``; ``price_per_hour``
        is what it bills now. Destroy one with :meth:`terminate`."""
        out = []
        for inst in await self._client().list_instances():
            if not inst.label or parse_tag(inst.label) is None:
                continue
            handle = self._handle(inst.id, None, job_id=None, image=None, cap=None, instance=inst)
            handle.price_per_hour = inst.dph_total
            handle.data["this_workspace"] = handle.data["workspace_id"] == self.workspace_id
            out.append(handle)
        return out

    # ---- offers

    async def offers(self, resources: Resources) -> list[Offer]:
        """What Vast.ai rents now for ``resources`` (a fresh offer search): one offer per ask, with the whole
        machine's USD per hour (``dph_total``: GPUs and the disk of ``resources.disk_gb``; bandwidth is billed
        per GB on top, in ``data``), cheapest first."""
        api = self._client()
        cap = resources.max_price_per_hour
        out: list[Offer] = []
        for o in await self._search(api, resources):
            price = self._price(o)
            if cap is not None and price > cap + 1e-9:
                continue
            out.append(Offer(
                provider=self.name, gpu=canonical_gpu(o.gpu_name, o.vram_gb), gpu_count=o.num_gpus,
                price_per_hour=price, region=o.geolocation, available=True, vram_gb=o.vram_gb, provider_gpu=o.gpu_name,
                data={"ask_id": o.ask_id, "machine_id": o.machine_id, "country": o.country, "reliability": o.reliability,
                      "dph_base": o.dph_base, "min_bid": o.min_bid, "storage_cost_per_gb_month": o.storage_cost,
                      "inet_down_mb_s": o.inet_down, "inet_up_mb_s": o.inet_up,
                      "inet_down_cost_per_gb": o.raw.get("inet_down_cost"), "inet_up_cost_per_gb": o.raw.get("inet_up_cost"),
                      "cuda_max_good": o.cuda_max_good, "verified": o.verified, "interruptible": self.interruptible,
                      "memory_gb": o.vram_gb},
            ))
        return sorted(out, key=lambda o: (o.price_per_hour, o.gpu))

    # ---- the dead-man switch

    def on_exit_hook(self) -> str:
        """:meth:`self_destroy_hook` (for ``Bootstrap.on_exit``): its code rides in the env :meth:`launch` sets."""
        return self.self_destroy_hook()

    @classmethod
    def self_destroy_hook(cls, *, inline: bool = False) -> str:
        """The runner's ``--on-exit`` shell command on a Vast.ai instance: destroy this instance.

        The code (:func:`deadman_code`) runs inside the instance with what Vast puts there: ``$CONTAINER_ID`` and
        the instance's own key ``$CONTAINER_API_KEY`` (read from the environment; never on a command line), against
        ``$TRAINORCH_VAST_URL`` or else console.vast.ai: ``DELETE /api/v0/instances/<id>/`` retried with backoff,
        404 = gone; a key that may not destroy (401/403) stops the instance instead (only its disk bills then).

        By default the command is short (~80 characters: the hook travels base64-encoded inside the stage-0, whose
        length Vast bounds): the shell joins the code's base64 from ``$TJDM0..`` (:func:`deadman_env`, which
        :meth:`launch` sets; each Vast env entry is at most 256 characters) and ``python3`` decodes and runs it.
        It fails loudly where ``TJDM0`` is missing. ``inline`` gives a self-contained command instead."""
        if inline:
            return f'python3 -c "import base64;exec(base64.b64decode(\'{_deadman_blob()}\'))"'
        names = "".join(f"${{{DEADMAN_ENV_PREFIX}{i}:?}}" if i == 0 else f"${DEADMAN_ENV_PREFIX}{i}"
                        for i in range(_deadman_pieces()))
        return f'python3 -c "import base64;exec(base64.b64decode(\'{names}\'))"'


#: the instance's environment variables holding the dead-man hook's code, base64, in pieces (``TJDM0``...)
DEADMAN_ENV_PREFIX = "TJDM"

# The dead-man hook's code (run by the instance's python3; 3.6+ compatible). Destroys this instance with its own key
# (8 tries, backoff; 404 = gone); a key that may not (401/403): stop it instead. Exit 0 when done.
_HOOK_SOURCE = """\
import json,os,sys,time,urllib.request as u
E=os.environ;b=(E.get("TRAINORCH_VAST_URL")or"https://console.vast.ai").rstrip("/")+"/api/v0/instances/%s/"%E["CONTAINER_ID"];h={"Authorization":"Bearer "+E["CONTAINER_API_KEY"],"Content-Type":"application/json"}
def c(m,d):
 try:return json.load(u.urlopen(u.Request(b,d,h,method=m),timeout=30)).get("success")is not False
 except u.HTTPError as e:return e.code
 except Exception:return 0
for n in range(8):
 r=c("DELETE",b"{}")
 if r is True or r==404:sys.exit()
 if r in(401,403):sys.exit(c("PUT",b'{"state":"stopped"}')is not True)
 time.sleep(min(30,2**n))
sys.exit(1)
"""


def deadman_code() -> str:
    """The Python source of the dead-man hook (reads ``TRAINORCH_VAST_URL``, ``CONTAINER_ID``, ``CONTAINER_API_KEY``)."""
    return _HOOK_SOURCE


def _deadman_blob() -> str:
    return base64.b64encode(_HOOK_SOURCE.encode()).decode("ascii")


_PIECE_CHARS = ENV_ENTRY_MAX - len(DEADMAN_ENV_PREFIX) - 2  # "TJDM0=" + the piece: one env entry of at most 256


def _deadman_pieces() -> int:
    return -(-len(_deadman_blob()) // _PIECE_CHARS)


def deadman_env(base_url: str = DEFAULT_BASE_URL) -> dict[str, str]:
    """The env :meth:`VastProvider.launch` gives an instance: the hook's code in base64 pieces (``TJDM0=...``, each
    entry at most 256 characters, plain words the docker-flags string carries) and, for an API other than Vast's
    own (a fake), its URL. Public code and no secret: Vast shows an instance's env to whoever reads it."""
    blob = _deadman_blob()
    pieces = [blob[i:i + _PIECE_CHARS] for i in range(0, len(blob), _PIECE_CHARS)]
    if len(pieces) > 9:
        raise ValueError("the dead-man hook's code does not fit in 9 env entries")
    env = {f"{DEADMAN_ENV_PREFIX}{i}": piece for i, piece in enumerate(pieces)}
    base = check_base_url(base_url)
    if base != DEFAULT_BASE_URL:
        env[BASE_URL_ENV] = base
    return env


def _countries(value: Any, where: str) -> list[str]:
    """``"US, ca"`` or a list -> ``["US", "CA"]`` (Vast filters ``geolocation`` by country code)."""
    if value is None or value == "":
        return []
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) and not isinstance(value, str):
        raise SpecError(where, "must be two-letter country codes such as 'US' or 'US,CA' (Vast.ai's geolocation)")
    out = []
    for item in items:
        code = str(item).strip()
        if not _COUNTRY.match(code):
            raise SpecError(where, f"{item!r} is not a two-letter country code such as 'US', 'CA' or 'DE' (Vast.ai "
                            "filters offers by country)")
        out.append(code.upper())
    return out
