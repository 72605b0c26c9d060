"""The environment a job gets: the kernel's, less anything that looks like a secret, plus what its spec sets.

The rule lives in :mod:`trainorch_jupyter.runner` (which must stay self-contained, as it is shipped alone to
bare machines and applies the same rule to the job it starts); this module is its face for the package.

Dropped: every variable whose name matches one of the glob patterns (case-insensitive)
``*_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*PASSWORD*``, ``*_CREDENTIALS`` (``TRAINORCH_SECRET_ENV_PATTERNS``,
comma-separated, replaces that list), and always the provider keys, ``TRAINORCH_WEBHOOK_URL`` and the runner's
token. A variable the job's spec sets in ``env`` is passed whatever its name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .runner import (
    DEFAULT_SECRET_ENV_PATTERNS,
    SECRET_ENV_NAMES,
    SECRET_ENV_PATTERNS_ENV,
    is_secret_env_name,
    job_environment,
    secret_env_patterns,
)

__all__ = [
    "DEFAULT_SECRET_ENV_PATTERNS",
    "SECRET_ENV_NAMES",
    "SECRET_ENV_PATTERNS_ENV",
    "is_secret_env_name",
    "job_environment",
    "runner_environment",
    "secret_env_patterns",
]


def runner_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start a runner with on this machine: ``base`` (``os.environ``) without secrets.

    The runner passes it on to the job (and adds what the spec sets), so the job never sees the kernel's
    secrets; the runner itself never gets them either, so they are not in ``/proc/<runner pid>/environ``."""
    return job_environment(os.environ if base is None else base)
