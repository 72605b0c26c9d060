"""What the cloud providers' HTTP clients (``runpod_api``, ``lambda_api``, ``vast_api``) share: the key from the
environment, their own ``httpx.AsyncClient`` unless one is given (closed only if they made it), the repr that
names the base URL and never the key, and ``async with``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import httpx


class ProviderAPIBase:
    """Base of a provider's API client; a subclass sets the class attributes and calls :meth:`_use_http`."""

    API_KEY_ENV: ClassVar[str]
    BASE_URL_ENV: ClassVar[str]
    DEFAULT_BASE_URL: ClassVar[str]

    base_url: str
    http: httpx.AsyncClient
    _own_http: bool

    def __init__(self, api_key: str, **kwargs: Any) -> None:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    @classmethod
    def _missing_key(cls) -> Exception:
        """The error for no key in the environment (it names the variable and where to get a key)."""
        raise NotImplementedError

    def _use_http(self, http: httpx.AsyncClient | None) -> None:
        self._own_http = http is None
        self.http = http if http is not None else httpx.AsyncClient()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Self:
        """Key from ``API_KEY_ENV``, base URL from ``BASE_URL_ENV`` (else ``DEFAULT_BASE_URL``); a missing key
        raises :meth:`_missing_key`'s error, naming the variable."""
        env = os.environ if environ is None else environ
        key = env.get(cls.API_KEY_ENV, "")
        if not key.strip():
            raise cls._missing_key()
        kwargs.setdefault("base_url", env.get(cls.BASE_URL_ENV) or cls.DEFAULT_BASE_URL)
        return cls(key, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
