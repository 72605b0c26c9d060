"""The data model: job specs, jobs, their states and legal transitions, artifacts, errors.

This module knows nothing else of the package. Everything here is plain data with lossless
``to_dict`` / ``from_dict`` round-trips, so the store, the orchestrator and the notebook face can
pass it around and persist it.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class TrainorchError(Exception):
    """Base class of every error this package raises on purpose."""


class SpecError(TrainorchError, ValueError):
    """A job spec field is invalid. ``field`` names it; the message says what is allowed."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        self.reason = message
        super().__init__(f"{field_name}: {message}")


class IllegalTransition(TrainorchError):
    """A job state change that the state machine does not allow."""

    def __init__(self, src: JobState, dst: JobState) -> None:
        self.src = src
        self.dst = dst
        super().__init__(f"illegal job state change {src.value} -> {dst.value}")


class JobNotFound(TrainorchError, KeyError):
    def __init__(self, ref: str, message: str | None = None) -> None:
        self.ref = ref
        super().__init__(message or f"no job matches {ref!r}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class ProviderError(TrainorchError):
    """A provider API call failed. ``retryable`` tells whether trying again may help."""

    def __init__(self, provider: str, message: str, *, status: int | None = None,
                 code: str | None = None, retryable: bool = False) -> None:
        self.provider = provider
        self.status = status
        self.code = code
        self.retryable = retryable
        super().__init__(f"{provider}: {message}")


class CapacityError(ProviderError):
    """The provider has no machine of the requested kind right now."""


class IntegrityError(TrainorchError):
    """A downloaded file's size or SHA-256 does not match the manifest written where the job ran."""


class RunnerError(TrainorchError):
    """The runner on the training machine answered with an error or could not be reached."""


# --------------------------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------------------------


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    PROVISIONING = "PROVISIONING"
    RUNNING = "RUNNING"
    DOWNLOADING = "DOWNLOADING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def is_live(self) -> bool:
        return not self.is_terminal

    def can_become(self, dst: JobState) -> bool:
        return dst in LEGAL_TRANSITIONS[self]


# The seed's name for the same enum.
TrainingState = JobState

TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}
)
_ENDINGS = {JobState.FAILED, JobState.CANCELLED}
LEGAL_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PROVISIONING, *_ENDINGS}),
    JobState.PROVISIONING: frozenset({JobState.RUNNING, *_ENDINGS}),
    JobState.RUNNING: frozenset({JobState.DOWNLOADING, JobState.COMPLETED, *_ENDINGS}),
    JobState.DOWNLOADING: frozenset({JobState.COMPLETED, *_ENDINGS}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def _dt_to_str(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dt_from_str(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV_PREFIX = "TRAINORCH_"
# The workdir snapshot's name among a job's inputs on the machine.
SNAPSHOT_INPUT_NAME = ".trainorch-workdir.tar.gz"
# Keys of the user's provider credentials: never shipped to a training machine through a spec.
SECRET_ENV_KEYS = frozenset({"RUNPOD_API_KEY", "LAMBDA_API_KEY", "VAST_API_KEY"})


@dataclass(frozen=True)
class Resources:
    """What machine a job needs. Ignored by the local provider except for ``gpu_count`` checks."""

    gpu: str | None = None  # e.g. "RTX 4090", "A100 80GB", "H100"; None = provider's cheapest
    gpu_count: int = 1
    max_price_per_hour: float | None = None  # USD for the whole machine
    disk_gb: int = 50
    region: str | None = None
    image: str | None = None  # container image (RunPod, Vast)
    cloud: str | None = None  # RunPod: "secure" or "community"

    def validate(self, prefix: str = "resources") -> None:
        if self.gpu is not None and (not isinstance(self.gpu, str) or not self.gpu.strip()):
            raise SpecError(f"{prefix}.gpu", "must be a non-empty GPU name such as 'A100 80GB', or left out")
        if not isinstance(self.gpu_count, int) or isinstance(self.gpu_count, bool) or not 1 <= self.gpu_count <= 16:
            raise SpecError(f"{prefix}.gpu_count", f"must be an integer from 1 to 16, got {self.gpu_count!r}")
        if self.max_price_per_hour is not None and (
            not isinstance(self.max_price_per_hour, int | float)
            or isinstance(self.max_price_per_hour, bool)
            or not math.isfinite(self.max_price_per_hour)
            or self.max_price_per_hour <= 0
        ):
            raise SpecError(f"{prefix}.max_price_per_hour", f"must be a positive number of USD per hour, got {self.max_price_per_hour!r}")
        if not isinstance(self.disk_gb, int) or isinstance(self.disk_gb, bool) or not 1 <= self.disk_gb <= 10_000:
            raise SpecError(f"{prefix}.disk_gb", f"must be an integer from 1 to 10000, got {self.disk_gb!r}")
        for name in ("region", "image"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SpecError(f"{prefix}.{name}", "must be a non-empty string or left out")
        if self.cloud is not None and (not isinstance(self.cloud, str)
                                       or self.cloud.strip().lower() not in ("secure", "community")):
            raise SpecError(f"{prefix}.cloud", f"must be 'secure' or 'community', got {self.cloud!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Resources:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise SpecError("resources", f"must be a mapping, got {type(data).__name__}")
        _reject_unknown("resources", data, {f.name for f in fields(cls)})
        return cls(**dict(data))


@dataclass(frozen=True)
class TrainerConfig:
    """Options of the built-in LoRA trainer (``python -m trainorch_jupyter.trainer``).

    ``model`` is a ``from_pretrained`` name or path, or ``"tiny"`` for the small model the trainer
    builds offline. ``data`` is a local JSONL/CSV file; it is uploaded to the machine as an input.
    """

    model: str
    data: str
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    log_every: int = 5
    gradient_checkpointing: bool = False
    device: str = "auto"

    SCHEDULES = ("constant", "linear", "cosine")
    DEVICES = ("auto", "cpu", "cuda", "mps")

    def validate(self, prefix: str = "train", *, check_files: bool = True) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise SpecError(f"{prefix}.model", "must be a model name or path (or 'tiny' for the offline tiny model)")
        if not isinstance(self.data, str) or not self.data.strip():
            raise SpecError(f"{prefix}.data", "must be the path of a JSONL or CSV file")
        if check_files:
            path = Path(self.data).expanduser()
            if not path.is_file():
                raise SpecError(f"{prefix}.data", f"file not found: {self.data}")
            if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
                raise SpecError(f"{prefix}.data", f"must end in .jsonl, .json or .csv, got {path.name!r}")
        if self.steps is not None and self.epochs is not None:
            raise SpecError(f"{prefix}.steps", "give steps or epochs, not both")
        _check_int(f"{prefix}.steps", self.steps, 1, 10_000_000, optional=True)
        if self.epochs is not None:
            _check_float(f"{prefix}.epochs", self.epochs, 0.0, 10_000.0, lo_open=True)
        _check_float(f"{prefix}.lr", self.lr, 0.0, 1.0, lo_open=True)
        if self.lr_schedule not in self.SCHEDULES:
            raise SpecError(f"{prefix}.lr_schedule", f"must be one of {', '.join(self.SCHEDULES)}, got {self.lr_schedule!r}")
        _check_int(f"{prefix}.warmup_steps", self.warmup_steps, 0, 10_000_000)
        _check_int(f"{prefix}.batch_size", self.batch_size, 1, 4096)
        _check_int(f"{prefix}.grad_accum", self.grad_accum, 1, 4096)
        _check_int(f"{prefix}.seq_len", self.seq_len, 8, 131_072)
        _check_int(f"{prefix}.lora_r", self.lora_r, 1, 1024)
        _check_int(f"{prefix}.lora_alpha", self.lora_alpha, 1, 4096)
        _check_float(f"{prefix}.lora_dropout", self.lora_dropout, 0.0, 1.0, hi_open=True)
        if self.target_modules is not None and (
            not self.target_modules
            or not all(isinstance(m, str) and re.fullmatch(r"[A-Za-z0-9_.]+", m) for m in self.target_modules)
        ):
            raise SpecError(f"{prefix}.target_modules", "must be a non-empty list of module names such as q_proj,v_proj")
        _check_float(f"{prefix}.eval_fraction", self.eval_fraction, 0.0, 0.5, hi_open=False)
        _check_int(f"{prefix}.seed", self.seed, 0, 2**32 - 1)
        _check_int(f"{prefix}.log_every", self.log_every, 1, 1_000_000)
        if not isinstance(self.gradient_checkpointing, bool):
            raise SpecError(f"{prefix}.gradient_checkpointing", "must be true or false")
        if self.device not in self.DEVICES:
            raise SpecError(f"{prefix}.device", f"must be one of {', '.join(self.DEVICES)}, got {self.device!r}")

    @property
    def data_input_name(self) -> str:
        """Name of the data file among the job's uploaded inputs."""
        return "data" + Path(self.data).suffix.lower()

    def cli_args(self, data_path: str, output_dir: str) -> list[str]:
        """The trainer's command-line arguments for this config."""
        args = ["--model", self.model, "--data", data_path, "--output-dir", output_dir]
        for f in fields(self):
            if f.name in ("model", "data"):
                continue
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None:
                continue
            if isinstance(value, bool):
                if value:
                    args.append(flag)
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            args += [flag, str(value)]
        return args

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.target_modules is not None:
            out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerConfig:
        if not isinstance(data, Mapping):
            raise SpecError("train", f"must be a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        # Accept dashes as written on a command line ("lora-r") as well as underscores.
        norm = {str(k).replace("-", "_"): v for k, v in data.items()}
        _reject_unknown("train", norm, names)
        for required in ("model", "data"):
            if required not in norm:
                raise SpecError(f"train.{required}", "is required")
        # YAML 1.1 reads "3e-3" (no dot) as a string: take numeric strings for numeric fields.
        for key in ("lr", "lora_dropout", "eval_fraction", "epochs"):
            if isinstance(norm.get(key), str):
                with contextlib.suppress(ValueError):
                    norm[key] = float(norm[key])
        for key in ("steps", "warmup_steps", "batch_size", "grad_accum", "seq_len", "lora_r", "lora_alpha", "seed",
                    "log_every"):
            if isinstance(norm.get(key), str) and re.fullmatch(r"\s*\d+\s*", norm[key]):
                norm[key] = int(norm[key])
        tm = norm.get("target_modules")
        if isinstance(tm, str):
            norm["target_modules"] = tuple(m.strip() for m in tm.split(",") if m.strip())
        elif isinstance(tm, list | tuple):
            norm["target_modules"] = tuple(tm)
        return cls(**norm)


@dataclass(frozen=True)
class JobSpec:
    """What to run and where. Exactly one of ``command`` and ``train`` is set."""

    name: str
    provider: str = "local"
    command: tuple[str, ...] | None = None
    train: TrainerConfig | None = None
    inputs: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    env: Mapping[str, str] = field(default_factory=dict)
    max_runtime: float = 6 * 3600.0  # seconds; enforced by the runner
    auto_download: bool = True
    # The user's code on the machine: ``workdir`` (an absolute folder) is packed into a snapshot whose SHA-256
    # is ``snapshot`` (set at submit; ``.trainorch/snapshots/<sha256>.tar.gz``), unpacked on the machine as the
    # command's working directory. ``pip`` (one requirement each) and the snapshot's ``requirements.txt`` are
    # installed before the command; on ``local`` only into a per-job environment (``isolated``).
    workdir: str | None = None
    snapshot: str | None = None
    pip: tuple[str, ...] = ()
    isolated: bool = False
    workdir_max_mb: float | None = None  # the snapshot's size cap (default $TRAINORCH_WORKDIR_MAX_MB or 200)

    def validate(self, *, known_providers: set[str] | None = None, check_files: bool = True) -> None:
        """Raise :class:`SpecError` naming the first invalid field. Touches nothing."""
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise SpecError(
                "name",
                f"must be 1-40 characters of lowercase letters, digits and '-', starting with a letter or digit; got {self.name!r}",
            )
        if not isinstance(self.provider, str) or not self.provider:
            raise SpecError("provider", "must be a provider name such as 'local'")
        if known_providers is not None and self.provider not in known_providers:
            raise SpecError("provider", f"unknown provider {self.provider!r}; available: {', '.join(sorted(known_providers))}")
        if (self.command is None) == (self.train is None):
            raise SpecError("command", "give either a command to run or a built-in trainer config ('train'), not both and not neither")
        if self.command is not None:
            if not self.command or not all(isinstance(a, str) for a in self.command) or not self.command[0].strip():
                raise SpecError("command", "must be a non-empty list of strings (program and arguments)")
        if self.train is not None:
            self.train.validate(check_files=check_files)
        seen: set[str] = set()
        for i, item in enumerate(self.inputs):
            if not isinstance(item, str) or not item:
                raise SpecError(f"inputs[{i}]", "must be a file path")
            path = Path(item).expanduser()
            if check_files and not path.is_file():
                raise SpecError(f"inputs[{i}]", f"file not found: {item}")
            if path.name in seen:
                raise SpecError(f"inputs[{i}]", f"two inputs share the file name {path.name!r}; inputs land in one folder by name")
            seen.add(path.name)
        if not isinstance(self.env, Mapping):
            raise SpecError("env", "must be a mapping of NAME to value")
        for key, value in self.env.items():
            if not isinstance(key, str) or not _ENV_KEY_RE.fullmatch(key):
                raise SpecError(f"env.{key}", "names must be letters, digits and '_', not starting with a digit")
            if key.startswith(_RESERVED_ENV_PREFIX):
                raise SpecError(f"env.{key}", f"names starting with {_RESERVED_ENV_PREFIX} are set by trainorch itself")
            if key in SECRET_ENV_KEYS:
                raise SpecError(f"env.{key}", "provider API keys are never sent to a training machine")
            if not isinstance(value, str):
                raise SpecError(f"env.{key}", f"values must be strings, got {type(value).__name__}")
        if (
            not isinstance(self.max_runtime, int | float)
            or isinstance(self.max_runtime, bool)
            or not math.isfinite(self.max_runtime)
            or not 1 <= self.max_runtime <= 7 * 24 * 3600
        ):
            raise SpecError("max_runtime", f"must be a number of seconds from 1 to 604800 (7 days), got {self.max_runtime!r}")
        if not isinstance(self.resources, Resources):
            raise SpecError("resources", "must be a Resources value or a mapping")
        self.resources.validate()
        if not isinstance(self.auto_download, bool):
            raise SpecError("auto_download", "must be true or false")
        self._validate_code()

    def _validate_code(self) -> None:
        if self.workdir is not None and (not isinstance(self.workdir, str) or not self.workdir.strip()
                                         or "\x00" in self.workdir):
            raise SpecError("workdir", "must be a folder path, or left out to send nothing")
        if self.snapshot is not None:
            if not isinstance(self.snapshot, str) or not re.fullmatch(r"[0-9a-f]{64}", self.snapshot):
                raise SpecError("snapshot", "must be the hex SHA-256 of a packed workdir")
            if self.workdir is None:
                raise SpecError("snapshot", "a snapshot comes from a workdir: give the workdir too")
        if not isinstance(self.pip, tuple | list):
            raise SpecError("pip", "must be a list of requirements")
        for i, req in enumerate(self.pip):
            if not isinstance(req, str) or not req.strip() or any(c in req for c in "\x00\n\r"):
                raise SpecError(f"pip[{i}]", f"must be one requirement such as 'scikit-learn' or 'numpy>=1.26', got {req!r}")
            if req.strip().startswith("-"):
                raise SpecError(f"pip[{i}]", f"one requirement per --pip, not a pip option ({req!r}); put options "
                                "such as --index-url in a requirements.txt beside your code")
        if not isinstance(self.isolated, bool):
            raise SpecError("isolated", "must be true or false")
        if self.workdir_max_mb is not None:
            _check_float("workdir_max_mb", self.workdir_max_mb, 0.0, 1_000_000.0, lo_open=True)
        for i, item in enumerate(self.inputs):
            if isinstance(item, str) and Path(item).name == SNAPSHOT_INPUT_NAME:
                raise SpecError(f"inputs[{i}]", f"{SNAPSHOT_INPUT_NAME!r} is the name of the workdir snapshot on the "
                                "machine; rename the file")

    def all_inputs(self) -> list[tuple[str, Path]]:
        """Every file to upload, as (name on the machine, local path)."""
        out = [(Path(p).expanduser().name, Path(p).expanduser()) for p in self.inputs]
        if self.train is not None:
            out.append((self.train.data_input_name, Path(self.train.data).expanduser()))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "provider": self.provider,
            "command": None if self.command is None else list(self.command),
            "train": None if self.train is None else self.train.to_dict(),
            "inputs": list(self.inputs),
            "resources": self.resources.to_dict(),
            "env": dict(self.env),
            "max_runtime": self.max_runtime,
            "auto_download": self.auto_download,
            "workdir": self.workdir,
            "snapshot": self.snapshot,
            "pip": list(self.pip),
            "isolated": self.isolated,
            "workdir_max_mb": self.workdir_max_mb,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Build a spec from plain data (YAML/TOML/JSON); raises SpecError on unknown or mistyped fields."""
        if not isinstance(data, Mapping):
            raise SpecError("spec", f"must be a mapping, got {type(data).__name__}")
        allowed = {"name", "provider", "command", "train", "inputs", "resources", "env", "max_runtime", "auto_download",
                   "workdir", "snapshot", "pip", "isolated", "workdir_max_mb"}
        _reject_unknown("spec", data, allowed)
        if "name" not in data:
            raise SpecError("name", "is required")
        command = data.get("command")
        if isinstance(command, str):
            import shlex

            command = shlex.split(command)
        if command is not None and not isinstance(command, list | tuple):
            raise SpecError("command", "must be a list of strings or one command line")
        train = data.get("train")
        inputs = data.get("inputs") or ()
        if isinstance(inputs, str):
            inputs = (inputs,)
        if not isinstance(inputs, list | tuple):
            raise SpecError("inputs", "must be a list of file paths")
        env = data.get("env") or {}
        if not isinstance(env, Mapping):
            raise SpecError("env", "must be a mapping of NAME to value")
        kwargs: dict[str, Any] = {
            "name": data["name"],
            "provider": data.get("provider", "local"),
            "command": None if command is None else tuple(command),
            "train": None if train is None else TrainerConfig.from_dict(train),
            "inputs": tuple(inputs),
            "resources": Resources.from_dict(data.get("resources")),
            "env": {str(k): v for k, v in env.items()},
        }
        if "max_runtime" in data:
            kwargs["max_runtime"] = parse_duration(data["max_runtime"], "max_runtime")
        if "auto_download" in data:
            kwargs["auto_download"] = data["auto_download"]
        for key in ("workdir", "snapshot", "isolated", "workdir_max_mb"):
            if data.get(key) is not None:
                kwargs[key] = data[key]
        pip = data.get("pip") or ()
        if isinstance(pip, str):
            pip = (pip,)
        if not isinstance(pip, list | tuple):
            raise SpecError("pip", "must be a list of requirements")
        if pip:
            kwargs["pip"] = tuple(pip)
        return cls(**kwargs)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$")


def parse_duration(value: Any, field_name: str = "max_runtime") -> float:
    """Seconds from 90, 90.5, "90s", "15m", "2h" or "1d"."""
    if isinstance(value, bool):
        raise SpecError(field_name, "must be a duration such as 3600, '45m' or '2h'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            mult = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}[m.group(2) or "s"]
            return float(m.group(1)) * mult
    raise SpecError(field_name, f"must be a duration such as 3600, '45m' or '2h', got {value!r}")


def _reject_unknown(prefix: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SpecError(f"{prefix}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(allowed))}")


def _check_int(name: str, value: Any, lo: int, hi: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SpecError(name, f"must be an integer from {lo} to {hi}, got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        hi_s = f"< {hi}" if hi_open else f"<= {hi}"
        raise SpecError(name, f"must be a number {lo_s} and {hi_s}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Jobs and artifacts
# --------------------------------------------------------------------------------------------


def new_job_id(name: str, now: datetime | None = None) -> str:
    """Readable and unique: ``<name>-<YYYYmmdd-HHMMSS>-<6 hex>``."""
    now = now or utcnow()
    return f"{name}-{now.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@dataclass
class ArtifactInfo:
    """One verified file of a job's output (the seed's fields)."""

    artifact_id: str
    job_id: str
    path: Path
    size_bytes: int
    hash_sha256: str
    created_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file's path relative to the job's output dir."""
        return str(self.metadata.get("name", self.path.name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact_id": self.artifact_id,
            "job_id": self.job_id,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "hash_sha256": self.hash_sha256,
            "created_at": _dt_to_str(self.created_at),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactInfo:
        created = _dt_from_str(data["created_at"])
        assert created is not None
        return cls(
            artifact_id=data["artifact_id"],
            job_id=data["job_id"],
            path=Path(data["path"]),
            size_bytes=int(data["size_bytes"]),
            hash_sha256=data["hash_sha256"],
            created_at=created,
            metadata=dict(data.get("metadata") or {}),
        )


@dataclass
class Job:
    """A job's record: what the store holds and what the orchestrator updates."""

    id: str
    spec: JobSpec
    state: JobState = JobState.PENDING
    provider: str = "local"
    machine_id: str | None = None  # the provider's id for the machine (pod id, instance id, pid)
    runner_url: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    diagnosis: dict[str, Any] | None = None
    artifacts: list[ArtifactInfo] = field(default_factory=list)
    price_per_hour: float | None = None
    gpu: str | None = None
    # Provider data needed to find the machine again (never secrets: no API keys).
    machine: dict[str, Any] = field(default_factory=dict)
    # The machine bills from its create until its terminate is confirmed.
    billing_since: datetime | None = None
    billing_until: datetime | None = None
    # ``--provider auto``: every machine tried, in order (provider, gpu, $/h, region, and why it was left).
    attempts: list[dict[str, Any]] = field(default_factory=list)
    # The reproducible record: the workdir snapshot sent (sha256, files, size, workdir, manifest: the file list),
    # the argv the runner started, the SHA-256 of each input uploaded (by its name on the machine), and the
    # packages of the job's Python after the installs (``python``, ``packages`` {name: version}, ``requested``).
    snapshot: dict[str, Any] | None = None
    command: list[str] | None = None
    input_hashes: dict[str, str] = field(default_factory=dict)
    packages: dict[str, Any] | None = None

    def transition(self, dst: JobState, *, now: datetime | None = None) -> None:
        """Move to ``dst`` or raise :class:`IllegalTransition`; stamps the times."""
        if not self.state.can_become(dst):
            raise IllegalTransition(self.state, dst)
        now = now or utcnow()
        self.state = dst
        self.updated_at = now
        if dst is JobState.RUNNING and self.started_at is None:
            self.started_at = now
        if dst.is_terminal:
            self.ended_at = now

    @property
    def elapsed_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at or utcnow()
        return max(0.0, (end - self.started_at).total_seconds())

    @property
    def cost_so_far(self) -> float | None:
        """USD the job's machine has cost: its price times the time from its create until its terminate was
        confirmed (or now)."""
        if self.price_per_hour is None:
            return None
        if self.billing_since is not None:
            end = self.billing_until or utcnow()
            return self.price_per_hour * max(0.0, (end - self.billing_since).total_seconds()) / 3600.0
        elapsed = self.elapsed_s
        return None if elapsed is None else self.price_per_hour * elapsed / 3600.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spec": self.spec.to_dict(),
            "state": self.state.value,
            "provider": self.provider,
            "machine_id": self.machine_id,
            "runner_url": self.runner_url,
            "created_at": _dt_to_str(self.created_at),
            "updated_at": _dt_to_str(self.updated_at),
            "started_at": _dt_to_str(self.started_at),
            "ended_at": _dt_to_str(self.ended_at),
            "exit_code": self.exit_code,
            "error": self.error,
            "diagnosis": self.diagnosis,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "price_per_hour": self.price_per_hour,
            "gpu": self.gpu,
            "machine": dict(self.machine),
            "billing_since": _dt_to_str(self.billing_since),
            "billing_until": _dt_to_str(self.billing_until),
            "attempts": [dict(a) for a in self.attempts],
            "snapshot": None if self.snapshot is None else dict(self.snapshot),
            "command": None if self.command is None else list(self.command),
            "input_hashes": dict(self.input_hashes),
            "packages": None if self.packages is None else dict(self.packages),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        created = _dt_from_str(data["created_at"])
        updated = _dt_from_str(data["updated_at"])
        assert created is not None and updated is not None
        return cls(
            id=data["id"],
            spec=JobSpec.from_dict(data["spec"]),
            state=JobState(data["state"]),
            provider=data["provider"],
            machine_id=data.get("machine_id"),
            runner_url=data.get("runner_url"),
            created_at=created,
            updated_at=updated,
            started_at=_dt_from_str(data.get("started_at")),
            ended_at=_dt_from_str(data.get("ended_at")),
            exit_code=data.get("exit_code"),
            error=data.get("error"),
            diagnosis=data.get("diagnosis"),
            artifacts=[ArtifactInfo.from_dict(a) for a in data.get("artifacts") or []],
            price_per_hour=data.get("price_per_hour"),
            gpu=data.get("gpu"),
            machine=dict(data.get("machine") or {}),
            billing_since=_dt_from_str(data.get("billing_since")),
            billing_until=_dt_from_str(data.get("billing_until")),
            attempts=[dict(a) for a in data.get("attempts") or []],
            snapshot=dict(data["snapshot"]) if data.get("snapshot") else None,
            command=list(data["command"]) if data.get("command") else None,
            input_hashes=dict(data.get("input_hashes") or {}),
            packages=dict(data["packages"]) if data.get("packages") else None,
        )


# The metrics line format shared with the runner and the trainer: a line printed by the job's
# command that starts with this prefix and continues with one JSON object.
METRIC_PREFIX = "TRAINORCH_METRIC "


def default_workspace() -> Path:
    """``$TRAINORCH_WORKSPACE`` or the current directory (the notebook's folder in Jupyter)."""
    return Path(os.environ.get("TRAINORCH_WORKSPACE") or os.getcwd()).resolve()
