"""Routing button clicks to a kernel subshell, so that a panel's buttons act while another cell is busy.

See :class:`_SubshellRouter` for what ipykernel and JupyterLab do without it (measured) and the order in which a
click's subshell is chosen. Where the trainorch JupyterLab extension is installed, a panel's Cancel does not
need this at all: the sidebar's API cancels any job through the Jupyter server (see ``panel.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from typing import Any

import ipywidgets

log = logging.getLogger("trainorch_jupyter.widgets")  # one logger for the whole package, as before the split




class _SubshellRouter:
    """Where the frontend's messages to our buttons' comms are handled, so that a click acts during a busy cell.

    What happens without it (measured with JupyterLab 4.6.6 and ipykernel 7.4.0): JupyterLab sends every
    widget comm message over a kernel subshell of its own (setting ``commsOverSubshells``, default
    ``perCommTarget``), but ipykernel's shell-channel thread re-routes a ``comm_msg`` to the subshell
    ``Comm._reply_subshell_for(data, default)`` names: the one that last *sent* on that comm. A panel's
    comms were opened by the cell that showed it, on the main shell, so the click is sent back to the
    main shell and waits for the busy cell. With the classic notebook, VS Code or ``commsOverSubshells:
    disabled`` the click comes on the main shell in the first place.

    So each button's comm gets its own ``_reply_subshell_for`` (the fallback on a private hook, guarded):

    * the frontend sent the message over a live subshell (the official path): it is handled there;
    * else (no subshell from the frontend, or a stale one): on this kernel's own subshell, made once per
      kernel with a public ``create_subshell_request`` (mode ``auto``, the default), when it still exists;
    * else on the main shell, as ipykernel would (a click then waits for a busy cell).

    ``TRAINORCH_WIDGET_SUBSHELL``: ``auto`` (default), ``frontend`` (only the frontend's subshell, no
    subshell of our own), ``0``/``off`` (no hook at all: ipykernel's own routing).
    The hook is installed only where ipykernel has subshells and a ``_reply_subshell_for(data, default)``;
    otherwise one log line says why (a warning where the kernel has subshells but the hook changed).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subshell_id: str | None = None
        self._failed = False
        self.reason: str | None = None  # why the buttons cannot act during a busy cell here, if they cannot
        self._said: set[str] = set()
        self.stale: list[str] = []  # subshell ids found gone when a click came (ours or the frontend's)

    @staticmethod
    def mode() -> str:
        value = os.environ.get("TRAINORCH_WIDGET_SUBSHELL", "auto").strip().lower()
        if value in ("0", "false", "no", "off"):
            return "off"
        return "frontend" if value == "frontend" else "auto"

    def _say(self, level: int, text: str) -> None:
        """Log ``text`` once per process."""
        with self._lock:
            if text in self._said:
                return
            self._said.add(text)
        log.log(level, "%s", text)

    def subshell_id(self) -> str | None:
        """This kernel's own subshell for the buttons (made on first use); None where there is none."""
        if self.mode() != "auto":
            return None
        with self._lock:
            if self._subshell_id is None and not self._failed:
                try:
                    self._subshell_id = _create_subshell()
                    if self._subshell_id is None:
                        self._failed = True
                except Exception as exc:  # any failure: the buttons still work through the main shell
                    self._failed = True
                    self.reason = f"no kernel subshell could be made: {type(exc).__name__}: {exc}"
                    log.debug("no kernel subshell for widget clicks: %s", self.reason)
            return self._subshell_id

    def route(self, widget: ipywidgets.Widget) -> bool:
        """Install the hook on ``widget``'s comm. False where it cannot apply (the reason is logged once)."""
        if self.mode() == "off":
            return False
        comm = getattr(widget, "comm", None)
        if comm is None:
            return False
        problem, level = _hook_problem(comm)
        if problem is not None:
            self.reason = problem
            self._say(level, f"trainorch panels: {problem}; a click on a panel's button waits while another "
                             "cell runs")
            return False
        own = self.mode() == "auto"
        if own:
            self.subshell_id()

        def hook(data: Any, default: str | None) -> str | None:
            return self._route(data, default, own=own)

        try:
            comm._reply_subshell_for = hook
        except Exception as exc:
            self.reason = f"cannot set Comm._reply_subshell_for: {exc}"
            self._say(logging.WARNING, f"trainorch panels: {self.reason}")
            return False
        return True

    def _route(self, data: Any, default: str | None, *, own: bool = True) -> str | None:
        """ipykernel's question, asked on its shell-channel thread for each message to a routed comm: which
        subshell handles it (None: the main shell). ``default`` is the subshell the frontend addressed;
        ``own``: this kernel's subshell may serve the messages the frontend sent elsewhere."""
        live = _live_subshells()
        if default is not None and (live is None or default in live):
            return default  # the frontend's own subshell (JupyterLab's commsOverSubshells)
        mine = self._subshell_id if own else None
        if mine is not None and live is not None and mine not in live:
            with self._lock:
                if self._subshell_id == mine:
                    self._subshell_id = None  # the next panel makes a new one
            self._gone(mine, "this kernel's own", None)
            mine = None
        if default is not None:
            self._gone(default, "the frontend's", mine)
        return mine

    def _gone(self, subshell_id: str, whose: str, instead: str | None) -> None:
        self.stale.append(subshell_id)
        del self.stale[:-20]
        where = ("the main shell (a click waits while another cell runs)" if instead is None
                 else "this kernel's own subshell")
        self._say(logging.WARNING, f"trainorch panels: {whose} subshell {subshell_id} is gone (deleted, or from "
                                   f"before a kernel restart); the panels' clicks go to {where}")


def _hook_problem(comm: Any) -> tuple[str | None, int]:
    """Why the click hook cannot apply to ``comm`` (and the log level to say it at), or (None, 0)."""
    try:
        import ipykernel
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return "not in an IPython kernel", logging.DEBUG
    if not Kernel.initialized():
        return "not in an IPython kernel", logging.DEBUG
    version = getattr(ipykernel, "__version__", "?")
    if not getattr(Kernel.instance(), "_supports_kernel_subshells", False):
        return f"ipykernel {version} has no kernel subshells", logging.INFO
    hook = getattr(comm, "_reply_subshell_for", None)
    if hook is None:
        return (f"ipykernel {version}: its Comm has no _reply_subshell_for(data, default) to route clicks "
                "to a subshell"), logging.WARNING
    try:
        params = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if [p.name for p in params] != ["data", "default"] or any(p.kind not in positional for p in params):
        return (f"ipykernel {version}: Comm._reply_subshell_for{inspect.signature(hook) if params else '(?)'} "
                "is not the (data, default) this hook was written for"), logging.WARNING
    return None, 0


def _kernel_subshell_manager() -> Any:
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return None
    if not Kernel.initialized():
        return None
    thread = getattr(Kernel.instance(), "shell_channel_thread", None)
    return getattr(thread, "manager", None)


def _live_subshells() -> set[str] | None:
    """The kernel's subshell ids now; None when they cannot be read."""
    manager = _kernel_subshell_manager()
    try:
        return set(manager.list_subshell()) if manager is not None else None
    except Exception:
        return None


def _click_context() -> dict[str, Any]:
    """Where the running click handler runs: thread, subshell (None: main shell), the subshell the frontend addressed."""
    info: dict[str, Any] = {"thread": threading.current_thread().name, "subshell": None, "addressed": None}
    manager = _kernel_subshell_manager()
    with contextlib.suppress(Exception):
        info["subshell"] = manager.subshell_id_from_thread_id(threading.get_ident()) if manager else None
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        parent = kernel.get_parent() if kernel is not None else None
        info["addressed"] = ((parent or {}).get("header") or {}).get("subshell_id")
    return info


def _create_subshell() -> str | None:
    """Ask our own kernel, on its control channel, for a subshell (JEP 91). None if unsupported."""
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return None
    if not Kernel.initialized():
        return None
    kernel = Kernel.instance()
    if not getattr(kernel, "_supports_kernel_subshells", False):
        return None
    import ipykernel
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=ipykernel.get_connection_file())
    client.load_connection_file()
    client.start_channels(shell=False, iopub=False, stdin=False, hb=False, control=True)
    try:
        msg = client.session.msg("create_subshell_request", {})
        client.control_channel.send(msg)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            reply = client.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                content = reply["content"]
                if content.get("status") == "ok" and content.get("subshell_id"):
                    return str(content["subshell_id"])
                return None
        return None
    finally:
        client.stop_channels()


_router = _SubshellRouter()

