"""The job store: SQLite (WAL) for jobs, state history, metrics and artifacts; plain files for logs.

Layout under the workspace::

    .trainorch/jobs.db          jobs, state history, metrics, artifacts
    .trainorch/logs/<job>.log   full logs, byte-identical to the runner's log up to ``log_offset``

Several processes (two kernels on one workspace) may open the same store: every write is one
``BEGIN IMMEDIATE`` transaction and readers never block writers (WAL). A job is followed by one
orchestrator at a time: it holds a lease (``owner``, ``lease_until``) that it renews; another
orchestrator takes a job over only when the lease ran out or its owner's process is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from ._process import pid_alive
from .model import ArtifactInfo, Job, JobNotFound, JobState

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    record TEXT NOT NULL,
    runner_token TEXT,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    log_offset INTEGER NOT NULL DEFAULT 0,
    metrics_offset INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS state_history (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    note TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    step INTEGER,
    kind TEXT,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
"""


def process_owner_id() -> str:
    """``host:pid:random`` — identifies one orchestrator instance."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def _owner_alive(owner: str) -> bool:
    """False only when the owner ran on this host and its process is gone."""
    try:
        host, pid_s, _ = owner.split(":", 2)
        pid = int(pid_s)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    return pid_alive(pid)


class Store:
    """Thread-safe access to one workspace's job store."""

    def __init__(self, workspace: Path | str) -> None:
        self.workspace = Path(workspace).resolve()
        self.root = self.workspace / ".trainorch"
        self.logs_dir = self.root / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "jobs.db"
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._init_db()

    @retry(retry=retry_if_exception(lambda e: isinstance(e, sqlite3.OperationalError) and "locked" in str(e)),
           stop=stop_after_delay(60), wait=wait_random_exponential(multiplier=0.05, max=1.0), reraise=True)
    def _init_db(self) -> None:
        """Settings and schema. Two kernels opening a new workspace at once race for the switch to WAL,
        which SQLite answers with "database is locked" at once (no busy wait): try again shortly."""
        c = self._conn
        c.execute("PRAGMA busy_timeout = 30000")
        if str(c.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("PRAGMA foreign_keys = ON")
        with self._tx() as tx:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.execute(statement)
            tx.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- jobs ---------------------------------------------------------------------------------

    def create(self, job: Job, *, runner_token: str | None = None, owner: str | None = None,
               lease_s: float = 30.0) -> None:
        record = json.dumps(job.to_dict())
        with self._tx() as c:
            c.execute(
                "INSERT INTO jobs (id, name, provider, state, created_at, updated_at, record, runner_token, owner, lease_until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.spec.name, job.provider, job.state.value, job.created_at.isoformat(),
                 job.updated_at.isoformat(), record, runner_token, owner, time.time() + lease_s if owner else 0),
            )
            c.execute("INSERT INTO state_history (job_id, state, at) VALUES (?, ?, ?)",
                      (job.id, job.state.value, job.created_at.isoformat()))

    def save(self, job: Job, *, note: str | None = None) -> None:
        """Write the record; adds a state-history row when the state changed."""
        record = json.dumps(job.to_dict())
        with self._tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None:
                raise JobNotFound(job.id)
            c.execute("UPDATE jobs SET state = ?, updated_at = ?, record = ?, provider = ? WHERE id = ?",
                      (job.state.value, job.updated_at.isoformat(), record, job.provider, job.id))
            if row["state"] != job.state.value:
                c.execute("INSERT INTO state_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                          (job.id, job.state.value, job.updated_at.isoformat(), note))

    def set_runner_token(self, job_id: str, token: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET runner_token = ? WHERE id = ?", (token, job_id))

    def runner_token(self, job_id: str) -> str | None:
        rows = self._query("SELECT runner_token FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        token = rows[0]["runner_token"]
        return None if token is None else str(token)

    def get(self, job_id: str) -> Job:
        rows = self._query("SELECT record FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return Job.from_dict(json.loads(rows[0]["record"]))

    def list_jobs(self, *, state: JobState | str | None = None, provider: str | None = None) -> list[Job]:
        sql = "SELECT record FROM jobs"
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(JobState(state).value)
        if provider is not None:
            where.append("provider = ?")
            params.append(provider)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC"
        return [Job.from_dict(json.loads(r["record"])) for r in self._query(sql, params)]

    def live_job_ids(self) -> list[str]:
        live = [s.value for s in JobState if not s.is_terminal]
        marks = ",".join("?" * len(live))
        return [r["id"] for r in self._query(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created_at", live)]

    def resolve(self, ref: str | None) -> str:
        """A job id from an id, a unique prefix of one, or None for the most recent job."""
        if ref is None or ref == "":
            rows = self._query("SELECT id FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT 1")
            if not rows:
                raise JobNotFound("", "there are no jobs in this workspace yet")
            return str(rows[0]["id"])
        rows = self._query("SELECT id FROM jobs WHERE id = ?", (ref,))
        if rows:
            return str(rows[0]["id"])
        escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._query("SELECT id FROM jobs WHERE id LIKE ? ESCAPE '\\' ORDER BY created_at DESC LIMIT 6",
                           (escaped + "%",))
        if not rows:
            raise JobNotFound(ref)
        if len(rows) > 1:
            ids = ", ".join(r["id"] for r in rows[:5])
            raise JobNotFound(ref, f"{ref!r} matches several jobs ({ids}); give more of the id")
        return str(rows[0]["id"])

    def state_history(self, job_id: str) -> list[tuple[str, str, str | None]]:
        rows = self._query("SELECT state, at, note FROM state_history WHERE job_id = ? ORDER BY seq", (job_id,))
        return [(r["state"], r["at"], r["note"]) for r in rows]

    # -- leases -------------------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_s: float = 30.0) -> bool:
        """Take (or renew) the right to follow ``job_id``. False when another live owner holds it."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT owner, lease_until FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            cur = row["owner"]
            if cur and cur != owner and row["lease_until"] > now and _owner_alive(cur):
                return False
            c.execute("UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ?", (owner, now + lease_s, job_id))
            return True

    def renew(self, owner: str, lease_s: float = 30.0) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET lease_until = ? WHERE owner = ?", (time.time() + lease_s, owner))

    def release(self, job_id: str, owner: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET owner = NULL, lease_until = 0 WHERE id = ? AND owner = ?", (job_id, owner))

    def owner(self, job_id: str) -> str | None:
        rows = self._query("SELECT owner FROM jobs WHERE id = ?", (job_id,))
        return None if not rows else rows[0]["owner"]

    # -- logs ---------------------------------------------------------------------------------

    def log_path(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.log"

    def log_offset(self, job_id: str) -> int:
        rows = self._query("SELECT log_offset FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return int(rows[0]["log_offset"])

    def prepare_log(self, job_id: str) -> int:
        """Cut the log file back to the recorded offset (bytes written after the last commit are
        written again by the next read) and return that offset."""
        offset = self.log_offset(job_id)
        path = self.log_path(job_id)
        with open(path, "ab") as fh:
            if fh.tell() > offset:
                fh.truncate(offset)
            elif fh.tell() < offset:  # the file lost bytes: start again from what it has
                offset = fh.tell()
                with self._tx() as c:
                    c.execute("UPDATE jobs SET log_offset = ? WHERE id = ?", (offset, job_id))
        return offset

    def append_log(self, job_id: str, data: bytes, next_offset: int) -> None:
        """Append runner log bytes and record the runner offset they reach."""
        if data:
            with open(self.log_path(job_id), "ab") as fh:
                fh.write(data)
                fh.flush()
        with self._tx() as c:
            c.execute("UPDATE jobs SET log_offset = ? WHERE id = ?", (next_offset, job_id))

    def read_log(self, job_id: str, *, tail: int | None = None) -> str:
        path = self.log_path(job_id)
        if not path.exists():
            return ""
        if tail is None:
            return path.read_text(encoding="utf-8", errors="replace")
        return tail_lines(path, tail)

    # -- metrics ------------------------------------------------------------------------------

    def metrics_offset(self, job_id: str) -> int:
        rows = self._query("SELECT metrics_offset FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return int(rows[0]["metrics_offset"])

    def append_metrics(self, job_id: str, metrics: Sequence[dict[str, Any]], next_offset: int) -> None:
        with self._tx() as c:
            row = c.execute("SELECT COALESCE(MAX(seq), -1) AS m FROM metrics WHERE job_id = ?", (job_id,)).fetchone()
            seq = int(row["m"]) + 1
            for m in metrics:
                step = m.get("step")
                c.execute(
                    "INSERT INTO metrics (job_id, seq, step, kind, data) VALUES (?, ?, ?, ?, ?)",
                    (job_id, seq, step if isinstance(step, int) else None, str(m.get("kind", "train")), json.dumps(m)),
                )
                seq += 1
            c.execute("UPDATE jobs SET metrics_offset = ? WHERE id = ?", (next_offset, job_id))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT data FROM metrics WHERE job_id = ? ORDER BY seq", (job_id,))
        return [json.loads(r["data"]) for r in rows]

    # -- artifacts ----------------------------------------------------------------------------

    def save_artifacts(self, job_id: str, artifacts: Sequence[ArtifactInfo]) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM artifacts WHERE job_id = ?", (job_id,))
            for a in artifacts:
                c.execute("INSERT INTO artifacts (job_id, name, data) VALUES (?, ?, ?)",
                          (job_id, a.name, json.dumps(a.to_dict())))

    def artifacts(self, job_id: str) -> list[ArtifactInfo]:
        rows = self._query("SELECT data FROM artifacts WHERE job_id = ? ORDER BY name", (job_id,))
        return [ArtifactInfo.from_dict(json.loads(r["data"])) for r in rows]


def tail_lines(path: Path, n: int, *, end: int | None = None, block: int = 64 * 1024) -> str:
    """The last ``n`` lines of a file (of its first ``end`` bytes), read from the end: cheap for big logs.

    Lines end with ``\n`` only (a progress bar's ``\r`` redraws stay within their line)."""
    if n <= 0:
        return ""
    with open(path, "rb") as fh:
        if end is None:
            end = fh.seek(0, os.SEEK_END)
        pos = end
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    cut = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(n):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            break
    return data[cut + 1:].decode("utf-8", errors="replace")
