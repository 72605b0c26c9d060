"""trainorch-jupyter: fine-tune LoRA adapters from a notebook, locally or on a rented GPU.

Load the notebook face with ``%load_ext trainorch_jupyter``. Below the face, everything works from a
plain Python script: ``from trainorch_jupyter import get_orchestrator``.
"""

from __future__ import annotations

from typing import Any

# Nothing is imported eagerly: ``python -m trainorch_jupyter.trainer`` runs on a training machine whose Python may
# be older than the kernel's (Lambda Stack: 3.10), and it needs none of the orchestrator's modules.
_MODEL_NAMES = ("ArtifactInfo", "Job", "JobSpec", "JobState", "Resources", "SpecError", "TrainerConfig", "TrainingState")

__version__ = "0.1.0"

__all__ = [
    "ArtifactInfo",
    "Job",
    "JobSpec",
    "JobState",
    "Resources",
    "SpecError",
    "TrainerConfig",
    "TrainingState",
    "__version__",
    "get_orchestrator",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def get_orchestrator(*args: Any, **kwargs: Any) -> Any:
    from .orchestrator import get_orchestrator as _get

    return _get(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    # The seed's API names, importable from the package root without loading it eagerly.
    if name in ("get_training_orchestrator", "TrainingConfig", "TrainingOrchestrator"):
        from . import compat

        return getattr(compat, name)
    raise AttributeError(name)


def load_ipython_extension(ipython: Any) -> None:
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
