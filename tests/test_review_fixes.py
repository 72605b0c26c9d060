"""Regression tests for the review's findings (each failed before its fix).

Real parts wherever the bug lives in their interplay: the real runner subprocess through
``Orchestrator(tmp_path)``, a real kernel through ``tests/kernel_utils.py``.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import textwrap
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from trainorch_jupyter import widgets as W
from trainorch_jupyter.model import JobState
from trainorch_jupyter.orchestrator import Orchestrator

from .helpers import CuttingProxy, orchestrator, py_command, wait_for
from .test_orchestrator import ProxiedLocal
from .test_widgets import FakeOrch

WRITE_1MB = "import os; open(os.environ['TRAINORCH_OUTPUT_DIR'] + '/a.bin', 'wb').write(os.urandom(1 << 20))"
SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(600)"


# --------------------------------------------------------------------------------------------
# orchestrator
# --------------------------------------------------------------------------------------------


def test_two_downloads_of_one_job_at_once_both_succeed(tmp_path: Path) -> None:
    """Two on-demand downloads (a double click, a cell and a panel) used to start two runners on one
    state dir; the second died on the runner's lock: 'the runner exited at start with code 3'."""
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "twice", "auto_download": False, "command": py_command(WRITE_1MB)})
        assert job.wait(60).state is JobState.COMPLETED
        first, second = job.download(), job.download()
        a, b = first.result(60), second.result(60)
        assert [i.name for i in a] == [i.name for i in b] == ["a.bin"]
        assert a[0].hash_sha256 == b[0].hash_sha256


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused
    return port


def test_cancel_returns_at_once_and_survives_an_unreachable_runner(tmp_path: Path) -> None:
    """A cancel sent while the runner could not be reached was dropped silently (the job ran on), and
    the caller (the kernel's main thread for `%train cancel`) waited on the HTTP retries meanwhile."""
    proxy = CuttingProxy()
    ProxiedLocal.proxy = proxy
    try:
        with orchestrator(tmp_path, providers={"local": ProxiedLocal}) as orch:
            job = orch.submit({"name": "blip", "command": py_command(SLEEPER)})
            wait_for(lambda: job.status is JobState.RUNNING and "up" in job.logs(), timeout=30, what="running")
            real = proxy.target
            proxy.target = ("127.0.0.1", _dead_port())  # the runner is unreachable for a while
            proxy.cut()
            t0 = time.monotonic()
            job.cancel()
            assert time.monotonic() - t0 < 5.0, "cancel() waited for the runner (its retries take a minute)"
            time.sleep(2.0)
            proxy.target = real  # the network is back
            assert job.wait(timeout=40).state is JobState.CANCELLED
    finally:
        proxy.close()


class _StaleGet(Orchestrator):
    """Holds a reader (not the loop thread) after it read a job, until the job has ended: the
    interleaving of a notebook thread calling on_done() while the job finishes."""

    hold: str | None = None

    def get(self, job_id: str) -> Any:
        job = super().get(job_id)
        if job_id == self.hold and not self.in_loop_thread():
            self.hold = None
            self._done_events[job_id].wait(30)
        return job


def test_on_done_registered_while_the_job_ends_still_runs(tmp_path: Path) -> None:
    orch = _StaleGet(tmp_path)
    release = orch.store.release

    def slow_release(job_id: str, owner: str) -> None:
        time.sleep(1.0)  # the job's task is still finishing after its done callbacks ran
        release(job_id, owner)

    orch.store.release = slow_release  # type: ignore[method-assign]
    try:
        job = orch.submit({"name": "race", "command": py_command("import time; time.sleep(1)")})
        called = threading.Event()
        orch.hold = job.id
        job.on_done(lambda j: called.set())
        assert job.wait(30).state is JobState.COMPLETED
        assert called.wait(10), "the on_done callback was lost"
    finally:
        orch.close()


# --------------------------------------------------------------------------------------------
# widgets
# --------------------------------------------------------------------------------------------


def test_download_button_stays_disabled_while_downloading(tmp_path: Path) -> None:
    """The flusher re-enabled the Download button ~0.1 s after a click, inviting a second download."""
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "btn", "auto_download": False, "command": py_command(WRITE_1MB)})
        assert job.wait(60).state is JobState.COMPLETED
        sched = W._Scheduler(autostart=False)
        panel = W.JobPanel(orch, job.id, scheduler=sched, route_clicks=False)
        try:
            assert not panel.download_button.disabled
            panel.download_button.click()
            sched.tick()  # the flusher's next tick, while the download runs
            assert panel.download_button.disabled
            # The panel takes the download's end on its scheduler's tick (no thread blocks on it): tick until then.
            def done() -> bool:
                sched.tick()
                return "verified in" in panel._action

            wait_for(done, timeout=60, interval=0.1, what="the download")
            assert not panel.download_button.disabled
        finally:
            panel.close()


def test_cancel_button_stays_disabled_once_cancel_is_requested(tmp_path: Path) -> None:
    orch = FakeOrch(tmp_path)
    job = orch.add_job()
    sched = W._Scheduler(clock=lambda: 0.0, autostart=False)
    panel = W.JobPanel(orch, job.id, scheduler=sched, route_clicks=False)
    panel.cancel_button.click()
    panel.confirm_button.click()
    wait_for(lambda: orch.cancelled, what="the cancel")
    sched.tick(1.0)
    assert panel.cancel_button.disabled  # the job is still RUNNING until the runner reports it stopped
    orch.set_state(job.id, JobState.CANCELLED)
    sched.tick(2.0)
    assert panel.cancel_button.disabled
    panel.close()


def test_dashboard_provider_filter_is_never_ignored(tmp_path: Path) -> None:
    """`%train list --provider P` with P not installed showed every job of the workspace."""
    orch = FakeOrch(tmp_path)
    orch.add_job("a", provider="local")
    orch.add_job("b", provider="gone")  # a provider that was uninstalled since
    board = W.Dashboard(orch, provider="vast", scheduler=W._Scheduler(autostart=False), route_clicks=False)
    assert "data-job-id" not in board.table.value
    board.close()
    board = W.Dashboard(orch, provider="gone", scheduler=W._Scheduler(autostart=False), route_clicks=False)
    assert board.table.value.count("data-job-id=") == 1 and "b-2025" in board.table.value
    board.close()


# --------------------------------------------------------------------------------------------
# magics
# --------------------------------------------------------------------------------------------


class _GrowingHandle:
    """A job whose log grows while `%train logs -f` reads its first part (a fast job)."""

    id = "grow-1"

    def __init__(self, path: Path) -> None:
        self.log_path = path
        self._status = JobState.RUNNING

    def _grow(self) -> None:
        if self._status is JobState.RUNNING:
            with self.log_path.open("a") as fh:
                fh.write("line 3\nline 4\n")
            self._status = JobState.COMPLETED

    def logs(self, tail: int | None = None) -> str:
        text = self.log_path.read_text()
        self._grow()  # the job writes more right after this read
        lines = text.splitlines(keepends=True)
        return "".join(lines if tail is None else lines[-tail:])

    @property
    def status(self) -> JobState:
        self._grow()
        return self._status


@pytest.mark.parametrize("tail", [None, 1])
def test_logs_follow_loses_no_line(tmp_path: Path, tail: int | None) -> None:
    from trainorch_jupyter.magics import TrainMagics

    path = tmp_path / "job.log"
    path.write_text("line 1\nline 2\n")
    out = io.StringIO()
    with redirect_stdout(out):
        TrainMagics(None)._follow(_GrowingHandle(path), tail)  # type: ignore[arg-type]
    want = ["line 1", "line 2", "line 3", "line 4"] if tail is None else ["line 2", "line 3", "line 4"]
    assert out.getvalue().splitlines() == want


# --------------------------------------------------------------------------------------------
# a real kernel: panels of a re-run cell
# --------------------------------------------------------------------------------------------


def test_rerun_cell_closes_the_panels_it_showed_before(tmp_path: Path) -> None:
    """Each run of a cell showing a job made a new JobPanel; the old ones (their output cleared by the
    frontend) stayed subscribed to the orchestrator and flushed by the scheduler forever."""
    from tests.kernel_utils import KernelSession

    with KernelSession(tmp_path) as ks:
        ks.run("%load_ext trainorch_jupyter")
        ks.run(textwrap.dedent(f"""
            import json, ipywidgets, trainorch_jupyter.widgets as W
            from trainorch_jupyter.orchestrator import get_orchestrator
            orch = get_orchestrator()
            job = %train submit --name rerun -- {sys.executable} -c "import time; time.sleep(600)"
            def live_panels():
                return [w for w in list(ipywidgets.Widget.widgets.values()) if isinstance(w, W.JobPanel) and not w._closed]
        """))

        def run_in_cell(code: str, cell_id: str) -> None:
            msg = ks.kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                                        "user_expressions": {}, "allow_stdin": False,
                                                        "stop_on_error": True}, metadata={"cellId": cell_id})
            from tests.kernel_utils import CellResult

            res = CellResult(msg_id=msg["header"]["msg_id"], code=code, started=time.monotonic())
            with ks._lock:
                ks._results[res.msg_id] = res
                ks._idle[res.msg_id] = threading.Event()
            ks.kc.shell_channel.send(msg)
            ks.wait(res, 60).check()

        for _ in range(3):
            run_in_cell("job", "cell-a")
        run_in_cell("job", "cell-b")
        run_in_cell("%train dashboard", "cell-c")
        run_in_cell("%train dashboard", "cell-c")
        facts = ks.run("print(json.dumps({'panels': len(live_panels()), "
                       "'subs': len(orch._subscribers), "
                       "'boards': sum(isinstance(w, W.Dashboard) and not w._closed "
                       "for w in list(ipywidgets.Widget.widgets.values()))}))").json()
        ks.run("job.cancel(); job.wait(30)", timeout=60)
    assert facts["panels"] == 2  # the last one of cell-a, the one of cell-b
    assert facts["boards"] == 1
    assert facts["subs"] == 3
    json.dumps(facts)
