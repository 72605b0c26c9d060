"""The Jupyter server extension: trainorch's jobs over REST and server-sent events, and the server as a driver.

Enabled on install by ``jupyter-config/server-config/trainorch_jupyter.json``; by hand with
``jupyter server extension enable trainorch_jupyter.server``. The API is ``docs/server-api.yaml``.

- ``app.py``: :class:`TrainorchServerApp` (the ``ExtensionApp``: configuration, start and stop)
- ``handlers.py``: the REST handlers and the event stream
- ``service.py``: :class:`TrainingService`: the watcher of the store, the event streams, the adopter
- ``driver.py``: :class:`ServerOrchestrator`: drafts, submit, cancel, adoption (one driver per job: the store's
  fenced leases)
- ``storeview.py``: the server's read-only queries on the store
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import TrainorchServerApp

    return [{"module": "trainorch_jupyter.server", "app": TrainorchServerApp}]
