"""The SQLite job store: jobs, history, leases, logs by offset, metrics, artifacts, two processes."""

from __future__ import annotations

import multiprocessing
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainorch_jupyter.model import ArtifactInfo, Job, JobNotFound, JobSpec, JobState, new_job_id
from trainorch_jupyter.store import Store, tail_lines


def _job(name: str = "demo") -> Job:
    return Job(id=new_job_id(name), spec=JobSpec(name=name, command=("true",)))


def test_create_get_save_history(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert (tmp_path / ".trainorch" / "jobs.db").exists()
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"
    job = _job()
    store.create(job, runner_token="tok")
    assert store.get(job.id) == job
    job.transition(JobState.PROVISIONING)
    store.save(job)
    job.transition(JobState.FAILED)
    job.error = "boom"
    store.save(job, note="boom")
    assert [s for s, _, _ in store.state_history(job.id)] == ["PENDING", "PROVISIONING", "FAILED"]
    assert store.get(job.id).error == "boom"
    assert store.runner_token(job.id) == "tok"
    # The token is kept apart from the record that widgets and exports see.
    assert "tok" not in str(store.get(job.id).to_dict())
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_resolve_by_prefix_and_latest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(JobNotFound, match="no jobs"):
        store.resolve(None)
    a = Job(id="alpha-20260101-000000-aaaaaa", spec=JobSpec(name="alpha", command=("true",)),
            created_at=datetime(2026, 1, 1, tzinfo=UTC))
    b = Job(id="alpine-20260102-000000-bbbbbb", spec=JobSpec(name="alpine", command=("true",)),
            created_at=datetime(2026, 1, 2, tzinfo=UTC))
    store.create(a)
    store.create(b)
    assert store.resolve(None) == b.id
    assert store.resolve("alph") == a.id
    assert store.resolve(b.id) == b.id
    with pytest.raises(JobNotFound, match="several"):
        store.resolve("al")
    with pytest.raises(JobNotFound):
        store.resolve("zzz")
    with pytest.raises(JobNotFound):
        store.resolve("%")  # LIKE wildcards are literal
    assert [j.id for j in store.list_jobs()] == [b.id, a.id]
    assert store.list_jobs(state="PENDING", provider="local")[0].id == b.id
    assert store.list_jobs(state=JobState.RUNNING) == []


def test_log_offsets_survive_a_crash_between_write_and_commit(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = _job()
    store.create(job)
    assert store.prepare_log(job.id) == 0
    store.append_log(job.id, b"line 1\nline 2\n", 14)
    # A crash after the file write but before the offset commit leaves extra bytes ...
    with open(store.log_path(job.id), "ab") as fh:
        fh.write(b"line 3\n")
    # ... which the next follower cuts back, then reads again from the runner.
    assert store.prepare_log(job.id) == 14
    assert store.read_log(job.id) == "line 1\nline 2\n"
    store.append_log(job.id, b"line 3\n", 21)
    assert store.read_log(job.id, tail=2) == "line 2\nline 3\n"


def test_metrics_and_artifacts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = _job()
    store.create(job)
    store.append_metrics(job.id, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], 40)
    store.append_metrics(job.id, [{"kind": "eval", "step": 2, "eval_loss": 1.7}], 80)
    assert store.metrics_offset(job.id) == 80
    assert [m.get("step") for m in store.metrics(job.id)] == [1, 2, 2]
    now = datetime.now(UTC)
    arts = [ArtifactInfo(f"{job.id}:a.bin", job.id, tmp_path / "a.bin", 3, "0" * 64, now, {"name": "a.bin"})]
    store.save_artifacts(job.id, arts)
    assert store.artifacts(job.id) == arts


def test_leases(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = _job()
    store.create(job)
    host = os.uname().nodename
    assert store.claim(job.id, f"{host}:{os.getpid()}:a")
    assert not store.claim(job.id, f"{host}:{os.getpid()}:b")  # live owner holds it
    store.release(job.id, f"{host}:{os.getpid()}:a")
    assert store.claim(job.id, f"{host}:{os.getpid()}:b")
    # An owner whose process is gone loses the job at once, even with time left on its lease.
    proc = multiprocessing.get_context("spawn").Process(target=int)
    proc.start()
    proc.join()
    dead = f"{host}:{proc.pid}:c"
    store2 = Store(tmp_path)
    job2 = _job("other")
    store2.create(job2, owner=dead, lease_s=3600)
    assert store.claim(job2.id, f"{host}:{os.getpid()}:d")


def _writer(workspace: str, n: int, tag: str) -> None:
    store = Store(workspace)
    for i in range(n):
        job = Job(id=f"{tag}-{i}", spec=JobSpec(name=tag, command=("true",)))
        store.create(job)
        store.append_metrics(job.id, [{"step": i}], i + 1)
        job.transition(JobState.PROVISIONING)
        store.save(job)


def test_two_processes_on_one_workspace(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 60, f"p{k}")) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = Store(tmp_path)
    jobs = store.list_jobs()
    assert len(jobs) == 120
    assert all(j.state is JobState.PROVISIONING for j in jobs)
    assert store._query("PRAGMA integrity_check")[0][0] == "ok"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"bb", b"\n", b"\r", b"x" * 50]), max_size=60), st.integers(0, 12),
       st.integers(1, 64))
def test_tail_lines_matches_a_plain_split(parts: list[bytes], n: int, block: int) -> None:
    import re
    import tempfile

    content = b"".join(parts)
    with tempfile.NamedTemporaryFile() as fh:
        fh.write(content)
        fh.flush()
        lines = re.findall(rb"[^\n]*\n|[^\n]+$", content)
        expected = b"".join(lines[-n:]) if n else b""
        assert tail_lines(Path(fh.name), n, block=block) == expected.decode()
        cut = len(content) // 2
        lines = re.findall(rb"[^\n]*\n|[^\n]+$", content[:cut])
        assert tail_lines(Path(fh.name), n, end=cut, block=block) == (b"".join(lines[-n:]) if n else b"").decode()


def _open_together(workspace: str, start: Any) -> None:
    start.wait()
    store = Store(workspace)
    job = Job(id=f"j-{os.getpid()}", spec=JobSpec(name="j", command=("true",)))
    store.create(job)


def test_many_kernels_opening_a_new_workspace_at_once(tmp_path: Path) -> None:
    """The switch to WAL on a new database races (SQLite answers "database is locked" at once, without
    waiting); every opener must still get a working store. Before the fix: ~1 in 20 openers failed here."""
    ctx = multiprocessing.get_context("fork")  # fork: the openers start within microseconds of each other
    for round_ in range(25):
        ws = tmp_path / f"ws{round_}"
        start = ctx.Event()
        procs = [ctx.Process(target=_open_together, args=(str(ws), start)) for _ in range(8)]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 8, f"round {round_}"
        assert len(Store(ws).list_jobs()) == 8


def test_workspace_id_is_made_once_and_shared(tmp_path: Path) -> None:
    a, b = Store(tmp_path), Store(tmp_path)
    wid = a.workspace_id()
    assert len(wid) == 8 and int(wid, 16) >= 0
    assert b.workspace_id() == wid == a.workspace_id()
    assert Store(tmp_path / "other").workspace_id() != wid
    a.close()
    b.close()


def test_cancel_requests_of_many_jobs_in_one_query(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for name in ("a", "b", "c"):
        store.create(Job(id=name, spec=JobSpec(name=name, command=("true",))))
    assert store.cancel_requests([]) == set()
    assert store.request_cancel("b")
    assert store.cancel_requests(["a", "b", "c", "missing"]) == {"b"}
    store.close()


def test_metrics_since_a_row(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create(Job(id="m", spec=JobSpec(name="m", command=("true",))))
    store.append_metrics("m", [{"step": 1}, {"step": 2}], 10)
    store.append_metrics("m", [{"step": 3}], 20)
    assert [m["step"] for m in store.metrics("m")] == [1, 2, 3]
    assert [m["step"] for m in store.metrics("m", since=2)] == [3]
    assert store.metrics("m", since=3) == []
    store.close()
