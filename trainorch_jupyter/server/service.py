"""The server side of trainorch: one :class:`TrainingService` per Jupyter server, over one workspace's store.

It owns three things, all on the server's event loop, with every store read and write in a worker thread:

* the server's orchestrator (:class:`~.driver.ServerOrchestrator`), which drives the jobs submitted through the
  API and adopts live jobs whose lease lapsed (every ``adopt_interval`` seconds);
* the watcher: every ``watch_interval`` seconds (and before answering a read) one cheap query tells which jobs
  changed (record, lease, metrics) and how far each log is committed. It keeps a snapshot of every job's
  summary (swapped whole, never mutated in place) and fans the changes out to the event streams: ``job``
  events (a JobSummary) and ``log`` events (the new committed bytes of each log a stream asked for);
* the event streams' subscriptions.

Jobs driven by kernels emit their events only in their kernel's process; the store is what every process
shares, so the watcher reads the store for every job, whoever drives it.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..jobview import MetricSummary, artifacts_dir_of, job_summary, status_text
from ..model import Job, JobNotFound, JobState
from ..store import owner_alive
from .driver import DRAFT_OWNER, ServerOrchestrator
from .storeview import JobRow, StoreView

#: The most log bytes one ``log`` event carries (a longer backlog follows in the next ticks).
LOG_CHUNK_BYTES = 256 * 1024
#: Events a stream may have waiting before it is dropped (its client reconnects and catches up by ``since``).
STREAM_QUEUE_MAX = 2000
_RUNNING = frozenset({JobState.PROVISIONING, JobState.RUNNING, JobState.DOWNLOADING})


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_time(value: str) -> datetime:
    """An ISO 8601 time (``Z`` or an offset; a naive one is UTC). ValueError when it is none."""
    when = datetime.fromisoformat(value.strip())
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    """The watcher's view of one job (replaced, never changed, when the job changes)."""

    job: Job
    row: JobRow
    metrics: MetricSummary
    metrics_seq: int
    changed_at: datetime
    artifacts_dir: str | None
    log_sent: int  # the committed log bytes already streamed (or skipped: nobody asked for them)

    @property
    def draft(self) -> bool:
        return self.row.owner == DRAFT_OWNER

    @property
    def key(self) -> tuple[Any, ...]:
        """What a ``job`` event reports a change of."""
        return (self.row.state, self.row.updated_at, self.row.metrics_offset, self.row.cancel_requested, self.draft)


@dataclass(eq=False)
class Subscriber:
    """One event stream: what it wants and its queue of SSE messages (None ends it)."""

    logs: frozenset[str] | None  # None: every job's log
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE_MAX + 1))
    dropped: bool = False

    def wants_log(self, job_id: str) -> bool:
        return self.logs is None or job_id in self.logs

    def put(self, message: str | None) -> None:
        if self.dropped:
            return
        if message is not None and self.queue.qsize() >= STREAM_QUEUE_MAX:
            self.dropped = True  # too slow: end it; the client reconnects with Last-Event-ID and catches up
            message = None
        self.queue.put_nowait(message)


@dataclass
class TickResult:
    entries: dict[str, Entry]
    order: list[str]
    changed: list[str]
    logs: list[tuple[str, int, int, str]]  # (job_id, offset, next_offset, text)
    now: datetime


class ServiceUnavailable(Exception):
    """The service could not start (its reason is the message)."""


class TrainingService:
    """The jobs of one workspace for the Jupyter server: driver, watcher and event streams."""

    def __init__(self, workspace: Path, root_dir: Path, *, adopt_interval: float = 5.0, watch_interval: float = 1.0,
                 ping_interval: float = 15.0, log: logging.Logger | None = None) -> None:
        self.workspace = workspace.resolve()
        self.root_dir = root_dir.resolve()
        self.adopt_interval = adopt_interval
        self.watch_interval = watch_interval
        self.ping_interval = ping_interval
        self.log = log or logging.getLogger("trainorch_jupyter.server")
        self.orch: ServerOrchestrator | None = None
        self.view: StoreView | None = None
        self._entries: dict[str, Entry] = {}
        self._order: list[str] = []  # job ids, newest first
        self._last_tick: datetime | None = None
        self._last_refresh = -1e18
        self._dirty = True
        self._refresh_lock = asyncio.Lock()
        self._subscribers: set[Subscriber] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._error: str | None = None
        self._stopping = False
        self._started = False
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}

    # -- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and make the orchestrator (in a worker thread), then start the watcher and the
        adopter. Returns at once; requests wait for :meth:`ready` (which starts the service if the server's
        start hook has not run yet: an embedding that never starts its extensions)."""
        if not self._started:
            self._started = True
            self._tasks.append(asyncio.create_task(self._boot(), name="trainorch-server-boot"))

    async def _boot(self) -> None:
        try:
            self.orch = await asyncio.to_thread(ServerOrchestrator, self.workspace)
            self.view = await asyncio.to_thread(StoreView, self.orch.store.db_path)
            await self.refresh(force=True)
        except Exception as exc:
            self._error = f"trainorch could not open the workspace {self.workspace}: {type(exc).__name__}: {exc}"
            self.log.error(self._error)
            self._ready.set()
            return
        self._ready.set()
        self.log.info("trainorch: serving the jobs of %s (adopting orphaned jobs every %ss)", self.workspace,
                      self.adopt_interval)
        self._tasks.append(asyncio.create_task(self._watch(), name="trainorch-server-watch"))
        if self.adopt_interval > 0:
            self._tasks.append(asyncio.create_task(self._adopt_loop(), name="trainorch-server-adopt"))

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until started; ServiceUnavailable if it could not start (or is stopping)."""
        await self.start()
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self._error is not None:
            raise ServiceUnavailable(self._error)
        if self._stopping:
            raise ServiceUnavailable("the Jupyter server is stopping")

    async def stop(self) -> None:
        """End the streams and the loops, and close the orchestrator: the jobs it drives keep running (their
        runners live on) and are adopted by the next driver (a kernel's ``%load_ext``, the next server)."""
        self._stopping = True
        for sub in list(self._subscribers):
            sub.put(None)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.orch is not None:
            await asyncio.to_thread(self.orch.close)
        if self.view is not None:
            await asyncio.to_thread(self.view.close)

    @property
    def driven(self) -> list[str]:
        return self.orch.driven() if self.orch is not None else []

    # -- the watcher --------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                await self.refresh(force=True)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("trainorch: reading the job store failed")

    def mark_dirty(self) -> None:
        """Something was written: the next read refreshes whatever the age of the snapshot."""
        self._dirty = True

    async def refresh(self, *, force: bool = False, max_age: float = 0.25) -> None:
        """Bring the snapshot up to date (one query in a worker thread) and fan the changes out."""
        async with self._refresh_lock:
            if not force and not self._dirty and time.monotonic() - self._last_refresh < max_age:
                return
            self._dirty = False
            wanted = self._wanted_logs()
            result = await asyncio.to_thread(self._tick, self._entries, wanted)
            self._entries, self._order, self._last_tick = result.entries, result.order, result.now
            self._last_refresh = time.monotonic()
        self._fan_out(result)

    def _wanted_logs(self) -> frozenset[str] | None:
        if any(s.logs is None for s in self._subscribers):
            return None
        wanted: set[str] = set()
        for s in self._subscribers:
            wanted |= s.logs or frozenset()
        return frozenset(wanted)

    def _tick(self, old: Mapping[str, Entry], wanted_logs: frozenset[str] | None) -> TickResult:
        """In a worker thread: read what changed since ``old`` and return the new snapshot."""
        assert self.view is not None
        now = utcnow()
        if self._last_tick is not None and now <= self._last_tick:
            now = self._last_tick + timedelta(microseconds=1)  # stamps only grow: `since` never misses one
        rows = self.view.rows()
        first = not old
        new_ids = [r.id for r in rows
                   if r.id not in old or (old[r.id].row.state, old[r.id].row.updated_at) != (r.state, r.updated_at)]
        records = self.view.records(new_ids) if new_ids else {}
        entries: dict[str, Entry] = {}
        changed: list[str] = []
        logs: list[tuple[str, int, int, str]] = []
        for row in rows:
            prev = old.get(row.id)
            job = records.get(row.id) or (prev.job if prev is not None else None)
            if job is None:
                continue  # made between the two queries: the next tick has it
            if prev is not None and prev.row == row:
                entries[row.id] = prev
                continue
            metrics = dataclasses.replace(prev.metrics) if prev is not None else MetricSummary()
            seq = prev.metrics_seq if prev is not None else -1
            if prev is None or prev.row.metrics_offset != row.metrics_offset:
                for m_seq, m in self.view.metrics_after(row.id, seq):
                    metrics.add(m)
                    seq = m_seq
            if prev is None or row.id in records:
                art = artifacts_dir_of(job, self.workspace, self.root_dir)
            else:
                art = prev.artifacts_dir
            log_sent = row.log_offset if prev is None else prev.log_sent
            if row.log_offset < log_sent:
                log_sent = row.log_offset  # the log was cut back (a new driver): stream from there
            if row.log_offset > log_sent:
                if wanted_logs is None or row.id in wanted_logs:
                    chunk = self._read_log(row.id, log_sent, min(row.log_offset, log_sent + LOG_CHUNK_BYTES))
                    if chunk is not None:
                        logs.append((row.id, log_sent, log_sent + chunk[0], chunk[1]))
                        log_sent += chunk[0]
                else:
                    log_sent = row.log_offset
                    self._decoders.pop(row.id, None)
            entry = Entry(job=job, row=row, metrics=metrics, metrics_seq=seq,
                          changed_at=prev.changed_at if prev is not None else (job.updated_at if first else now),
                          artifacts_dir=art, log_sent=log_sent)
            if prev is None or prev.key != entry.key:
                if prev is not None or not first:
                    entry = dataclasses.replace(entry, changed_at=now)
                changed.append(row.id)
            entries[row.id] = entry
        return TickResult(entries, [r.id for r in rows if r.id in entries], changed, logs, now)

    def _read_log(self, job_id: str, start: int, end: int) -> tuple[int, str] | None:
        """Bytes ``start..end`` of the job's log as text; (bytes consumed, text). A character cut at the end
        waits for the next read (its bytes count as consumed: the decoder keeps them)."""
        assert self.orch is not None
        try:
            with open(self.orch.store.log_path(job_id), "rb") as fh:
                fh.seek(start)
                data = fh.read(end - start)
        except OSError:
            return None
        decoder = self._decoders.get(job_id)
        if decoder is None:
            decoder = self._decoders[job_id] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return len(data), decoder.decode(data)

    def _fan_out(self, result: TickResult) -> None:
        if not self._subscribers:
            return
        for job_id in result.changed:
            message = self.job_event(result.entries[job_id])
            for sub in list(self._subscribers):
                sub.put(message)
        for job_id, offset, next_offset, text in result.logs:
            if not text:
                continue
            message = _sse("log", {"job_id": job_id, "offset": offset, "next_offset": next_offset, "text": text})
            for sub in list(self._subscribers):
                if sub.wants_log(job_id):
                    sub.put(message)

    # -- what the handlers read -------------------------------------------------------------------

    @property
    def now(self) -> datetime:
        return self._last_tick or utcnow()

    def summary_of(self, entry: Entry) -> dict[str, Any]:
        out = job_summary(entry.job, entry.metrics, workspace=self.workspace, root_dir=self.root_dir,
                          artifacts_dir=entry.artifacts_dir)
        out["draft"] = entry.draft
        return out

    def summary_by_id(self, job_id: str) -> dict[str, Any]:
        entry = self._entries.get(job_id)
        if entry is None:
            raise JobNotFound(job_id)
        return self.summary_of(entry)

    def job_event(self, entry: Entry) -> str:
        return _sse("job", self.summary_of(entry), event_id=entry.changed_at.isoformat())

    def entries(self, *, state: JobState | None = None, provider: str | None = None,
                since: datetime | None = None) -> list[Entry]:
        out = []
        for job_id in self._order:
            e = self._entries[job_id]
            if state is not None and e.job.state is not state:
                continue
            if provider is not None and e.job.provider != provider:
                continue
            if since is not None and e.changed_at <= since:
                continue
            out.append(e)
        return out

    def entry(self, job_id: str) -> Entry | None:
        return self._entries.get(job_id)

    def any_live(self) -> bool:
        """A submitted job has not ended: polling then counts as activity (the server should stay up)."""
        return any(e.job.state.is_live and not e.draft for e in self._entries.values())

    def totals(self) -> dict[str, Any]:
        running = live = drafts = 0
        cost = 0.0
        for e in self._entries.values():
            if e.draft:
                drafts += 1
                continue
            state = e.job.state
            if state.is_live:
                live += 1
                cost += e.job.cost_so_far or 0.0
            if state in _RUNNING:
                running += 1
        cost = round(cost, 6)
        return {"running": running, "live": live, "drafts": drafts, "cost_usd_running": cost,
                "text": status_text(running, cost)}

    # -- event streams ------------------------------------------------------------------------------

    def subscribe(self, logs: Iterable[str] | None) -> Subscriber:
        sub = Subscriber(None if logs is None else frozenset(logs))
        self._subscribers.add(sub)
        if self._stopping:
            sub.put(None)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    # -- adoption ------------------------------------------------------------------------------------

    async def _adopt_loop(self) -> None:
        while True:
            try:
                await self.adopt_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("trainorch: adopting orphaned jobs failed")
            await asyncio.sleep(self.adopt_interval)

    async def adopt_now(self) -> list[str]:
        """Adopt the live jobs nobody drives (lease lapsed, owner gone); end the drafts a kernel cancelled."""
        orch = self.orch
        if orch is None or self._stopping:
            return []
        await self.refresh(max_age=self.watch_interval)
        orphans, cancelled_drafts = await asyncio.to_thread(_candidates, list(self._entries.values()),
                                                            set(orch.driven()))
        taken: list[str] = []
        if cancelled_drafts:
            await asyncio.to_thread(orch.end_cancelled_drafts, cancelled_drafts)
            self.mark_dirty()
        if orphans:
            taken = await asyncio.to_thread(orch.adopt, orphans)
            for job_id in taken:
                self.log.info("trainorch: job %s had no driver (its kernel is gone); the server drives it now", job_id)
            self.mark_dirty()
        return taken


def _candidates(entries: list[Entry], driven: set[str]) -> tuple[list[str], list[str]]:
    """(live jobs no live orchestrator drives, drafts whose cancel was requested). In a worker thread: telling
    whether a lease's owner process lives reads /proc."""
    now = time.time()
    orphans, cancelled_drafts = [], []
    for e in entries:
        row = e.row
        if not row.live or row.id in driven:
            continue
        if e.draft:
            if row.cancel_requested:
                cancelled_drafts.append(row.id)
            continue
        if row.owner is None or row.lease_until <= now or not owner_alive(row.owner):
            orphans.append(row.id)
    return orphans, cancelled_drafts


def _sse(event: str, data: Any, *, event_id: str | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in json.dumps(data, separators=(",", ":")).splitlines() or [""])
    return "\n".join(lines) + "\n\n"


def redact_record(record: dict[str, Any]) -> dict[str, Any]:
    """A job record for the API: the values of the spec's environment are left out (they may hold a user's
    tokens); the names stay."""
    out = dict(record)
    spec = dict(out.get("spec") or {})
    env = spec.get("env")
    if isinstance(env, Mapping):
        spec["env"] = {k: "***" for k in env}
    out["spec"] = spec
    return out

