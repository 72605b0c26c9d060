"""``python -m trainorch_jupyter.trainer``: see :mod:`trainorch_jupyter.trainer.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
