"""The server's own reading of the job store: cheap, read-only queries the watcher runs every second.

The orchestrator's :class:`~trainorch_jupyter.store.Store` is the one writer; this is a second SQLite
connection on the same file (WAL: readers never block writers, nor wait for them) that only reads, in
``query_only`` mode, so a watcher tick never queues behind a driver's write transaction. Every method blocks:
the server calls them from worker threads (``asyncio.to_thread``), never on its event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model import Job, JobState

_LIVE = tuple(s.value for s in JobState if not s.is_terminal)


@dataclass(frozen=True)
class JobRow:
    """What changes when anything of a job changes: its record, its lease, its log and its metrics."""

    id: str
    state: str
    updated_at: str
    created_at: str
    owner: str | None
    lease_until: float
    log_offset: int
    metrics_offset: int
    cancel_requested: bool

    @property
    def fingerprint(self) -> tuple[Any, ...]:
        return (self.state, self.updated_at, self.log_offset, self.metrics_offset, self.cancel_requested)

    @property
    def live(self) -> bool:
        return self.state in _LIVE


class StoreView:
    """Read-only queries on one workspace's ``jobs.db`` (thread-safe; blocking)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout = 30000")
        self._conn.execute("PRAGMA query_only = 1")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def rows(self) -> list[JobRow]:
        """Every job's fingerprint, newest first (one query)."""
        rows = self._query(
            "SELECT id, state, updated_at, created_at, owner, lease_until, log_offset, metrics_offset,"
            " cancel_requested_at FROM jobs ORDER BY created_at DESC, id DESC")
        return [JobRow(r["id"], r["state"], r["updated_at"], r["created_at"], r["owner"], float(r["lease_until"] or 0),
                       int(r["log_offset"]), int(r["metrics_offset"]), r["cancel_requested_at"] is not None)
                for r in rows]

    def records(self, job_ids: list[str]) -> dict[str, Job]:
        out: dict[str, Job] = {}
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT id, record FROM jobs WHERE id IN ({marks})", chunk):
                out[r["id"]] = Job.from_dict(json.loads(r["record"]))
        return out

    def record(self, job_id: str) -> tuple[Job, JobRow] | None:
        rows = self._query(
            "SELECT id, state, updated_at, created_at, owner, lease_until, log_offset, metrics_offset,"
            " cancel_requested_at, record FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        r = rows[0]
        row = JobRow(r["id"], r["state"], r["updated_at"], r["created_at"], r["owner"], float(r["lease_until"] or 0),
                     int(r["log_offset"]), int(r["metrics_offset"]), r["cancel_requested_at"] is not None)
        return Job.from_dict(json.loads(r["record"])), row

    def metrics_after(self, job_id: str, seq: int) -> list[tuple[int, dict[str, Any]]]:
        """The job's metrics with a sequence number above ``seq``, in order."""
        rows = self._query("SELECT seq, data FROM metrics WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [(int(r["seq"]), json.loads(r["data"])) for r in rows]

    def log_offset(self, job_id: str) -> int | None:
        """How far the job's log file is committed (bytes after it may be rewritten); None: no such job."""
        rows = self._query("SELECT log_offset FROM jobs WHERE id = ?", (job_id,))
        return None if not rows else int(rows[0]["log_offset"])
