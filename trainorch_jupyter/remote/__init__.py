"""The remote path: the pinned TLS channel, the stage-0 start command, pushing the runner, this package's wheel.

Providers are provisioning only; these pieces serve every cloud provider (``docs/PROTOCOL.md`` section 4,
"Channel"):

- :func:`new_channel_keys` makes one job's EC P-256 key and self-signed certificate (:class:`ChannelKeys`);
  :func:`runner_http_client` is an HTTP client that trusts that certificate and nothing else;
- :func:`stage0_command` is the machine's start command (one ``sh`` line of at most
  :data:`MAX_COMMAND_CHARS`), which serves HTTPS with that key until the runner is pushed;
- :func:`push_runner` pushes the runner's source to it (hash-checked there) and waits for the runner;
- :func:`package_wheel` builds a wheel of the running package, to upload as a job input.
"""

from __future__ import annotations

from .push import RunnerRefused, push_runner
from .stage0 import MAX_COMMAND_CHARS, stage0_command
from .tls import ChannelKeys, cert_fingerprint, new_channel_keys, pinned_ssl_context, runner_http_client
from .wheel import package_wheel

__all__ = [
    "MAX_COMMAND_CHARS",
    "ChannelKeys",
    "RunnerRefused",
    "cert_fingerprint",
    "new_channel_keys",
    "package_wheel",
    "pinned_ssl_context",
    "push_runner",
    "runner_http_client",
    "stage0_command",
]
