"""Run notebook cells in a real IPython kernel and watch everything it sends on IOPub.

nbclient only keeps the IOPub messages whose parent is the cell it runs; widget updates sent from
background threads (our flusher) may carry another parent, so this helper reads IOPub itself, keeps
every message with its arrival time, and also builds an nbformat notebook of the cells it ran (saved
under ``test-artifacts/`` by :meth:`KernelSession.save`) for a human to look at.

Usage::

    with KernelSession(workspace) as ks:
        ks.run("%load_ext trainorch_jupyter")
        out = ks.run("print(1 + 1)")
        assert out.stdout == "2\\n"
        ks.comm_msgs(since=t0)            # comm_msg messages the kernel sent
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


@dataclass
class CellResult:
    msg_id: str
    code: str
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def check(self) -> CellResult:
        if self.error:
            raise AssertionError(f"cell failed:\n{self.code}\n--- error ---\n{self.error}\n--- stderr ---\n{self.stderr}")
        return self

    def json(self) -> Any:
        """The last line of stdout, parsed as JSON (cells print their findings as one JSON line)."""
        self.check()
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        if not lines:
            raise AssertionError(f"cell printed nothing:\n{self.code}\nstderr: {self.stderr}")
        return json.loads(lines[-1])


@dataclass
class IOPubMessage:
    time: float
    msg_type: str
    parent_id: str | None
    content: dict[str, Any]
    size: int


class KernelSession:
    """One python3 kernel (this interpreter's), cwd and $TRAINORCH_WORKSPACE = ``workspace``."""

    def __init__(self, workspace: Path, *, env: dict[str, str] | None = None, startup_timeout: float = 60) -> None:
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self._env = {**os.environ, "TRAINORCH_WORKSPACE": str(self.workspace), "PYTHONUNBUFFERED": "1", **(env or {})}
        self._env.pop("JPY_PARENT_PID", None)
        self.startup_timeout = startup_timeout
        self.km: KernelManager | None = None
        self.messages: list[IOPubMessage] = []
        self._lock = threading.Lock()
        self._results: dict[str, CellResult] = {}
        self._idle: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.nb = nbformat.v4.new_notebook()
        self._shell_replies: queue.Queue[dict[str, Any]] = queue.Queue()

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> KernelSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        km = KernelManager(kernel_name="python3")
        # This interpreter (the venv's), whatever kernelspec jupyter would find first.
        km._kernel_spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                     display_name="python3", language="python")
        km.start_kernel(env=self._env, cwd=str(self.workspace))
        self.km = km
        self.kc = km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=self.startup_timeout)
        self._reader = threading.Thread(target=self._read_iopub, name="iopub-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(5)
        if self.km is not None:
            try:
                self.kc.stop_channels()
            finally:
                self.km.shutdown_kernel(now=True)
            self.km = None

    # -- IOPub ----------------------------------------------------------------------------------

    def _read_iopub(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            except Exception:
                if self._stop.is_set():
                    return
                continue
            now = time.monotonic()
            parent = msg.get("parent_header", {}).get("msg_id")
            mtype = msg["header"]["msg_type"]
            content = msg.get("content", {})
            size = len(json.dumps(content, default=str))
            with self._lock:
                self.messages.append(IOPubMessage(now, mtype, parent, content, size))
                res = self._results.get(parent) if parent else None
            if res is None:
                continue
            if mtype == "stream":
                if content.get("name") == "stdout":
                    res.stdout += content.get("text", "")
                else:
                    res.stderr += content.get("text", "")
                res.outputs.append(nbformat.v4.new_output("stream", name=content.get("name"), text=content.get("text", "")))
            elif mtype in ("display_data", "execute_result"):
                data = content.get("data", {})
                if mtype == "execute_result":
                    res.outputs.append(nbformat.v4.new_output("execute_result", data=data,
                                                              execution_count=content.get("execution_count")))
                else:
                    res.outputs.append(nbformat.v4.new_output("display_data", data=data))
            elif mtype == "error":
                res.error = "\n".join(content.get("traceback", [])) or f"{content.get('ename')}: {content.get('evalue')}"
                res.outputs.append(nbformat.v4.new_output("error", ename=content.get("ename", ""),
                                                          evalue=content.get("evalue", ""), traceback=content.get("traceback", [])))
            elif mtype == "status" and content.get("execution_state") == "idle":
                res.finished = now
                self._idle[parent].set()

    def comm_msgs(self, since: float = 0.0, until: float = float("inf")) -> list[IOPubMessage]:
        """The ``comm_msg`` messages the kernel sent on IOPub (widget updates) in a time window."""
        with self._lock:
            return [m for m in self.messages if m.msg_type == "comm_msg" and since <= m.time <= until]

    def iter_messages(self) -> Iterator[IOPubMessage]:
        with self._lock:
            yield from list(self.messages)

    # -- running cells --------------------------------------------------------------------------

    def submit(self, code: str) -> CellResult:
        """Send a cell; do not wait. Use :meth:`wait` on the result."""
        res = CellResult(msg_id="", code=code, started=time.monotonic())
        with self._lock:
            msg_id = self.kc.execute(code, allow_stdin=False)
            res.msg_id = msg_id
            self._results[msg_id] = res
            self._idle[msg_id] = threading.Event()
        cell = nbformat.v4.new_code_cell(code)
        cell.outputs = res.outputs
        self.nb.cells.append(cell)
        return res

    def wait(self, res: CellResult, timeout: float = 60) -> CellResult:
        if not self._idle[res.msg_id].wait(timeout):
            raise TimeoutError(f"cell still running after {timeout}s:\n{res.code}\nstdout so far: {res.stdout[-2000:]}")
        return res

    def run(self, code: str, timeout: float = 60, *, check: bool = True) -> CellResult:
        res = self.wait(self.submit(code), timeout)
        return res.check() if check else res

    def send_comm_msg(self, comm_id: str, data: dict[str, Any], *, subshell_id: str | None = None) -> None:
        """What a browser does on a click: a comm_msg on the shell channel, addressed to a kernel subshell
        when ``subshell_id`` is given (as JupyterLab >= 4.4 does with ``commsOverSubshells``)."""
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        if subshell_id is not None:
            msg["header"]["subshell_id"] = subshell_id
        self.kc.shell_channel.send(msg)

    def click(self, comm_id: str, *, subshell_id: str | None = None) -> None:
        self.send_comm_msg(comm_id, {"method": "custom", "content": {"event": "click"}}, subshell_id=subshell_id)

    def control(self, msg_type: str, content: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send a control-channel request (e.g. ``create_subshell_request``); its reply's content."""
        msg = self.kc.session.msg(msg_type, content)
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return dict(reply["content"])

    def create_subshell(self) -> str:
        """A subshell made by the frontend (what JupyterLab does for comms), not by the kernel's code."""
        content = self.control("create_subshell_request", {})
        assert content.get("status") == "ok", content
        return str(content["subshell_id"])

    def delete_subshell(self, subshell_id: str) -> None:
        content = self.control("delete_subshell_request", {"subshell_id": subshell_id})
        assert content.get("status") == "ok", content

    def restart(self, timeout: float = 60) -> None:
        """Kill the kernel process and start a new one on the same connection (a user's "Restart Kernel")."""
        assert self.km is not None
        self._stop.set()  # wait_for_ready reads IOPub too: one reader at a time on a zmq socket
        if self._reader is not None:
            self._reader.join(5)
        self.km.restart_kernel(now=True)
        self.kc.wait_for_ready(timeout=timeout)
        self._stop.clear()
        self._reader = threading.Thread(target=self._read_iopub, name="iopub-reader", daemon=True)
        self._reader.start()

    def save(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.ipynb"
        nbformat.write(self.nb, path)
        return path


wait_until = wait_for
