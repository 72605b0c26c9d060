"""Local fakes of the GPU providers' HTTP APIs, for tests and for a dry run without an account.

``python -m trainorch_jupyter.fakes runpod --port 8700`` prints its base URL and serves until stopped;
point ``TRAINORCH_RUNPOD_URL`` at it. In a test::

    with RunPodFake(api_keys={"k"}, provision_s=0.1, start_s=0.1) as fake:
        ...  # fake.base_url, fake.state(), fake.inject(capacity_errors=1)

Each fake follows its provider's OpenAPI spec (shapes, statuses, error bodies, rate limits), really
runs the machine's start command in a temporary directory, and serves its own bookkeeping at
``GET /_fake/state``. See :mod:`trainorch_jupyter.fakes.base` and each provider's module.
"""

from __future__ import annotations

from typing import Any

from .base import FakeServer, OpenAPIValidator, RateWindow
from .lambdacloud import LambdaFake
from .runpod import RunPodFake
from .vast import VastFake

__all__ = ["FAKES", "FakeServer", "LambdaFake", "OpenAPIValidator", "RateWindow", "RunPodFake", "VastFake", "make_fake"]

#: provider name -> fake class
FAKES: dict[str, type[FakeServer]] = {"lambda": LambdaFake, "runpod": RunPodFake, "vast": VastFake}


def make_fake(provider: str, **options: Any) -> FakeServer:
    """A fake of ``provider``'s API (not started)."""
    try:
        cls = FAKES[provider]
    except KeyError:
        raise ValueError(f"no fake for provider {provider!r}; available: {', '.join(sorted(FAKES))}") from None
    return cls(**options)
