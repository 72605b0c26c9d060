"""The seed document's Python API, as thin names over the orchestrator.

```python
from trainorch_jupyter import get_training_orchestrator, TrainingConfig, TrainingState

orchestrator = get_training_orchestrator()
config = TrainingConfig(job_id="my_training_job", model_name="tiny",
                        dataset_path="notebooks/data/train.jsonl", output_dir="/output")
job = orchestrator.create_job(config)
orchestrator.start_training("my_training_job", provider="local")
status = orchestrator.get_status("my_training_job")
if status.state == TrainingState.COMPLETED:
    artifact = await orchestrator.download_artifact("my_training_job")
```

The seed's ``job_id`` is the caller's own name for the job; the orchestrator's job id (readable,
unique) is kept beside it and shown as ``status.orchestrator_job_id``. ``output_dir`` is where the
verified adapter is copied after download (the workspace's ``artifacts/<id>/`` keeps the original); a file already
there with other bytes is not replaced unless ``download_artifact(job_id, overwrite=True)``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import ArtifactInfo, Job, JobSpec, JobState, SpecError, TrainerConfig, TrainingState
from .orchestrator import Orchestrator, get_orchestrator

__all__ = ["TrainingConfig", "TrainingOrchestrator", "TrainingState", "TrainingStatus", "get_training_orchestrator"]


@dataclass
class TrainingConfig:
    job_id: str
    model_name: str
    dataset_path: str
    output_dir: str | None = None
    # Any other option of the built-in trainer (steps, lr, lora_r, ...), by TrainerConfig's field names.
    options: dict[str, Any] = field(default_factory=dict)
    max_runtime: float = 6 * 3600.0
    env: dict[str, str] = field(default_factory=dict)

    def to_spec(self, provider: str) -> JobSpec:
        name = re.sub(r"[^a-z0-9-]+", "-", self.job_id.lower()).strip("-")[:40] or "job"
        train = TrainerConfig.from_dict({"model": self.model_name, "data": self.dataset_path, **self.options})
        return JobSpec(name=name, provider=provider, train=train, max_runtime=self.max_runtime, env=dict(self.env))


@dataclass
class TrainingStatus:
    job_id: str
    state: JobState
    orchestrator_job_id: str | None = None
    error: str | None = None
    exit_code: int | None = None
    diagnosis: dict[str, Any] | None = None
    artifacts: list[ArtifactInfo] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)


class TrainingOrchestrator:
    """The seed's facade. Jobs are known by the caller's ``job_id``."""

    def __init__(self, orchestrator: Orchestrator | None = None) -> None:
        self.orchestrator = orchestrator or get_orchestrator()
        self._configs: dict[str, TrainingConfig] = {}
        self._ids: dict[str, str] = {}
        self._lock = threading.Lock()

    def create_job(self, config: TrainingConfig) -> TrainingConfig:
        """Register a job; nothing runs until :meth:`start_training`."""
        config.to_spec("local").validate(known_providers=None)
        with self._lock:
            if config.job_id in self._configs:
                raise SpecError("job_id", f"a job named {config.job_id!r} already exists in this orchestrator")
            self._configs[config.job_id] = config
        return config

    def start_training(self, job_id: str, provider: str = "local") -> str:
        """Submit the job to ``provider``; returns the orchestrator's job id at once."""
        with self._lock:
            config = self._configs.get(job_id)
            if config is None:
                raise SpecError("job_id", f"no job {job_id!r}; call create_job first")
            if job_id in self._ids:
                raise SpecError("job_id", f"job {job_id!r} was already started as {self._ids[job_id]}")
        handle = self.orchestrator.submit(config.to_spec(provider))
        with self._lock:
            self._ids[job_id] = handle.id
        return handle.id

    # The seed also calls this submit_job_to_provider.
    submit_job_to_provider = start_training

    def _id(self, job_id: str) -> str:
        with self._lock:
            if job_id in self._ids:
                return self._ids[job_id]
        return self.orchestrator.store.resolve(job_id)

    def get_status(self, job_id: str) -> TrainingStatus:
        if job_id in self._configs and job_id not in self._ids:
            return TrainingStatus(job_id=job_id, state=JobState.PENDING)
        real = self._id(job_id)
        job: Job = self.orchestrator.get(real)
        return TrainingStatus(job_id=job_id, state=job.state, orchestrator_job_id=real, error=job.error,
                              exit_code=job.exit_code, diagnosis=job.diagnosis,
                              artifacts=list(job.artifacts), metrics=self.orchestrator.metrics(real))

    def wait(self, job_id: str, timeout: float | None = None) -> TrainingStatus:
        self.orchestrator.wait(self._id(job_id), timeout)
        return self.get_status(job_id)

    async def download_artifact(self, job_id: str, *, overwrite: bool = False) -> ArtifactInfo:
        """The job's adapter (``adapter_model.safetensors`` when there is one), verified by SHA-256.

        With an ``output_dir`` the files are also copied there; a file already in it with other bytes is never
        replaced unless ``overwrite`` (``DestinationConflict``, raised before anything is written there)."""
        real = self._id(job_id)
        config = self._configs.get(job_id)
        infos = await self.orchestrator.download(real)
        if config is not None and config.output_dir:
            infos = await self.orchestrator.download(real, to=Path(config.output_dir), overwrite=overwrite)
        if not infos:
            raise FileNotFoundError(f"job {job_id} produced no files")
        for info in infos:
            if info.name == "adapter_model.safetensors":
                return info
        return infos[0]

    def stop_training(self, job_id: str) -> None:
        self.orchestrator.cancel(self._id(job_id))

    cancel_provider_job = stop_training

    def list_jobs(self) -> list[TrainingStatus]:
        return [self.get_status(j) for j in list(self._ids)]


_facade: TrainingOrchestrator | None = None


def get_training_orchestrator() -> TrainingOrchestrator:
    global _facade
    orch = get_orchestrator()
    if _facade is None or _facade.orchestrator is not orch:
        _facade = TrainingOrchestrator(orch)
    return _facade
