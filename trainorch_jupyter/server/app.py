"""The ``jupyter_server`` extension app: configuration, handlers, and the service's start and stop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, Unicode

from .handlers import routes
from .service import TrainingService


class TrainorchServerApp(ExtensionApp):
    """trainorch's jobs over REST and server-sent events, and the Jupyter server as a driver of jobs.

    Configure with ``c.TrainorchServerApp.<trait>`` in a ``jupyter_server_config.py`` or on the command line
    (``jupyter lab --TrainorchServerApp.adopt_interval=2``).
    """

    name = "trainorch_jupyter"
    load_other_extensions = True

    workspace = Unicode(
        "", config=True,
        help="The workspace whose jobs the server serves and drives (its .trainorch/ store and artifacts/). "
             "Default: $TRAINORCH_WORKSPACE, else the server's root_dir (the folder a notebook there runs in, "
             "which is a kernel's default workspace).",
    )
    adopt_interval = Float(
        5.0, config=True,
        help="Seconds between two looks for live jobs that no live driver follows (their kernel died or was shut "
             "down); the server adopts them and drives them to their end. 0: never adopt.",
    )
    watch_interval = Float(
        1.0, config=True,
        help="Seconds between two reads of the job store for the event stream (one cheap query).",
    )
    ping_interval = Float(15.0, config=True, help="Seconds between two keep-alive comments on an event stream.")

    service: TrainingService | None = None

    def _workspace_path(self) -> Path:
        assert self.serverapp is not None
        chosen = self.workspace or os.environ.get("TRAINORCH_WORKSPACE") or self.serverapp.root_dir
        return Path(chosen).expanduser().resolve()

    def initialize_settings(self) -> None:
        assert self.serverapp is not None
        self.service = TrainingService(self._workspace_path(), Path(self.serverapp.root_dir),
                                       adopt_interval=self.adopt_interval, watch_interval=self.watch_interval,
                                       ping_interval=self.ping_interval, log=self.log)
        self.settings["trainorch_service"] = self.service

    def initialize_handlers(self) -> None:
        self.handlers.extend(routes())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        assert self.service is not None
        await self.service.start()

    async def stop_extension(self) -> None:
        if self.service is not None:
            await self.service.stop()

    def current_activity(self) -> list[str] | None:
        """Jobs this server drives: while there are any, ``shutdown_no_activity_timeout`` does not stop it."""
        driven = self.service.driven if self.service is not None else []
        return driven or None
