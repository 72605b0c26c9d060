"""Model names: what the trainer loads, what an adapter records, and loading a saved adapter anywhere.

An adapter's ``adapter_config.json`` (and its card, ``README.md``) name the base model it was trained on. That
name must load on any machine, not only on the one that trained it:

- ``tiny`` (the offline tiny model) is recorded as ``tiny``; :func:`resolve_model` builds it on the machine that
  loads it (deterministic: the same files wherever it is built), never the cache path of the training machine;
- a hub id (``Qwen/Qwen2.5-0.5B``) is recorded as given;
- a local folder is recorded as its absolute path (the only name that says which files they were), except a
  snapshot folder of the Hugging Face hub cache (``.../models--ORG--NAME/snapshots/REV``), which is recorded as
  its hub id ``ORG/NAME`` with the revision ``REV``: that loads anywhere the hub is reachable.

Importing this module is cheap (torch, transformers and peft are imported by the functions that need them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TINY = "tiny"


def resolve_model(name: str) -> str:
    """The ``from_pretrained`` argument for a model name as given or recorded: ``tiny`` is built (once) on
    this machine; anything else is returned as is."""
    if name == TINY:
        from .tiny import build_tiny_model

        return str(build_tiny_model())
    return name


def _hub_snapshot(path: Path) -> tuple[str, str] | None:
    """``(repo_id, revision)`` when ``path`` is a snapshot folder of the Hugging Face hub cache."""
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo_id = parts[i].removeprefix("models--").replace("--", "/")
            if repo_id and i + 2 == len(parts) - 1:
                return repo_id, parts[i + 2]
    return None


def recorded_name(name: str, *, cwd: Path | None = None) -> tuple[str, str | None]:
    """``(base_model_name_or_path, revision)`` to record in an adapter trained on the model ``name``
    (as the user gave it to the trainer): see the module's docstring."""
    if name == TINY:
        return TINY, None
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    if path.is_dir():  # what from_pretrained loads first, too
        resolved = path.resolve()
        hub = _hub_snapshot(resolved)
        if hub is not None:
            return hub
        return str(resolved), None
    return name, None


def base_model_of(adapter_dir: Path | str) -> tuple[str, str | None]:
    """The base model an adapter records: ``(name, revision)`` from its ``adapter_config.json``."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    name = config.base_model_name_or_path
    if not name:
        raise ValueError(f"the adapter in {adapter_dir} records no base model; pass base_model=")
    return str(name), config.revision


def _check_loadable(name: str, adapter_dir: Path | str) -> None:
    if os.path.isabs(name) and not Path(name).exists():
        raise FileNotFoundError(
            f"the adapter in {adapter_dir} was trained on the local model folder {name}, which is not on this "
            "machine; pass base_model= (a hub id or a folder holding the same model)")


def load_tokenizer(name: str, **kwargs: Any) -> Any:
    """The tokenizer of a model name (``tiny``, a hub id, a folder) or of an adapter folder's base model."""
    from transformers import AutoTokenizer

    if (Path(name) / "adapter_config.json").is_file():
        name, revision = base_model_of(name)
        if revision and not os.path.isabs(name):
            kwargs.setdefault("revision", revision)
    return AutoTokenizer.from_pretrained(resolve_model(name), **kwargs)


def load_base_model(name: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` of a model name as given or recorded (``tiny`` included)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)


def load_adapter(adapter_dir: Path | str, *, base_model: str | None = None, is_trainable: bool = False,
                 **kwargs: Any) -> Any:
    """A saved adapter on its base model, on any machine: ``PeftModel.from_pretrained`` on the base model the
    adapter records (``tiny`` is built here), or on ``base_model`` when given. ``kwargs`` go to the base model's
    ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    from peft import PeftModel

    if base_model is None:
        name, revision = base_model_of(adapter_dir)
        _check_loadable(name, adapter_dir)
        if revision and not os.path.isabs(name):
            kwargs.setdefault("revision", revision)
    else:
        name = base_model
    base = load_base_model(name, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
