"""The job store: SQLite (WAL) for jobs, state history, metrics and artifacts; plain files for logs.

Layout under the workspace::

    .trainorch/jobs.db          jobs, state history, metrics, artifacts
    .trainorch/logs/<job>.log   full logs, byte-identical to the runner's log up to ``log_offset``

Several processes (two kernels on one workspace) may open the same store: every write is one
``BEGIN IMMEDIATE`` transaction and readers never block writers (WAL). A job is followed by one
orchestrator at a time: it holds a lease (``owner``, ``lease_until``) that it renews; another
orchestrator takes a job over only when the lease ran out or its owner's process is gone. Each take-over
bumps the lease's generation (a fencing token): every write a driver makes names the lease it holds
(:class:`Fence`) and is refused with :class:`LeaseLost` once another driver took the job, so a stalled
owner that wakes up can never write beside the new one.

Two things outlive any one orchestrator here: a cancel request (honoured by whichever process drives the
job) and the reap list (machines to destroy, retried until their provider confirms each gone).

``.trainorch/`` holds runner tokens, so it is private: the folder is 0700, its files 0600.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from ._process import pid_alive
from .model import ArtifactInfo, Job, JobNotFound, JobState, TrainorchError

SCHEMA_VERSION = 2

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
CREATE TABLE IF NOT EXISTS reap (
    provider TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    job_id TEXT,
    handle TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'machine',
    due INTEGER NOT NULL DEFAULT 0,
    added_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (provider, machine_id)
);
"""

#: Columns added after schema version 1 (added in place to an older store).
_ADDED_COLUMNS = {
    "jobs": [("lease_gen", "INTEGER NOT NULL DEFAULT 0"), ("cancel_requested_at", "REAL")],
}


class LeaseLost(TrainorchError):
    """This orchestrator no longer holds the job's lease: another one drives it now."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} is driven by another orchestrator now (its lease was taken over)")
        self.job_id = job_id


@dataclass(frozen=True)
class Fence:
    """The lease a driver holds: its owner id and the generation it was granted."""

    owner: str
    gen: int


@dataclass
class ReapEntry:
    """A machine (or a create whose result is unknown) that must be destroyed."""

    provider: str
    machine_id: str
    job_id: str | None
    handle: dict[str, Any]
    kind: str  # "machine" | "reconcile" (find the job's machines by tag, then destroy them)
    due: bool  # True: the reaper destroys it; False: a live driver owns it and destroys it itself
    added_at: float
    attempts: int
    next_at: float
    last_error: str | None


def process_owner_id() -> str:
    """``host:pid:random`` — identifies one orchestrator instance."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def owner_alive(owner: str) -> bool:
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
        _private_dir(self.root)
        _private_dir(self.logs_dir)
        self.db_path = self.root / "jobs.db"
        for suffix in ("", "-wal", "-shm"):  # SQLite gives its -wal/-shm files the db file's mode
            _private_file(Path(str(self.db_path) + suffix), create=not suffix)
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
            for table, columns in _ADDED_COLUMNS.items():
                have = {r["name"] for r in tx.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        tx.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            tx.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            tx.execute("UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
                       (str(SCHEMA_VERSION), SCHEMA_VERSION))

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

    @staticmethod
    def _check_fence(c: sqlite3.Connection, job_id: str, fence: Fence | None) -> None:
        """Inside a write transaction: refuse when ``fence`` no longer holds the job's lease."""
        if fence is None:
            return
        row = c.execute("SELECT owner, lease_gen FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        if row["owner"] != fence.owner or int(row["lease_gen"]) != fence.gen:
            raise LeaseLost(job_id)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def workspace_id(self) -> str:
        """A short random id of this workspace, made once: cloud machines are tagged with it (and the job id)
        so that ``cleanup`` can tell this workspace's machines from others'."""
        rows = self._query("SELECT value FROM meta WHERE key = 'workspace_id'")
        if rows:
            return str(rows[0]["value"])
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('workspace_id', ?)", (os.urandom(4).hex(),))
            return str(c.execute("SELECT value FROM meta WHERE key = 'workspace_id'").fetchone()["value"])

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

    def save(self, job: Job, *, note: str | None = None, fence: Fence | None = None) -> None:
        """Write the record; adds a state-history row when the state changed."""
        record = json.dumps(job.to_dict())
        with self._tx() as c:
            self._check_fence(c, job.id, fence)
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None:
                raise JobNotFound(job.id)
            c.execute("UPDATE jobs SET state = ?, updated_at = ?, record = ?, provider = ? WHERE id = ?",
                      (job.state.value, job.updated_at.isoformat(), record, job.provider, job.id))
            if row["state"] != job.state.value:
                c.execute("INSERT INTO state_history (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                          (job.id, job.state.value, job.updated_at.isoformat(), note))

    def set_runner_token(self, job_id: str, token: str, *, fence: Fence | None = None) -> None:
        with self._tx() as c:
            self._check_fence(c, job_id, fence)
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

    def claim(self, job_id: str, owner: str, lease_s: float = 30.0) -> Fence | None:
        """Take (or renew) the right to drive ``job_id``: its :class:`Fence`, or None when another live
        owner holds it. A new owner gets a new generation, which fences off every write of the old one."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT owner, lease_until, lease_gen FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            cur = row["owner"]
            gen = int(row["lease_gen"])
            if cur and cur != owner and row["lease_until"] > now and owner_alive(cur):
                return None
            if cur != owner:
                gen += 1
            c.execute("UPDATE jobs SET owner = ?, lease_until = ?, lease_gen = ? WHERE id = ?",
                      (owner, now + lease_s, gen, job_id))
            return Fence(owner, gen)

    def renew(self, owner: str, lease_s: float = 30.0) -> set[str]:
        """Extend every lease ``owner`` holds; the ids of the jobs it still holds."""
        with self._tx() as c:
            c.execute("UPDATE jobs SET lease_until = ? WHERE owner = ?", (time.time() + lease_s, owner))
            return {r["id"] for r in c.execute("SELECT id FROM jobs WHERE owner = ?", (owner,))}

    def holds(self, fence: Fence, job_id: str) -> bool:
        rows = self._query("SELECT owner, lease_gen FROM jobs WHERE id = ?", (job_id,))
        return bool(rows) and rows[0]["owner"] == fence.owner and int(rows[0]["lease_gen"]) == fence.gen

    def release(self, job_id: str, owner: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET owner = NULL, lease_until = 0 WHERE id = ? AND owner = ?", (job_id, owner))

    # -- cancel requests ------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> bool:
        """Record that the user wants ``job_id`` stopped (whoever drives it honours it). False when the
        job has already ended."""
        terminal = [s.value for s in JobState if s.is_terminal]
        marks = ",".join("?" * len(terminal))
        with self._tx() as c:
            cur = c.execute(f"UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, ?) "
                            f"WHERE id = ? AND state NOT IN ({marks})", (time.time(), job_id, *terminal))
            if cur.rowcount == 0 and c.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise JobNotFound(job_id)
            return cur.rowcount > 0

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._query("SELECT cancel_requested_at FROM jobs WHERE id = ?", (job_id,))
        return bool(rows) and rows[0]["cancel_requested_at"] is not None

    def cancel_requests(self, job_ids: Iterable[str]) -> set[str]:
        """Which of ``job_ids`` have a cancel request (one query for all of them)."""
        ids = list(job_ids)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self._query(f"SELECT id FROM jobs WHERE cancel_requested_at IS NOT NULL AND id IN ({marks})", ids)
        return {str(r["id"]) for r in rows}

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

    def prepare_log(self, job_id: str, *, fence: Fence | None = None) -> int:
        """Cut the log file back to the recorded offset (bytes written after the last commit are
        written again by the next read) and return that offset."""
        offset = self.log_offset(job_id)
        path = self.log_path(job_id)
        with self._tx() as c:
            self._check_fence(c, job_id, fence)
        with _open_private(path) as fh:
            if fh.tell() > offset:
                fh.truncate(offset)
            elif fh.tell() < offset:  # the file lost bytes: start again from what it has
                offset = fh.tell()
                with self._tx() as c:
                    c.execute("UPDATE jobs SET log_offset = ? WHERE id = ?", (offset, job_id))
        return offset

    def append_log(self, job_id: str, data: bytes, next_offset: int, *, fence: Fence | None = None) -> None:
        """Append runner log bytes and record the runner offset they reach. With ``fence``, the lease is
        checked and held (the write transaction) while the bytes go to the file: a driver that lost the
        job writes nothing."""
        with self._tx() as c:
            self._check_fence(c, job_id, fence)
            if data:
                with _open_private(self.log_path(job_id)) as fh:
                    fh.write(data)
                    fh.flush()
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

    def append_metrics(self, job_id: str, metrics: Sequence[dict[str, Any]], next_offset: int, *,
                       fence: Fence | None = None) -> None:
        with self._tx() as c:
            self._check_fence(c, job_id, fence)
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

    def metrics(self, job_id: str, *, since: int = 0) -> list[dict[str, Any]]:
        """The job's metrics in order; ``since``: only from the ``since``-th on (rows are numbered from 0)."""
        rows = self._query("SELECT data FROM metrics WHERE job_id = ? AND seq >= ? ORDER BY seq", (job_id, since))
        return [json.loads(r["data"]) for r in rows]

    # -- artifacts ----------------------------------------------------------------------------

    def save_artifacts(self, job_id: str, artifacts: Sequence[ArtifactInfo], *, fence: Fence | None = None) -> None:
        with self._tx() as c:
            self._check_fence(c, job_id, fence)
            c.execute("DELETE FROM artifacts WHERE job_id = ?", (job_id,))
            for a in artifacts:
                c.execute("INSERT INTO artifacts (job_id, name, data) VALUES (?, ?, ?)",
                          (job_id, a.name, json.dumps(a.to_dict())))

    def artifacts(self, job_id: str) -> list[ArtifactInfo]:
        rows = self._query("SELECT data FROM artifacts WHERE job_id = ? ORDER BY name", (job_id,))
        return [ArtifactInfo.from_dict(json.loads(r["data"])) for r in rows]


    # -- the reap list ----------------------------------------------------------------------------

    def add_reap(self, provider: str, machine_id: str, handle: dict[str, Any], *, job_id: str | None,
                 kind: str = "machine", due: bool = False) -> None:
        """Remember a machine that exists (or may: ``kind="reconcile"``) until its provider confirms it gone."""
        with self._tx() as c:
            c.execute("INSERT INTO reap (provider, machine_id, job_id, handle, kind, due, added_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                      " ON CONFLICT (provider, machine_id) DO UPDATE SET handle = excluded.handle, due = MAX(due, excluded.due)",
                      (provider, machine_id, job_id, json.dumps(handle), kind, int(due), time.time()))

    def mark_reap_due(self, provider: str, machine_id: str, error: str | None = None) -> None:
        """Hand a machine to the reaper (its driver could not confirm it gone)."""
        with self._tx() as c:
            c.execute("UPDATE reap SET due = 1, last_error = COALESCE(?, last_error) WHERE provider = ? AND machine_id = ?",
                      (error, provider, machine_id))

    def reap_done(self, provider: str, machine_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM reap WHERE provider = ? AND machine_id = ?", (provider, machine_id))

    def reap_failed(self, provider: str, machine_id: str, error: str, retry_in: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE reap SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE provider = ? AND machine_id = ?",
                      (time.time() + retry_in, error, provider, machine_id))

    def reap_entries(self, *, due_only: bool = False) -> list[ReapEntry]:
        """The reap list; ``due_only``: what the reaper should try now (handed over, or whose job has ended
        or is no longer driven by a live owner)."""
        rows = self._query(
            "SELECT r.*, j.state AS job_state, j.owner AS job_owner, j.lease_until AS job_lease FROM reap r"
            " LEFT JOIN jobs j ON j.id = r.job_id ORDER BY r.added_at")
        now = time.time()
        out = []
        terminal = {s.value for s in JobState if s.is_terminal}
        for r in rows:
            if due_only:
                orphaned = r["job_state"] is None or r["job_state"] in terminal
                if not (r["due"] or orphaned) or r["next_at"] > now:
                    continue
            out.append(ReapEntry(r["provider"], r["machine_id"], r["job_id"], json.loads(r["handle"]), r["kind"],
                                 bool(r["due"]), r["added_at"], int(r["attempts"]), float(r["next_at"]), r["last_error"]))
        return out


def _private_dir(path: Path) -> None:
    """Make ``path`` (and its missing parents) and keep it readable by its owner only."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def _private_file(path: Path, *, create: bool) -> None:
    if create:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    if path.exists() and path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)


def _open_private(path: Path) -> Any:
    """Open ``path`` for appending, created 0600."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


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
