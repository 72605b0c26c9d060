"""Offers and ``--provider auto``: one table of what every cloud provider rents now, and a job that takes the
cheapest offer that fits, falling over to the next on a capacity error or a provisioning deadline.

Every attempt is recorded on the job (``Job.attempts``: provider, GPU, $/h, region, why it was left); whatever a
failed attempt created is destroyed before the next one starts (the same money-safety path as any job: the reap
list, reconcile by tag). The provisioning deadline holds across the attempts (``settings.AUTO_PROVISION_S``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from ..gpus import canonical_gpu, matches
from ..model import CapacityError, Job, JobSpec, ProviderError, Resources, SpecError
from ..providers import MachineHandle, Offer, Provider
from . import settings
from .base import OrchestratorBase

log = logging.getLogger("trainorch_jupyter")

AUTO = "auto"


@dataclasses.dataclass
class OfferTable:
    """What ``offers()`` found: the offers, cheapest first, and the providers that could not be asked (why).
    Displays as an HTML table in a notebook and as text in a terminal."""

    offers: list[Offer]
    errors: dict[str, str]

    def rows(self) -> list[dict[str, Any]]:
        return [{"gpu": o.gpu, "count": o.gpu_count, "vram_gb": o.vram_gb, "usd_per_hour": round(o.price_per_hour, 4),
                 "region": o.region or "", "available": o.available, "provider": o.provider,
                 "provider_gpu": o.provider_gpu or o.gpu} for o in self.offers]

    def __str__(self) -> str:
        head = ("GPU", "N", "VRAM", "$/h", "region", "avail", "provider", "provider's name")
        body = [(o.gpu, str(o.gpu_count), f"{o.vram_gb:g} GB" if o.vram_gb else "?", f"{o.price_per_hour:.3f}",
                 o.region or "-", "yes" if o.available else "no", o.provider, o.provider_gpu or o.gpu)
                for o in self.offers]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]]
        if not body:
            lines.append("(no offer fits)")
        for name, why in sorted(self.errors.items()):
            lines.append(f"{name}: not asked ({why})")
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        import html

        cells = "".join(f"<th style='text-align:left'>{h}</th>" for h in
                        ("GPU", "N", "VRAM", "$/h", "region", "available", "provider", "provider's name"))
        rows = []
        for o in self.offers:
            vals = (o.gpu, o.gpu_count, f"{o.vram_gb:g} GB" if o.vram_gb else "?", f"{o.price_per_hour:.3f}",
                    o.region or "-", "yes" if o.available else "no", o.provider, o.provider_gpu or o.gpu)
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>")
        notes = "".join(f"<p>{html.escape(n)}: not asked ({html.escape(w)})</p>" for n, w in sorted(self.errors.items()))
        empty = "<p>No offer fits.</p>" if not rows else ""
        return f"<table class='trainorch-offers'><tr>{cells}</tr>{''.join(rows)}</table>{empty}{notes}"


def fits(offer: Offer, resources: Resources, *, min_vram_gb: float | None = None) -> bool:
    """Whether ``offer`` meets ``resources`` (GPU in any spelling, count, price cap) and a VRAM floor."""
    if resources.gpu and not matches(resources.gpu, offer.gpu):
        return False
    if offer.gpu_count < resources.gpu_count:
        return False
    if resources.max_price_per_hour is not None and offer.price_per_hour > resources.max_price_per_hour + 1e-9:
        return False
    return not (min_vram_gb is not None and (offer.vram_gb or 0) < min_vram_gb)


class OffersStage(OrchestratorBase):
    """Mixin: the offers of every cloud provider, and ``--provider auto``."""

    def cloud_providers(self) -> list[str]:
        """The installed providers that rent machines (``Provider.remote``)."""
        return sorted(n for n, cls in self._provider_classes.items() if getattr(cls, "remote", False))

    def offers(self, resources: Resources | dict[str, Any] | None = None, *, providers: Iterable[str] | None = None,
               min_vram_gb: float | None = None) -> OfferTable:
        """Every offer that fits ``resources`` from ``providers`` (default: every cloud provider with a key),
        cheapest first. A provider without a key or whose API fails is listed in ``errors``."""
        return self._call(self.aoffers(resources, providers=providers, min_vram_gb=min_vram_gb), timeout=300)

    async def aoffers(self, resources: Resources | dict[str, Any] | None = None, *,
                      providers: Iterable[str] | None = None, min_vram_gb: float | None = None) -> OfferTable:
        res = resources if isinstance(resources, Resources) else Resources.from_dict(resources)
        res.validate()
        names = list(providers) if providers is not None else self.cloud_providers()
        for name in names:
            if name not in self._provider_classes:
                raise SpecError("provider", f"unknown provider {name!r}; available: "
                                f"{', '.join(sorted(self._provider_classes))}")
        # Ask every provider for what it rents, whatever the GPU; filter here with one vocabulary.
        ask = dataclasses.replace(res, gpu=None, max_price_per_hour=None, region=None)

        async def one(name: str) -> tuple[str, list[Offer] | str]:
            try:
                provider = self.provider(name)
                provider.validate(JobSpec(name="offers", provider=name, command=("true",), resources=ask))
                found = await asyncio.wait_for(provider.offers(ask), 120)
            except Exception as exc:
                return name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return name, found

        offers: list[Offer] = []
        errors: dict[str, str] = {}
        for name, result in await asyncio.gather(*(one(n) for n in names)):
            if isinstance(result, str):
                errors[name] = result
                continue
            for o in result:
                o = _canonical(o)
                if fits(o, res, min_vram_gb=min_vram_gb):
                    offers.append(o)
        offers.sort(key=lambda o: (not o.available, o.price_per_hour, o.gpu, o.provider))
        return OfferTable(offers, errors)

    async def _provision_auto(self, job: Job) -> tuple[Provider, MachineHandle]:
        """Take the cheapest available offer that fits the job; on a capacity error or a provisioning deadline
        record the attempt, destroy what it made (``_provision`` does) and take the next."""
        deadline = time.monotonic() + settings.AUTO_PROVISION_S
        table = await self.aoffers(job.spec.resources)
        candidates = [o for o in table.offers if o.available]
        if not candidates:
            why = "; ".join(f"{n}: {w}" for n, w in sorted(table.errors.items()))
            raise CapacityError(AUTO, "no cloud offer fits the job's resources"
                                + (f" (asked: {', '.join(self.cloud_providers())}; {why})" if why else "")
                                + "; relax --gpu, --gpus or --max-price, or set another provider's key")
        failures: list[str] = []
        for offer in candidates:
            self._check_cancel(job)
            left = deadline - time.monotonic()
            if left <= 5:
                break
            provider = self.provider(offer.provider)
            attempt = {"provider": offer.provider, "gpu": offer.gpu, "provider_gpu": offer.provider_gpu,
                       "gpu_count": offer.gpu_count, "price_per_hour": offer.price_per_hour, "region": offer.region,
                       "started_at": time.time(), "error": None}
            job.attempts.append(attempt)
            job.provider = offer.provider
            job.machine_id, job.runner_url, job.machine = None, None, {}
            await self._save(job, note=f"trying {offer.provider} {offer.gpu} at ${offer.price_per_hour:.3f}/h")
            try:
                handle = await self._provision(job, provider, launch_spec=_attempt_spec(job.spec, offer),
                                               timeout_s=min(provider.provision_timeout_s, left))
            except (CapacityError, ProviderError) as exc:
                if isinstance(exc, ProviderError) and not _fails_over(exc):
                    attempt["error"] = str(exc)
                    raise
                attempt["error"] = str(exc).splitlines()[0]
                failures.append(f"{offer.provider} {offer.gpu} ${offer.price_per_hour:.3f}/h: {attempt['error']}")
                log.info("job %s: %s; trying the next offer", job.id, failures[-1])
                job.machine_id, job.runner_url, job.machine = None, None, {}
                await self._save(job)
                continue
            return provider, handle
        job.provider = AUTO if not job.machine_id else job.provider
        raise CapacityError(AUTO, f"no offer could be started within {settings.AUTO_PROVISION_S:.0f}s; tried: "
                            + " | ".join(failures or ["nothing (the deadline passed)"]))


def _fails_over(exc: ProviderError) -> bool:
    """A capacity error, a deadline, or a machine that broke while starting: the next offer may do better."""
    if isinstance(exc, CapacityError):
        return True
    text = str(exc)
    return any(w in text for w in ("not ready within", "capacity", "is failed", "is gone", "no longer", "taken"))


def _canonical(offer: Offer) -> Offer:
    """The offer in the shared GPU vocabulary (its provider's own name kept)."""
    provider_gpu = offer.provider_gpu or offer.gpu
    vram = offer.vram_gb if offer.vram_gb is not None else offer.data.get("memory_gb")
    return dataclasses.replace(offer, gpu=canonical_gpu(provider_gpu, vram), provider_gpu=provider_gpu, vram_gb=vram)


def _attempt_spec(spec: JobSpec, offer: Offer) -> JobSpec:
    """The spec a provider launches for one offer: its own GPU name, the offer's price as the cap, its region."""
    res = dataclasses.replace(spec.resources, gpu=offer.provider_gpu or offer.gpu, gpu_count=offer.gpu_count,
                              max_price_per_hour=(spec.resources.max_price_per_hour
                                                  or round(offer.price_per_hour * 1.02 + 0.005, 4)))
    cloud = offer.data.get("cloud")
    if isinstance(cloud, str) and offer.provider == "runpod":
        res = dataclasses.replace(res, cloud=cloud.lower())
    if offer.provider == "lambda" and offer.region:
        res = dataclasses.replace(res, region=offer.region)  # the region whose capacity was offered
    return dataclasses.replace(spec, provider=offer.provider, resources=res)


__all__ = ["AUTO", "OfferTable", "OffersStage", "fits"]
