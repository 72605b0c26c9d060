"""The built-in LoRA trainer: ``python -m trainorch_jupyter.trainer --model tiny --data FILE --output-dir DIR``.

Its command line is the contract of docs/PROTOCOL.md section 3. It imports nothing else of the package, so it
runs wherever ``trainorch_jupyter/trainer/`` and torch, transformers and peft are installed. Importing this
package is cheap (no torch): the heavy modules are ``train`` and ``tiny``. A saved adapter loads on any machine
with ``load_adapter(folder)`` (its base model ``tiny`` is built there; see ``models``).
"""

from __future__ import annotations

from .cli import METRIC_PREFIX, main
from .data import DataError
from .models import load_adapter, load_base_model, load_tokenizer, resolve_model

__all__ = ["METRIC_PREFIX", "DataError", "load_adapter", "load_base_model", "load_tokenizer", "main", "resolve_model"]
