"""Providers start a machine that runs the runner, say when it is reachable, and destroy it.

Everything after that (inputs, logs, metrics, cancel, artifacts) speaks the one runner protocol.
A provider is a class registered under the entry-point group ``trainorch_jupyter.providers``, so a
third party can add one without touching this package.
"""

from __future__ import annotations

import enum
import importlib.metadata
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..model import Job, JobSpec, Resources, SpecError

log = logging.getLogger("trainorch_jupyter")

ENTRY_POINT_GROUP = "trainorch_jupyter.providers"


@dataclass
class Bootstrap:
    """What a machine needs to start the runner for one job.

    The runner's life is bounded in every state (``docs/PROTOCOL.md`` section 2, "The runner's life"):
    ``idle_timeout_s`` before a command is started, the job's max runtime while it runs, ``retention_s``
    after it exited. ``on_exit`` is the dead-man hook: a shell command the runner runs once when it ends its
    own life (a cloud machine destroys itself there). :meth:`runner_args` turns these into the runner's flags.
    The token goes to the runner in a 0600 file (``--token-file``), never in its environment or argv.
    """

    job_id: str
    token: str  # the runner's per-job bearer token (a secret: never logged or stored in a Job)
    runner_source: str  # the runner's own source, to ship inline to a bare image
    port: int = 8765
    idle_timeout_s: float = 1800.0  # no authenticated request this long before a start: the runner exits
    packages: list[str] = field(default_factory=list)  # pip requirements the command needs
    retention_s: float = 1800.0  # after the command exited: files served until this long without a request
    on_exit: str | None = None  # shell command run once when the runner ends its own life (argv: no secret in it)
    # The remote path (cloud providers): the runner source's SHA-256 (stage-0 accepts only those bytes) and the
    # job's TLS key material (``remote.ChannelKeys``; its private key is a secret, never stored or logged).
    runner_sha256: str = ""
    channel: Any = None

    def start_command(self, *, port_env: str | None = None, python: str = "python3") -> str:
        """The machine's start command: a stage-0 (one POSIX ``sh`` command line, no env value needed) that serves
        the job's pinned TLS channel, accepts the runner whose hash is ``runner_sha256`` and execs it with this
        bootstrap's life flags. ``port_env`` names a variable holding the port to listen on (a provider's mapping)."""
        if self.channel is None or not self.runner_sha256:
            raise ValueError("a remote bootstrap needs channel keys and the runner's SHA-256")
        from ..remote import stage0_command

        return stage0_command(token=self.token, keys=self.channel, runner_sha256=self.runner_sha256,
                              runner_args=self.runner_args(), port=self.port, port_env=port_env, python=python)

    def runner_args(self) -> list[str]:
        """The runner's life flags: ``--idle-timeout``, ``--retention`` and (if set) ``--on-exit``."""
        args = ["--idle-timeout", f"{self.idle_timeout_s:g}", "--retention", f"{self.retention_s:g}"]
        if self.on_exit:
            args += ["--on-exit", self.on_exit]
        return args

    def __repr__(self) -> str:  # keep the token (and the hook, which may name a credential file) out of any repr
        return (f"Bootstrap(job_id={self.job_id!r}, port={self.port}, packages={self.packages!r}, "
                f"idle_timeout_s={self.idle_timeout_s:g}, retention_s={self.retention_s:g}, "
                f"on_exit={'set' if self.on_exit else None}, channel={'set' if self.channel else None})")


@dataclass
class MachineHandle:
    """A provider's machine for one job. ``data`` must be JSON-serialisable and secret-free."""

    provider: str
    machine_id: str
    runner_url: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    price_per_hour: float | None = None
    gpu: str | None = None


class MachineStatus(enum.StrEnum):
    PROVISIONING = "provisioning"
    READY = "ready"  # the runner should answer at ``runner_url``
    FAILED = "failed"  # the machine is in a bad state and must be terminated
    GONE = "gone"  # the machine no longer exists


@dataclass
class PollResult:
    status: MachineStatus
    runner_url: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Offer:
    """One machine a provider offers: ``gpu`` in the shared vocabulary (:mod:`trainorch_jupyter.gpus`), the
    provider's own name in ``provider_gpu``; ``price_per_hour`` for the whole machine (all its GPUs), USD;
    ``data`` whatever the provider needs to create exactly this offer (an ask id, an instance type)."""

    provider: str
    gpu: str
    gpu_count: int
    price_per_hour: float
    region: str | None = None
    available: bool = True
    data: dict[str, Any] = field(default_factory=dict)
    vram_gb: float | None = None  # per GPU
    provider_gpu: str | None = None


class Provider(ABC):
    """One provider: launch, poll, terminate, offers. One instance per orchestrator."""

    name: str = ""
    #: True for a provider whose machines are reached over the internet: the orchestrator then gives each job a
    #: pinned TLS channel and a stage-0 start command (``Bootstrap.start_command``) and pushes the runner to it.
    remote: bool = False
    #: Seconds a launch may take before the machine is terminated and the job fails.
    provision_timeout_s: float = 20 * 60.0

    def __init__(self, *, workspace: Path, http: httpx.AsyncClient, **config: Any) -> None:
        self.workspace = workspace
        self.http = http
        self.config = config

    def validate(self, spec: JobSpec) -> None:  # noqa: B027 - optional hook
        """Provider-specific checks of a spec; raise SpecError. Called before anything is billed."""

    @abstractmethod
    async def launch(self, job: Job, bootstrap: Bootstrap) -> MachineHandle:
        """Create the machine (tagged with the job id before creation) and return its handle."""

    @abstractmethod
    async def poll(self, handle: MachineHandle) -> PollResult:
        """Where the machine stands now."""

    @abstractmethod
    async def terminate(self, handle: MachineHandle) -> None:
        """Destroy the machine and return only once the provider confirms it is gone.
        Idempotent: a machine that is already gone is a success."""

    async def reconcile(self, job: Job) -> list[MachineHandle]:
        """Machines tagged with ``job.id`` that exist (after a create error or a crash)."""
        return []

    def on_exit_hook(self) -> str | None:
        """A shell command, run on the machine by the runner when its life ends, that destroys the machine
        (the dead-man switch); None where the provider offers no way to (the orchestrator's reap list remains)."""
        return None

    async def list_machines(self) -> list[MachineHandle]:
        """Every machine this tool tagged on the account (for ``cleanup``); ``data["job_id"]`` and
        ``data["workspace_id"]`` parsed from the tag."""
        return []

    async def offers(self, resources: Resources) -> list[Offer]:
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


def available_providers() -> dict[str, type[Provider]]:
    """Provider classes by name, from the entry-point group."""
    out: dict[str, type[Provider]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the others
            log.warning("provider plugin %r (%s) could not be loaded: %s", ep.name, ep.value, exc)
            continue
        if isinstance(cls, type) and issubclass(cls, Provider):
            out[ep.name] = cls
    if "local" not in out:  # running from a source tree without the package's metadata
        from .local import LocalProvider

        out["local"] = LocalProvider
    return out


def provider_names() -> set[str]:
    return set(available_providers())


def check_provider(name: str) -> type[Provider]:
    providers = available_providers()
    if name not in providers:
        raise SpecError("provider", f"unknown provider {name!r}; available: {', '.join(sorted(providers))}")
    return providers[name]
