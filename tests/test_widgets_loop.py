"""The widgets never stall the orchestrator's loop.

Event callbacks run on the orchestrator's loop thread, which drives every job (log following,
downloads, cancels). A callback that waits on a lock a view holds across a store read or a
widget message stalls every job for as long. Here the store (or the comm) is made slow while a
view is shown, and events are delivered on a real Orchestrator's loop: each delivery must stay
quick however long the view's slow work takes.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ipywidgets
import pytest

from trainorch_jupyter import widgets as W
from trainorch_jupyter.model import Job, JobSpec, JobState
from trainorch_jupyter.orchestrator import Orchestrator

from .helpers import wait_for

SLOW_S = 2.0  # one slow store read / comm message
BOUND_S = 0.5  # how late an event delivery on the loop may finish


@pytest.fixture
def orch(tmp_path: Path) -> Iterator[Orchestrator]:
    o = Orchestrator(tmp_path, reattach=False)
    try:
        yield o
    finally:
        o.close()


def add_job(orch: Orchestrator, name: str, metrics: list[dict[str, Any]] = ()) -> Job:  # type: ignore[assignment]
    job = Job(id=f"{name}-20250101-000000-abcdef", spec=JobSpec(name=name, command=("python", "-c", "1")),
              provider="local", state=JobState.RUNNING)
    orch.store.create(job)
    if metrics:
        orch.store.append_metrics(job.id, metrics, len(metrics))
    return orch.store.get(job.id)


def deliver(orch: Orchestrator, job_id: str, kind: str, data: Any) -> float:
    """Emit one event on the loop thread (as the orchestrator does); seconds until the loop is done with it."""
    done: concurrent.futures.Future[float] = concurrent.futures.Future()

    def on_loop() -> None:
        orch._emit(job_id, kind, data)
        done.set_result(time.monotonic())

    t0 = time.monotonic()
    orch.loop.call_soon_threadsafe(on_loop)
    return done.result(timeout=60) - t0


def slow_metrics(orch: Orchestrator, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every ``store.metrics`` call takes SLOW_S (another kernel holds the store, a huge run); set when one starts."""
    entered = threading.Event()
    real = orch.store.metrics

    def slow(job_id: str) -> list[dict[str, Any]]:
        entered.set()
        time.sleep(SLOW_S)
        return real(job_id)

    monkeypatch.setattr(orch.store, "metrics", slow)
    return entered


def metric(step: int, loss: float) -> dict[str, Any]:
    return {"step": step, "total_steps": 10, "loss": loss}


def test_dashboard_store_reads_never_stall_the_loop(orch: Orchestrator, monkeypatch: pytest.MonkeyPatch) -> None:
    a = add_job(orch, "alpha", [metric(1, 2.5), metric(2, 2.25)])
    sched = W._Scheduler()  # its own flusher thread
    board = W.Dashboard(orch, scheduler=sched, route_clicks=False)
    try:
        assert a.id in board.table.value and "2.25" in board.table.value and "20%" in board.table.value
        entered = slow_metrics(orch, monkeypatch)
        b = add_job(orch, "beta")  # a job appears: the board reads its metrics (slowly)
        deliver(orch, b.id, "state", b)
        assert entered.wait(10), "the board never read the new job's metrics"
        lateness = []
        for i in range(3):
            lateness.append(deliver(orch, a.id, "metric", metric(3 + i, 1.5 - i * 0.25)))
            time.sleep(0.1)
        print(f"dashboard: event deliveries during a {SLOW_S}s store read took {[round(x, 3) for x in lateness]} s")
        assert max(lateness) < BOUND_S, lateness
        # Nothing was lost: the new row and the live summary (from events, not re-read) show.
        wait_for(lambda: b.id in board.table.value and "50%" in board.table.value, timeout=10,
                 what="the board to catch up")
    finally:
        monkeypatch.undo()
        board.close()


def test_dashboard_first_render_never_stalls_the_loop(orch: Orchestrator, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [add_job(orch, f"job{i}", [metric(5, 1.0)]) for i in range(3)]
    entered = slow_metrics(orch, monkeypatch)
    sched = W._Scheduler()
    made: concurrent.futures.Future[W.Dashboard] = concurrent.futures.Future()
    maker = threading.Thread(target=lambda: made.set_result(W.Dashboard(orch, scheduler=sched, route_clicks=False)))
    maker.start()  # the cell showing the board (the kernel's main thread)
    try:
        assert entered.wait(10)
        lateness = [deliver(orch, jobs[0].id, "metric", metric(6, 0.5))]
        time.sleep(0.2)
        lateness.append(deliver(orch, jobs[1].id, "log", "hello\n"))
        print(f"dashboard: event deliveries during its first render took {[round(x, 3) for x in lateness]} s")
        assert max(lateness) < BOUND_S, lateness
        board = made.result(timeout=3 * SLOW_S + 10)
        wait_for(lambda: board.table.value.count("50%") == 2 and "60%" in board.table.value, timeout=3 * SLOW_S + 10,
                 what="every row's summary")
        assert "0.5" in board.table.value
    finally:
        monkeypatch.undo()
        maker.join(30)
        if made.done():
            made.result().close()


def test_panel_widget_messages_never_stall_the_loop(orch: Orchestrator, monkeypatch: pytest.MonkeyPatch) -> None:
    a = add_job(orch, "alpha", [metric(1, 2.0)])
    sched = W._Scheduler()
    panel = W.JobPanel(orch, a.id, scheduler=sched, route_clicks=False)
    entered = threading.Event()

    def slow_send(self: ipywidgets.Widget, msg: dict[str, Any], buffers: Any = None) -> None:
        entered.set()  # a comm message that takes long to go out (a large value, a busy IOPub)
        time.sleep(SLOW_S)

    try:
        monkeypatch.setattr(ipywidgets.Widget, "_send", slow_send)
        deliver(orch, a.id, "log", "first line\n")
        assert entered.wait(10), "the panel never sent an update"
        lateness = []
        for i in range(3):
            lateness.append(deliver(orch, a.id, "metric", metric(2 + i, 1.0)))
            lateness.append(deliver(orch, a.id, "log", f"line {i}\n"))
            time.sleep(0.1)
        print(f"panel: event deliveries during {SLOW_S}s widget messages took {[round(x, 3) for x in lateness]} s")
        assert max(lateness) < BOUND_S, lateness
        monkeypatch.undo()
        panel.flush_now()
        assert panel.progress.step == 4 and panel.log_text.splitlines() == ["first line", "line 0", "line 1", "line 2"]
    finally:
        monkeypatch.undo()
        panel.close()


def test_panel_inbox_stays_bounded_and_loses_no_shown_line(tmp_path: Path) -> None:
    """While the flusher is behind, a panel keeps only the pending log text it could show."""
    from .test_widgets import FakeOrch, make_panel, manual_scheduler

    fake = FakeOrch(tmp_path)
    job = fake.add_job()
    panel = make_panel(fake, job.id, manual_scheduler(), log_lines=50)
    text = "".join(f"line {i} " + "x" * 90 + "\n" for i in range(60_000))  # ~6 MB, never drained meanwhile
    cuts = range(0, len(text), 997)  # chunks that cut lines anywhere
    for start in cuts:
        panel._on_event(type("E", (), {"job_id": job.id, "kind": "log", "data": text[start:start + 997], "time": 0.0})())
        assert panel._pending_log_chars <= 2 * W.PENDING_LOG_CHARS
    assert sum(len(e.data) for e in panel._pending) < W.PENDING_LOG_CHARS
    assert panel.log_text.splitlines() == text.splitlines()[-50:]


PROGRESS_BARS = """
import sys, time
for epoch in range(1, 9):
    print(f"epoch {epoch}", flush=True)
    for pct in (0, 25, 50, 75):
        sys.stderr.write(f"\\r{pct:3d}%|" + "#" * (pct // 25))
        sys.stderr.flush()
        time.sleep(0.03)
    sys.stderr.write("\\r100%|####\\n")
    sys.stderr.flush()
    time.sleep(0.25)
"""


def test_panel_opened_on_carriage_return_output_shows_each_line_once(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7 item 14, with a real job and orchestrator: a panel opened while tqdm-like ``\\r`` output streams
    (log events arriving while it reads the log file's tail) shows each line once."""
    from .test_widgets import manual_scheduler

    (tmp_path / "bars.py").write_text(PROGRESS_BARS)
    o = Orchestrator(tmp_path, reattach=False)
    try:
        handle = o.submit(JobSpec(name="bars", command=("python", str(tmp_path / "bars.py"))))
        log_path = Path(o.store.log_path(handle.id))
        wait_for(lambda: log_path.exists() and "epoch 2" in log_path.read_text(), timeout=60)
        real_read = W.JobPanel._read_log_tail

        def read_while_events_come(self: W.JobPanel) -> tuple[str, bool]:
            # Two log events arrive between the panel's subscribe and its read of the file.
            wait_for(lambda: sum(e.kind == "log" for e in self._pending) >= 2, timeout=30)
            return real_read(self)

        monkeypatch.setattr(W.JobPanel, "_read_log_tail", read_while_events_come)
        panel = W.JobPanel(o, handle.id, scheduler=manual_scheduler(), route_clicks=False)
        monkeypatch.undo()
        assert handle.wait(60).state is JobState.COMPLETED
        wait_for(lambda: "epoch 8" in panel.log_text and panel.log_text.endswith("100%|####"), timeout=10)
        text = log_path.read_bytes().decode()  # (read_text would turn each \r into \n)
        assert "\r" in text
        expected = W.LogBuffer(200)
        expected.feed(text)
        assert panel.log_text == expected.text()  # what a terminal shows of the file, each line once
        assert [line for line in panel.log_text.splitlines() if line.startswith("epoch")] == [
            f"epoch {i}" for i in range(1, 9)]
        panel.close()
    finally:
        o.close()
