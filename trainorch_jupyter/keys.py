"""Provider API keys: from the environment, else the system keyring. Never shown, logged or stored.

``get_key("runpod")`` reads ``RUNPOD_API_KEY`` (``LAMBDA_API_KEY``, ``VAST_API_KEY`` for the others); when the
variable is unset or empty it asks the system keyring (service ``trainorch-jupyter``, user name = the
provider) if the optional ``keyring`` package is installed (``pip install 'trainorch-jupyter[keyring]'``).
Store a key there once with ``keyring set trainorch-jupyter runpod`` (or :func:`set_key`), so that it is in
no notebook, shell history or environment.

:func:`key_status` says which providers have a key and where it comes from, with the key redacted
(``rpa_…9f3c``, or ``set (26 chars)`` for a short one): that is what ``%train keys`` prints. Nothing in this
module puts a key in a log line, an exception message or a repr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["KEYRING_SERVICE", "KEY_ENV", "KeyStatus", "delete_key", "get_key", "key_source", "key_status",
           "redact", "set_key"]

log = logging.getLogger(__name__)

#: the keyring service under which keys are stored (user name = the provider's name)
KEYRING_SERVICE = "trainorch-jupyter"
T = TypeVar("T")
#: provider -> the environment variable of its API key
KEY_ENV: dict[str, str] = {"runpod": "RUNPOD_API_KEY", "lambda": "LAMBDA_API_KEY", "vast": "VAST_API_KEY"}

_PREFIX = re.compile(r"^[A-Za-z]{2,6}[_-]")
_SHOW_TAIL_FROM = 20  # a key this long or longer shows its last 4 characters; a shorter one only its length


@dataclass(frozen=True)
class KeyStatus:
    """Whether a provider has a key: ``source`` is ``env``, ``keyring`` or ``missing``; ``redacted`` never
    holds the key (its vendor prefix and last 4 characters at most)."""

    provider: str
    env_var: str
    source: str
    redacted: str

    def as_row(self) -> dict[str, str]:
        return {"provider": self.provider, "variable": self.env_var, "source": self.source, "key": self.redacted}


def env_var(provider: str) -> str:
    """The environment variable of ``provider``'s key (``<PROVIDER>_API_KEY`` for one not listed)."""
    return KEY_ENV.get(provider, f"{re.sub(r'[^A-Za-z0-9]', '_', provider).upper()}_API_KEY")


def _keyring() -> Any | None:
    try:
        import keyring
    except Exception:  # not installed (an optional extra), or broken: the environment only
        return None
    return keyring


def _from_keyring(provider: str) -> str | None:
    kr = _keyring()
    if kr is None:
        return None
    try:
        value = kr.get_password(KEYRING_SERVICE, provider)
    except Exception as exc:  # no backend (keyring.errors.NoKeyringError), a locked or unreachable store
        log.debug("keyring: no key for %s (%s)", provider, type(exc).__name__)
        return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def key_source(provider: str, environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """``(key, source)``: source ``env``, ``keyring`` or ``missing`` (then key is None)."""
    env = os.environ if environ is None else environ
    value = (env.get(env_var(provider)) or "").strip()
    if value:
        return value, "env"
    value = _from_keyring(provider) or ""
    if value:
        return value, "keyring"
    return None, "missing"


def get_key(provider: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``provider``'s API key from its environment variable, else the system keyring; None if neither has one."""
    return key_source(provider, environ)[0]


def redact(key: str | None) -> str:
    """What may be shown of a key: ``rpa_…9f3c`` for a long one, ``set (12 chars)`` for a short one."""
    if not key:
        return "-"
    if len(key) < _SHOW_TAIL_FROM:
        return f"set ({len(key)} chars)"
    match = _PREFIX.match(key)
    return f"{match.group(0) if match else ''}…{key[-4:]}"


def key_status(providers: Iterable[str] | None = None, environ: Mapping[str, str] | None = None) -> list[KeyStatus]:
    """One row per provider (default: RunPod, Lambda, Vast.ai): where its key comes from, redacted."""
    out = []
    for provider in (KEY_ENV if providers is None else providers):
        key, source = key_source(provider, environ)
        out.append(KeyStatus(provider, env_var(provider), source, redact(key)))
    return out


def set_key(provider: str, key: str) -> None:
    """Store ``provider``'s key in the system keyring. RuntimeError when ``keyring`` is not installed."""
    kr = _keyring()
    if kr is None:
        raise RuntimeError("the 'keyring' package is not installed: pip install 'trainorch-jupyter[keyring]', or set "
                           f"{env_var(provider)} in the environment instead")
    if not key or not key.strip():
        raise ValueError("the key is empty")
    kr.set_password(KEYRING_SERVICE, provider, key.strip())


def delete_key(provider: str) -> bool:
    """Remove ``provider``'s key from the system keyring; False when there was none (or no keyring)."""
    kr = _keyring()
    if kr is None:
        return False
    try:
        kr.delete_password(KEYRING_SERVICE, provider)
    except Exception:  # keyring.errors.PasswordDeleteError: nothing stored
        return False
    return True


#: A provider's key is read again (environment, keyring) at most this often.
KEY_RECHECK_S = 60.0


class KeyedClient(Generic[T]):
    """One provider's API client, made from its key and made again when the key changes.

    The key is read (:func:`get_key`) at most every ``recheck_s``; only its SHA-256 is kept here, the key itself
    only in the client. A missing key raises what ``missing()`` returns (and drops the client)."""

    def __init__(self, provider: str, make: Callable[[str], T], missing: Callable[[], Exception],
                 recheck_s: float = KEY_RECHECK_S) -> None:
        self.provider = provider
        self._make = make
        self._missing = missing
        self.recheck_s = recheck_s
        self._client: T | None = None
        self._key_fp = ""
        self._checked = -1e9

    def get(self) -> T:
        now = time.monotonic()
        if self._client is not None and now - self._checked < self.recheck_s:
            return self._client
        key = get_key(self.provider)
        self._checked = now
        if not key:
            self._client = None
            raise self._missing()
        fp = hashlib.sha256(key.encode()).hexdigest()
        if self._client is None or fp != self._key_fp:
            self._client = self._make(key)
            self._key_fp = fp
        return self._client
