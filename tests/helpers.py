"""Shared test helpers: a TCP proxy that can cut connections, process checks, tiny commands."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trainorch_jupyter._process import pid_alive
from trainorch_jupyter.model import Job
from trainorch_jupyter.orchestrator import Orchestrator

__all__ = ["PY", "CuttingProxy", "orchestrator", "pid_alive", "py_command", "runner_pid", "wait_for"]

PY = sys.executable


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy (returned); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class CuttingProxy:
    """A loopback TCP proxy; ``cut()`` closes every open connection (a network blip)."""

    def __init__(self) -> None:
        self.target: tuple[str, int] | None = None
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cuts = 0
        self.accepted = 0
        self.delay = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def proxied(self, url: str) -> str:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self.target = (parts.hostname, parts.port)
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            assert self.target is not None
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.delay:
                    time.sleep(self.delay)  # a slow link
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            self.cuts += 1
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._srv.close()
        self.cut()


@contextmanager
def orchestrator(workspace: Path, **kwargs: object) -> Iterator[Orchestrator]:
    orch = Orchestrator(workspace, **kwargs)  # type: ignore[arg-type]
    try:
        yield orch
    finally:
        orch.close()


def py_command(code: str) -> list[str]:
    return [PY, "-c", code]


def runner_pid(job: Job) -> int:
    """The local runner's pid of a job that was launched; fails (never 0 or None) when it has none, so that
    ``not pid_alive(runner_pid(job))`` cannot pass for a job whose machine was never recorded."""
    assert job.machine_id is not None, f"job {job.id} records no machine"
    assert job.machine_id.isdigit() and int(job.machine_id) > 1, f"not a runner pid: {job.machine_id!r}"
    assert job.machine.get("pid") == int(job.machine_id), job.machine
    return int(job.machine_id)
