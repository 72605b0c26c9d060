"""Unit tests of the notebook widgets, driven by synthetic events (no kernel, no orchestrator)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import ipywidgets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainorch_jupyter import widgets as W
from trainorch_jupyter.model import ArtifactInfo, Job, JobSpec, JobState, utcnow


class FakeEvent:
    def __init__(self, job_id: str, kind: str, data: Any, time: float = 0.0) -> None:
        self.job_id, self.kind, self.data, self.time = job_id, kind, data, time


class FakeStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: dict[str, Job] = {}
        self._metrics: dict[str, list[dict[str, Any]]] = {}
        self._artifacts: dict[str, list[ArtifactInfo]] = {}

    def get(self, job_id: str) -> Job:
        return Job.from_dict(self.jobs[job_id].to_dict())

    def list_jobs(self) -> list[Job]:
        return sorted((self.get(j) for j in self.jobs), key=lambda j: j.created_at, reverse=True)

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._metrics.get(job_id, []))

    def log_path(self, job_id: str) -> Path:
        return self.root / ".trainorch" / "logs" / f"{job_id}.log"

    def artifacts(self, job_id: str) -> list[ArtifactInfo]:
        return list(self._artifacts.get(job_id, []))


class FakeOrch:
    """The parts of the orchestrator API (docs/API.md) the widgets use; events are emitted by hand."""

    def __init__(self, root: Path) -> None:
        self.store = FakeStore(root)
        self.subs: list[tuple[str | None, Callable[[Any], None]]] = []
        self.cancelled: list[str] = []
        self.provider_names = ["local", "runpod"]
        self.downloads: list[Any] | None = None  # a list: download() returns futures the test ends

    def add_job(self, name: str = "demo", state: JobState = JobState.RUNNING, provider: str = "local", **kw: Any) -> Job:
        job = Job(id=f"{name}-20250101-000000-abcdef", spec=JobSpec(name=name, command=("python", "-c", "1")),
                  provider=provider, state=state, **kw)
        if state is not JobState.PENDING:
            job.started_at = utcnow() - timedelta(seconds=90)
        if state.is_terminal:
            job.ended_at = utcnow()
        self.store.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def jobs(self) -> list[Job]:
        return self.store.list_jobs()

    def subscribe(self, cb: Callable[[Any], None], job_id: str | None = None) -> Callable[[], None]:
        entry = (job_id, cb)
        self.subs.append(entry)
        return lambda: self.subs.remove(entry)

    def emit(self, job_id: str, kind: str, data: Any, time: float = 0.0) -> None:
        if kind == "metric":
            self.store._metrics.setdefault(job_id, []).append(data)
        if kind == "state":
            self.store.jobs[job_id] = data
        if kind == "log":
            path = self.store.log_path(job_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.write(data)
        for jid, cb in list(self.subs):
            if jid is None or jid == job_id:
                cb(FakeEvent(job_id, kind, data, time))

    def set_state(self, job_id: str, state: JobState, **kw: Any) -> Job:
        job = self.store.get(job_id)
        job.transition(state)
        for k, v in kw.items():
            setattr(job, k, v)
        self.emit(job_id, "state", job)
        return job

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def download(self, job_id: str) -> Any:
        from concurrent.futures import Future

        if self.downloads is not None:  # the test ends them
            f: Future[list[ArtifactInfo]] = Future()
            self.downloads.append(f)
            return f
        f = Future()
        f.set_result(self.store.artifacts(job_id))
        return f


@pytest.fixture
def orch(tmp_path: Path) -> FakeOrch:
    return FakeOrch(tmp_path)


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every comm message the widgets would send: (model class, bytes)."""
    out: list[tuple[str, int]] = []
    lock = threading.Lock()

    def fake_send(self: ipywidgets.Widget, msg: dict[str, Any], buffers: Any = None) -> None:
        with lock:
            out.append((type(self).__name__, len(json.dumps(msg, default=str))))

    monkeypatch.setattr(ipywidgets.Widget, "_send", fake_send)
    return out


def manual_scheduler() -> W._Scheduler:
    return W._Scheduler(clock=lambda: 0.0, autostart=False)


def make_panel(orch: FakeOrch, job_id: str, sched: W._Scheduler, **kw: Any) -> W.JobPanel:
    panel = W.JobPanel(orch, job_id, scheduler=sched, route_clicks=False, **kw)
    sched.unregister(panel)
    sched.register(panel, start=False)
    return panel


def metric(step: int, total: int = 100, loss: float | None = None, **kw: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"step": step, "total_steps": total, "loss": 3.0 - step * 0.01 if loss is None else loss}
    m.update(kw)
    return m


# --------------------------------------------------------------------------------------------
# Throttling and coalescing
# --------------------------------------------------------------------------------------------


def test_many_events_give_bounded_updates(orch: FakeOrch, sends: list[tuple[str, int]]) -> None:
    job = orch.add_job()
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    sends.clear()
    # 10 simulated seconds: 20,000 log lines in 1,000 events, 1,000 metrics, ticks every 0.1 s.
    t = 0.0
    for i in range(100):
        for j in range(10):
            n = i * 10 + j
            orch.emit(job.id, "log", "".join(f"line {n * 20 + k}\n" for k in range(20)), time=t)
            orch.emit(job.id, "metric", metric(n, total=1000), time=t)
        t += 0.1
        sched.tick(t)
    msgs_per_s = len(sends) / 10.0
    # Header <= 2/s, log <= 2/s, chart <= 1/s: ~5/s for one panel; always under the global 20/s.
    assert 10 <= len(sends) <= 10 * 6, sends[:20]
    assert msgs_per_s <= W.GLOBAL_MSGS_PER_S
    panel.flush_now()
    assert panel.progress.step == 999
    assert panel.log_text.splitlines()[-1] == "line 19999"
    assert len(panel.log_text.splitlines()) == 200


def test_global_budget_shared_by_many_panels(orch: FakeOrch, sends: list[tuple[str, int]]) -> None:
    sched = manual_scheduler()
    panels = []
    for i in range(12):
        job = orch.add_job(name=f"job{i}")
        panels.append(make_panel(orch, job.id, sched))
    sends.clear()
    t = 0.0
    for step in range(100):  # 10 s, every panel gets a log line and a metric per tick
        for p in panels:
            orch.emit(p.job_id, "log", f"step {step}\n", time=t)
            orch.emit(p.job_id, "metric", metric(step), time=t)
        t += 0.1
        sched.tick(t)
    # The bucket starts full (20) and refills at 20/s.
    assert len(sends) <= W.GLOBAL_MSGS_PER_S * 10 + W.GLOBAL_MSGS_PER_S + 1
    assert len(sends) >= W.GLOBAL_MSGS_PER_S * 10 * 0.8  # the budget is used, not wasted
    # Round robin: every panel got updates.
    for p in panels:
        assert p._parts["log"].updates >= 2, p.job_id


def test_unchanged_values_are_not_sent(orch: FakeOrch, sends: list[tuple[str, int]]) -> None:
    job = orch.add_job(state=JobState.COMPLETED)
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    sends.clear()
    for t in range(1, 50):
        for part in panel._parts.values():
            part.dirty = True
        sched.tick(float(t))
    assert sends == []


def test_byte_budget_defers_large_values(orch: FakeOrch, sends: list[tuple[str, int]]) -> None:
    job = orch.add_job()
    sched = W._Scheduler(msgs_per_s=1000, bytes_per_s=50_000, clock=lambda: 0.0, autostart=False)
    panel = make_panel(orch, job.id, sched, log_lines=1000)
    sends.clear()
    t = 0.0
    for _ in range(100):
        orch.emit(job.id, "log", ("x" * 1500 + "\n") * 50)  # every log render is ~1.5 MB... capped by lines
        t += 0.1
        sched.tick(t)
    total = sum(n for _, n in sends)
    # A value larger than the bucket goes out only when the bucket is full: about one per bucket.
    assert total <= 50_000 * 10 + 2_000_000
    assert panel._parts["log"].updates <= 12


# --------------------------------------------------------------------------------------------
# Log buffer
# --------------------------------------------------------------------------------------------


def test_log_buffer_is_bounded() -> None:
    buf = W.LogBuffer(50)
    for i in range(10_000):
        buf.feed(f"line {i}\n")
    lines = buf.tail_lines()
    assert len(lines) == 50
    assert lines[0] == "line 9950" and lines[-1] == "line 9999"
    assert buf.total_lines == 10_000


def test_log_buffer_partial_lines_carriage_returns_and_long_lines() -> None:
    buf = W.LogBuffer(5, max_line_chars=20)
    buf.feed("abc")
    assert buf.tail_lines() == ["abc"]
    buf.feed("def\nprogress 10%\rprogress 50%\rprogress 100%\n" + "y" * 100 + "\n")
    lines = buf.tail_lines()
    assert lines[0] == "abcdef"
    assert lines[1] == "progress 100%"
    assert lines[2].startswith("y" * 20) and len(lines[2]) < 30


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab\n", max_size=30), max_size=40), st.integers(min_value=1, max_value=8))
def test_log_buffer_matches_the_text_whatever_the_chunks(chunks: list[str], maxlen: int) -> None:
    buf = W.LogBuffer(maxlen)
    for c in chunks:
        buf.feed(c)
    text = "".join(chunks)
    expected = text.split("\n")
    if expected and expected[-1] == "":
        expected.pop()
    assert buf.tail_lines() == expected[-maxlen:]


def test_log_overlap_at_chunk_boundaries() -> None:
    assert W._log_overlap("a\nb\nc\n", ["b\nc\n", "d\n"], cut=False) == 1
    assert W._log_overlap("a\nb\n", ["x\n"], cut=False) == 0
    assert W._log_overlap("", ["x\n"], cut=False) == 0
    # \r progress redraws are compared as the bytes they are
    assert W._log_overlap("start\n10%\r50%\r100%\n", ["10%\r50%", "\r100%\n", "next\n"], cut=False) == 2
    # a partial last line: the chunk that ends it follows
    assert W._log_overlap("a\nhal", ["hal", "f\n"], cut=False) == 1
    # the tail is the end of a longer file: a longer prefix of the chunks ending with the whole tail matches
    assert W._log_overlap("c\nd\n", ["a\nb\nc\n", "d\n", "e\n"], cut=True) == 2
    assert W._log_overlap("c\nd\n", ["a\nb\nc\n", "d\n", "e\n"], cut=False) == 0


def test_panel_opening_on_carriage_return_output_shows_each_line_once(orch: FakeOrch) -> None:
    """Issue 7 item 14: events that came while the history was read, with \\r progress output, are not doubled."""
    job = orch.add_job()
    first = "epoch 1\n"
    bar = "  0%|   | 0/3\r 33%|#  | 1/3\r 67%|## | 2/3\r100%|###| 3/3\n"
    after = "epoch 2\n 50%|#  | 1/2\r"  # ends in a partial (redrawn) line
    for chunk in (first, bar, after):
        orch.emit(job.id, "log", chunk)  # written to the log file (as the orchestrator does before it emits)
    later = "100%|###| 2/2\ndone\n"  # comes after the history was read: not in the file yet
    sched = manual_scheduler()
    panel = W.JobPanel.__new__(W.JobPanel)  # the events arrive between subscribe and load
    panel._lock = threading.RLock()
    panel._loaded = False
    panel._pending = []
    panel._closed = False
    panel._scheduler = sched
    for chunk in (bar, after, later):
        panel._on_event(FakeEvent(job.id, "log", chunk))
    pending = panel._pending
    real = make_panel(orch, job.id, sched)
    real._loaded = False
    real._logbuf = W.LogBuffer(200)
    real._pending = pending
    real._load_history()
    assert real.log_text.splitlines() == ["epoch 1", "100%|###| 3/3", "epoch 2", "100%|###| 2/2", "done"]


# --------------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------------


def _polyline(svg: str, cls: str) -> list[tuple[float, float]]:
    m = re.search(rf"<polyline class='{cls}'[^>]* points='([^']*)'", svg)
    assert m, svg[:500]
    return [tuple(map(float, p.split(","))) for p in m.group(1).split()]  # type: ignore[misc]


def test_svg_chart_holds_every_point() -> None:
    train = [(float(s), 3.0 / (1 + s)) for s in range(1, 501)]
    ev = [(float(s), 2.0 / (1 + s)) for s in range(0, 501, 50)]
    svg = W.render_loss_svg(train, ev, total_steps=500)
    pts = _polyline(svg, "train")
    assert len(pts) == 500
    assert len(_polyline(svg, "eval")) == len(ev)
    assert "data-train-points='500'" in svg and f"data-eval-points='{len(ev)}'" in svg
    xs = [p[0] for p in pts]
    assert xs == sorted(xs)
    # lower loss is drawn higher on the page (larger y)... no: SVG y grows downwards
    assert pts[0][1] < pts[-1][1]


def test_svg_chart_decimates_long_runs_keeping_extremes() -> None:
    train = [(float(s), 1.0 + (5.0 if s == 7777 else 0.0) - s * 1e-5) for s in range(20_000)]
    svg = W.render_loss_svg(train, max_points=1000)
    pts = _polyline(svg, "train")
    assert len(pts) <= 1000
    assert "data-train-points='20000'" in svg
    top = min(p[1] for p in pts)  # the spike is the smallest y
    assert top < 30  # the spike survived decimation
    assert len(svg) < 20_000


def test_svg_chart_empty_and_flat() -> None:
    assert "no loss reported yet" in W.render_loss_svg([])
    svg = W.render_loss_svg([(1.0, 2.0), (2.0, 2.0)])
    assert len(_polyline(svg, "train")) == 2


def test_chart_bytes_per_update() -> None:
    """Bytes one chart update carries (reported in the notes)."""
    for n, limit in ((100, 4_000), (1000, 16_000), (5000, 30_000)):
        train = [(float(s), 2.0 + 1.0 / (1 + s)) for s in range(n)]
        size = len(W.render_loss_svg(train, total_steps=n).encode())
        assert size < limit, (n, size)


def test_progress_eta_and_kinds() -> None:
    p = W.Progress()
    p.add({"kind": "eval", "step": 0, "eval_loss": 3.0}, when=100.0)
    p.add({"step": 10, "total_steps": 100, "loss": 2.5}, when=100.0)
    p.add({"step": 20, "total_steps": 100, "loss": 2.0}, when=110.0)
    assert p.fraction == pytest.approx(0.2)
    assert p.eta() == pytest.approx(40.0)  # 20 steps in 10 s since step 0, 80 steps left
    p.add({"step": 30, "total_steps": 100, "loss": 1.9, "eta_s": 42.0})
    assert p.eta() == 42.0
    p.add({"kind": "summary", "eval_loss": 1.5, "train_loss": 1.8})
    p.add({"step": 31, "loss": float("nan")})
    assert p.eval == [(0.0, 3.0)]
    assert len(p.train) == 3
    assert p.last_eval_loss == 1.5
    p.add({"step": 100, "total_steps": 100, "loss": 1.0})
    assert p.eta() == 0.0


# --------------------------------------------------------------------------------------------
# The panel's content
# --------------------------------------------------------------------------------------------


def _artifact(tmp: Path, job_id: str, name: str, data: bytes) -> ArtifactInfo:
    path = tmp / "artifacts" / job_id / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ArtifactInfo(artifact_id=f"a-{name}", job_id=job_id, path=path, size_bytes=len(data),
                        hash_sha256=hashlib.sha256(data).hexdigest(), created_at=utcnow(), metadata={"name": name})


def test_artifact_table_rows(orch: FakeOrch, tmp_path: Path) -> None:
    job = orch.add_job(state=JobState.COMPLETED)
    arts = [_artifact(tmp_path, job.id, n, n.encode() * 100) for n in ("adapter_model.safetensors", "adapter_config.json")]
    orch.store._artifacts[job.id] = arts
    panel = make_panel(orch, job.id, manual_scheduler())
    table = panel.artifact_table.value
    assert table.count("<tr class='trainorch-artifact'>") == 2
    for a in arts:
        assert a.hash_sha256 in table and a.name in table
    assert table.count("\u2714 verified") == 2
    assert not panel.download_button.disabled
    # a file that went missing is shown as such
    Path(arts[0].path).unlink()
    panel._mark("artifacts")
    panel.flush_now()
    assert "missing" in panel.artifact_table.value


def test_finished_panel_builds_history_from_store(orch: FakeOrch) -> None:
    job = orch.add_job(state=JobState.RUNNING)
    for s in range(1, 51):
        orch.emit(job.id, "metric", metric(s, total=50))
    orch.emit(job.id, "log", "".join(f"row {i}\n" for i in range(1000)))
    orch.set_state(job.id, JobState.COMPLETED)
    panel = make_panel(orch, job.id, manual_scheduler(), log_lines=100)
    assert panel.state is JobState.COMPLETED
    assert panel.progress.fraction == 1.0
    assert len(_polyline(panel.chart.value, "train")) == 50
    assert panel.log_text.splitlines() == [f"row {i}" for i in range(900, 1000)]
    assert "data-lines='100'" in panel.log_view.value
    assert "data-progress='100.0'" in panel.header.value
    assert "Job completed" in panel.header.value
    assert panel.cancel_button.disabled
    assert not panel.download_button.disabled  # COMPLETED


def test_events_during_history_load_are_not_doubled(orch: FakeOrch) -> None:
    job = orch.add_job()
    orch.emit(job.id, "log", "a\nb\nc\n")
    orch.emit(job.id, "metric", metric(1))
    panel = W.JobPanel.__new__(W.JobPanel)  # simulate: the events arrive between subscribe and load
    panel._lock = threading.RLock()
    panel._loaded = False
    panel._pending = []
    panel._closed = False
    panel._scheduler = manual_scheduler()
    panel._on_event(FakeEvent(job.id, "log", "b\nc\n"))
    panel._on_event(FakeEvent(job.id, "log", "d\n"))
    panel._on_event(FakeEvent(job.id, "metric", metric(1)))
    panel._on_event(FakeEvent(job.id, "metric", metric(2)))
    pending = panel._pending
    real = make_panel(orch, job.id, manual_scheduler())
    real._loaded = False
    real._progress = W.Progress()
    real._logbuf = W.LogBuffer(200)
    real._pending = pending
    real._load_history()
    assert real.log_text.splitlines() == ["a", "b", "c", "d"]
    assert [p[0] for p in real.progress.train] == [1.0, 2.0]


def test_live_updates_reach_the_widgets(orch: FakeOrch) -> None:
    job = orch.add_job(gpu="RTX 4090", price_per_hour=0.5)
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    assert "RTX 4090" in panel.header.value and "$0.50/h" in panel.header.value
    assert "RUNNING" in panel.header.value
    orch.emit(job.id, "metric", metric(10, total=40, loss=1.5), time=1.0)
    orch.emit(job.id, "metric", {"kind": "eval", "step": 10, "eval_loss": 1.7}, time=1.0)
    orch.emit(job.id, "log", "hello <b>world</b>\n")
    sched.tick(10.0)
    assert "step 10/40" in panel.header.value and "25%" in panel.header.value
    assert "hello &lt;b&gt;world&lt;/b&gt;" in panel.log_view.value  # escaped
    assert len(_polyline(panel.chart.value, "eval")) == 1
    orch.set_state(job.id, JobState.FAILED, exit_code=137, error="killed",
                   diagnosis={"cause": "out_of_memory", "summary": "The GPU ran out of memory.",
                              "suggestions": ["lower --batch-size", "enable --gradient-checkpointing"],
                              "evidence": ["CUDA out of memory. Tried to allocate 2.00 GiB"]})
    sched.tick(20.0)
    assert "FAILED" in panel.header.value and STATE_COLOR(JobState.FAILED) in panel.header.value
    assert "Job failed (exit code 137): The GPU ran out of memory." in panel.header.value
    diag = panel.diagnosis_view.value
    assert "out_of_memory" in diag and "lower --batch-size" in diag and "CUDA out of memory" in diag
    assert panel.cancel_button.disabled


def STATE_COLOR(state: JobState) -> str:
    return W.STATE_COLORS[state]


def test_cancel_needs_confirmation(orch: FakeOrch) -> None:
    job = orch.add_job()
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    assert panel.confirm_button.layout.display == "none"
    panel.cancel_button.click()
    assert panel.confirm_button.layout.display is None
    assert panel.cancel_button.layout.display == "none"
    assert orch.cancelled == []
    panel.keep_button.click()
    assert panel.confirm_button.layout.display == "none"
    panel.cancel_button.click()
    panel.confirm_button.click()
    for _ in range(100):
        if orch.cancelled:
            break
        threading.Event().wait(0.01)
    assert orch.cancelled == [job.id]


def test_download_button(orch: FakeOrch, tmp_path: Path) -> None:
    job = orch.add_job(state=JobState.RUNNING)
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    assert panel.download_button.disabled
    art = _artifact(tmp_path, job.id, "adapter_config.json", b"{}")
    orch.store._artifacts[job.id] = [art]
    orch.emit(job.id, "artifacts", [art])
    panel.flush_now()
    assert not panel.download_button.disabled
    panel.download_button.click()
    sched.tick(1.0)
    assert "1 file(s) verified" in panel.action_label.value
    assert not panel.download_button.disabled


def test_download_button_never_hangs(orch: FakeOrch, tmp_path: Path) -> None:
    """Issue 7 item 14: a download that never answers frees the button after a bounded wait; nothing blocks
    a thread on it, and an end that comes later still shows."""
    job = orch.add_job(state=JobState.COMPLETED)
    orch.downloads = []
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    panel.download_button.click()
    assert len(orch.downloads) == 1
    sched.tick(1.0)
    assert panel.download_button.disabled and "downloading" in panel.action_label.value
    sched.tick(3600.0)  # an hour later (the wait is bounded at 15 min)
    assert not panel.download_button.disabled
    assert "no answer from the download after 15m 00s" in panel.action_label.value
    # it ends later: the panel shows its files
    art = _artifact(tmp_path, job.id, "adapter_config.json", b"{}")
    orch.downloads[0].set_result([art])
    sched.tick(3601.0)
    assert "1 file(s) verified" in panel.action_label.value
    assert panel.artifact_table.value.count("<tr class='trainorch-artifact'>") == 1
    # a failed one says so, and frees the button
    panel.download_button.click()
    orch.downloads[1].set_exception(RuntimeError("the machine is gone"))
    sched.tick(3602.0)
    assert "download failed: the machine is gone" in panel.action_label.value
    assert not panel.download_button.disabled


def test_close_unsubscribes(orch: FakeOrch) -> None:
    job = orch.add_job()
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    assert len(orch.subs) == 1
    panel.close()
    assert orch.subs == []
    assert not sched._views or all(r() is not panel for r in sched._views)


def test_hidden_panel_slows_down(orch: FakeOrch, sends: list[tuple[str, int]]) -> None:
    job = orch.add_job()
    sched = manual_scheduler()
    panel = make_panel(orch, job.id, sched)
    panel._view_count = 1
    panel._view_count = 0  # shown, then its output was cleared (the cell ran again)
    sends.clear()
    t = 0.0
    for i in range(100):
        orch.emit(job.id, "log", f"l{i}\n")
        t += 0.1
        sched.tick(t)
    assert len(sends) <= 3 * (10 / W.HIDDEN_INTERVAL_S + 1)


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------


def test_dashboard_rows_filters_open_and_notices(orch: FakeOrch) -> None:
    a = orch.add_job(name="alpha", state=JobState.RUNNING)
    b = orch.add_job(name="beta", state=JobState.COMPLETED, provider="runpod", price_per_hour=1.2)
    orch.emit(a.id, "metric", metric(5, total=10, loss=0.75))
    sched = manual_scheduler()
    dash = W.Dashboard(orch, scheduler=sched, route_clicks=False)
    table = dash.table.value
    assert table.count("<tr class='trainorch-row'") == 2
    assert "50%" in table and "0.75" in table
    assert set(dash.selector.options) == {(a.id, a.id), (b.id, b.id)}
    dash.state_filter.value = "COMPLETED"
    assert dash.table.value.count("<tr class='trainorch-row'") == 1 and b.id in dash.table.value
    dash.state_filter.value = ""
    dash.provider_filter.value = "runpod"
    assert a.id not in dash.table.value
    dash.provider_filter.value = ""
    dash.selector.value = a.id
    assert dash.panel is not None and dash.panel.job_id == a.id
    assert dash.detail.children == (dash.panel,)
    # a job finishes: the row and a notice say so
    orch.set_state(a.id, JobState.COMPLETED)
    sched.tick(100.0)
    assert "data-state='COMPLETED'" in dash.notice.value and a.id in dash.notice.value
    assert f"data-job-id='{a.id}' data-state='COMPLETED'" in dash.table.value
    # a new job appears
    c = orch.add_job(name="gamma", state=JobState.PENDING)
    orch.emit(c.id, "state", orch.get(c.id))
    sched.tick(200.0)
    assert c.id in dash.table.value
    dash.close()
    assert orch.subs == []


def test_dashboard_initial_filters(orch: FakeOrch) -> None:
    orch.add_job(name="alpha", state=JobState.RUNNING)
    orch.add_job(name="beta", state=JobState.FAILED)
    dash = W.Dashboard(orch, state="failed", scheduler=manual_scheduler(), route_clicks=False)
    assert dash.table.value.count("<tr class='trainorch-row'") == 1
    dash.close()


# --------------------------------------------------------------------------------------------
# Text fallback
# --------------------------------------------------------------------------------------------


def test_text_summary_and_terminal_display(orch: FakeOrch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = orch.add_job(state=JobState.FAILED, exit_code=1, error="Traceback...\nboom",
                       diagnosis={"cause": "bad_data", "summary": "The data file has no text column.",
                                  "suggestions": ["add a 'text' field"]})
    text = W.text_summary(job)
    assert job.id in text and "FAILED" in text and "bad_data" in text and "add a 'text' field" in text
    assert "\n" in text and len(text.splitlines()) <= 6

    class Handle:
        id = job.id
        orchestrator = orch

        @property
        def record(self) -> Job:
            return orch.get(job.id)

        def metrics(self) -> list[dict[str, Any]]:
            return [metric(3, total=10, loss=0.5)]

    W.display_job(Handle())  # no kernel here: prints the summary
    out = capsys.readouterr().out
    assert job.id in out and "step 3/10 (30%)" in out and "loss 0.5" in out
    W.display_dashboard(orch)
    assert job.id in capsys.readouterr().out
    done = orch.add_job(name="ok", state=JobState.COMPLETED, gpu="H100", price_per_hour=2.0)
    done.artifacts = [_artifact(tmp_path, done.id, "a.bin", b"x" * 2048)]
    summary = W.text_summary(done)
    assert "H100" in summary and "$2.00/h" in summary and "1 files (2.0 KB)" in summary


def test_formatting() -> None:
    assert W._fmt_duration(5) == "5s"
    assert W._fmt_duration(125) == "2m 05s"
    assert W._fmt_duration(7300) == "2h 01m"
    assert W._fmt_duration(None) == "-"
    assert W._fmt_bytes(10) == "10 B"
    assert W._fmt_bytes(3 * 1024 * 1024) == "3.0 MB"
    assert W._fmt_money(0.001) == "$0.0010"
    assert W._fmt_money(1.5, per_hour=True) == "$1.50/h"


# --------------------------------------------------------------------------------------------
# The click hook (issue 7 item 18): guarded, and the frontend's subshell first
# --------------------------------------------------------------------------------------------


class _KernelStub:
    def __init__(self, subshells: bool = True) -> None:
        self._supports_kernel_subshells = subshells


@pytest.fixture
def kernel_stub(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    from ipykernel.kernelbase import Kernel

    def install(subshells: bool = True) -> None:
        stub = _KernelStub(subshells)
        monkeypatch.setattr(Kernel, "initialized", classmethod(lambda cls: True))
        monkeypatch.setattr(Kernel, "instance", classmethod(lambda cls, *a, **k: stub))

    return install


class _Comm:
    def _reply_subshell_for(self, data: Any, default: Any) -> Any:
        return default


class _OtherComm:
    def _reply_subshell_for(self, data: Any) -> Any:  # a changed private API
        return None


class _Widget:
    def __init__(self, comm: Any) -> None:
        self.comm = comm


def test_click_hook_checks_what_it_overrides(kernel_stub: Callable[[bool], None], caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINORCH_WIDGET_SUBSHELL", raising=False)
    monkeypatch.setattr(W, "_create_subshell", lambda: "own")
    assert W._hook_problem(_Comm())[0] == "not in an IPython kernel"
    kernel_stub(True)
    router = W._SubshellRouter()
    comm = _Comm()
    assert router.route(_Widget(comm))
    assert router._subshell_id == "own"
    with monkeypatch.context() as m:
        m.setattr(W, "_live_subshells", lambda: {"own"})
        assert comm._reply_subshell_for({}, None) == "own"
    caplog.set_level(logging.INFO, logger="trainorch_jupyter.widgets")
    for bad, text in ((object(), "has no _reply_subshell_for(data, default)"),
                      (_OtherComm(), "is not the (data, default) this hook was written for")):
        caplog.clear()
        assert not router.route(_Widget(bad)) and not router.route(_Widget(bad))
        lines = [r for r in caplog.records if text in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING  # one clear line, once
        assert "waits while another cell runs" in lines[0].getMessage()
    kernel_stub(False)
    caplog.clear()
    assert not W._SubshellRouter().route(_Widget(_Comm()))
    assert [r.levelno for r in caplog.records if "has no kernel subshells" in r.getMessage()] == [logging.INFO]
    monkeypatch.setenv("TRAINORCH_WIDGET_SUBSHELL", "0")
    kernel_stub(True)
    assert not W._SubshellRouter().route(_Widget(_Comm()))


def test_click_route_frontend_subshell_then_own_then_main(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    live: set[str] = {"front", "own"}
    monkeypatch.setattr(W, "_live_subshells", lambda: set(live))
    router = W._SubshellRouter()
    router._subshell_id = "own"
    assert router._route({}, "front") == "front"  # the official path: where the frontend sent it
    assert router._route({}, None) == "own"  # sent on the main shell: ours
    caplog.set_level(logging.WARNING, logger="trainorch_jupyter.widgets")
    live.discard("front")
    assert router._route({}, "front") == "own"  # a stale id from the frontend: not dropped
    assert "the frontend's subshell front is gone" in caplog.text and "own subshell" in caplog.text
    live.discard("own")
    caplog.clear()
    assert router._route({}, None) is None  # ours is gone: the main shell, and the next panel makes one
    assert router._subshell_id is None and router.stale[-1] == "own"
    assert "this kernel's own subshell own is gone" in caplog.text and "the main shell" in caplog.text
    monkeypatch.setattr(W, "_create_subshell", lambda: "own2")
    assert router.subshell_id() == "own2"
    monkeypatch.setenv("TRAINORCH_WIDGET_SUBSHELL", "frontend")
    assert W._SubshellRouter().subshell_id() is None  # frontend only: no subshell of ours
    live.update({"front", "own2"})
    assert router._route({}, "front", own=False) == "front" and router._route({}, None, own=False) is None
