"""Dashboard: every job of the workspace in one live table, with filters, and a job's panel on demand."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ipywidgets

from ..jobview import STATE_COLORS, STATE_ICONS, progress_fraction
from ..jobview import MetricSummary as _Summary
from ..jobview import badge_html as _badge
from ..jobview import esc as _esc
from ..jobview import fmt_duration as _fmt_duration
from ..jobview import fmt_loss as _fmt_loss
from ..jobview import fmt_money as _fmt_money
from ..model import Job, JobState
from .panel import _PANEL_CSS, JobPanel
from .routing import _router
from .throttle import Budget, _Part, _Scheduler, _scheduler, _View

log = logging.getLogger("trainorch_jupyter.widgets")  # one logger for the whole package, as before the split

DASHBOARD_INTERVAL_S = 1.0
#: Rows shown in the dashboard's table.
DASHBOARD_MAX_ROWS = 100
#: How long a new dashboard waits for its rows' summaries (read off the loop thread) before its first render.
DASHBOARD_FIRST_WAIT_S = 1.0




@dataclass
class _Row:
    job: Job


class Dashboard(ipywidgets.VBox, _View):
    """Every job of the workspace in one live table, with filters, and a job's panel on demand.

    Locks: ``_lock`` guards only the inbox (state events and per-job metric summaries handed over
    by the orchestrator's loop thread) and is held for O(1) work. ``_model_lock`` guards the rows,
    summaries and widgets and may be held while rendering and sending; callbacks never take it.
    The store is read by a worker thread (each shown job's metrics, once), never under a lock a
    callback needs.
    """

    def __init__(self, orchestrator: Any, *, state: str | None = None, provider: str | None = None,
                 scheduler: _Scheduler | None = None, route_clicks: bool = True) -> None:
        self._orch = orchestrator
        self._scheduler = scheduler or _scheduler
        self._lock = threading.Lock()  # the inbox: O(1) work only, taken by the loop thread's callbacks
        self._model_lock = threading.RLock()  # rows, summaries, widgets: never taken by a callback
        self._summary_ready = threading.Condition(self._model_lock)
        self._closed = False
        # The inbox (under _lock): what the events said since the flusher last drained it.
        self._in_states: list[tuple[float, Job]] = []
        self._in_metrics: dict[str, _Summary] = {}
        # The model (under _model_lock).
        self._rows: dict[str, _Row] = {}
        self._base: dict[str, _Summary] = {}  # read from the store, once per job, by the worker
        self._live: dict[str, _Summary] = {}  # from the metric events since this board subscribed
        self._to_read: deque[str] = deque()  # jobs whose metrics the worker is to read
        self._requested: set[str] = set()
        self._worker: threading.Thread | None = None
        self._selector_dirty = True
        self._notices: deque[tuple[float, str, JobState]] = deque(maxlen=5)
        self.panel: JobPanel | None = None
        self._parts: dict[str, _Part] = {}
        # Subscribe before the store is read: a job created meanwhile comes with its first event.
        self._unsubscribe = orchestrator.subscribe(self._on_event, job_id=None)

        try:
            jobs = list(orchestrator.jobs())
        except BaseException:
            self._closed = True
            self._unsubscribe()
            raise
        # Installed providers, those of the workspace's jobs (one may be uninstalled since) and the one
        # asked for: a filter is never silently dropped for lack of an option.
        providers = sorted(set(getattr(orchestrator, "provider_names", []) or []) | {"local"}
                           | {j.provider for j in jobs} | ({provider} if provider else set()))
        self.state_filter = ipywidgets.Dropdown(options=[("all states", "")] + [(s.value, s.value) for s in JobState],
                                                value=(state.upper() if state else ""), description="state",
                                                layout=ipywidgets.Layout(width="220px"))
        self.provider_filter = ipywidgets.Dropdown(options=[("all providers", "")] + [(p, p) for p in providers],
                                                   value=provider if provider in providers else "",
                                                   description="provider", layout=ipywidgets.Layout(width="240px"))
        self.table = ipywidgets.HTML(layout=ipywidgets.Layout(width="100%"))
        self.notice = ipywidgets.HTML()
        self.selector = ipywidgets.Select(options=[], rows=5, description="open", layout=ipywidgets.Layout(width="60%"))
        self.open_button = ipywidgets.Button(description="Open panel", icon="external-link",
                                             layout=ipywidgets.Layout(width="auto"))
        self.detail = ipywidgets.VBox()
        self.state_filter.observe(self._on_filter, "value")
        self.provider_filter.observe(self._on_filter, "value")
        self.open_button.on_click(self._on_open)
        self.selector.observe(self._on_select, "value")
        if route_clicks:
            for w in (self.open_button, self.selector, self.state_filter, self.provider_filter):
                _router.route(w)
        self._parts = {
            "table": _Part(self.table, self._render_table, DASHBOARD_INTERVAL_S),
            "notice": _Part(self.notice, self._render_notice, 0.0),
        }
        self._last_tick = -math.inf
        super().__init__([ipywidgets.HTML(_PANEL_CSS), ipywidgets.HBox([self.state_filter, self.provider_filter]),
                          self.notice, self.table, ipywidgets.HBox([self.selector, self.open_button]), self.detail])
        self.add_class("trainorch-dashboard")
        self._install(jobs)
        # The first render: the worker reads the shown jobs' metrics; wait a little for them, so the
        # table is complete when shown unless the store is slow (then the rows fill in as they come).
        with self._model_lock:
            ids = [r.job.id for r in self._visible_rows()]
            self._want_summaries(ids)
            self._summary_ready.wait_for(lambda: all(i in self._base for i in ids), timeout=DASHBOARD_FIRST_WAIT_S)
        self._flush_all(self._scheduler.clock())
        self._scheduler.register(self)

    # -- events (the orchestrator's loop thread): O(1), never blocked ---------------------------

    def _on_event(self, event: Any) -> None:
        kind = event.kind
        if self._closed or kind not in ("state", "metric"):
            return  # logs and artifacts are not shown here
        data = event.data
        with self._lock:
            if kind == "state":
                if isinstance(data, Job):
                    self._in_states.append((time.time(), data))
            else:
                summary = self._in_metrics.get(event.job_id)
                if summary is None:
                    summary = self._in_metrics[event.job_id] = _Summary()
                summary.add(data)
        self._scheduler.poke()

    # -- the model (under _model_lock) ------------------------------------------------------------

    def _drain(self) -> None:
        """Apply what the events said since the last drain."""
        with self._lock:
            if not self._in_states and not self._in_metrics:
                return
            states, self._in_states = self._in_states, []
            metrics, self._in_metrics = self._in_metrics, {}
        for when, job in states:
            row = self._rows.get(job.id)
            if row is None:  # a new job: its record came with the event
                self._rows[job.id] = _Row(job)
            elif job.updated_at >= row.job.updated_at:
                before = row.job.state
                row.job = job
                if job.state.is_terminal and before is not job.state:
                    self._notices.append((when, job.id, job.state))
                    self._mark("notice")
            self._selector_dirty = True  # a row may have come, or moved in or out of the filter
            self._mark("table")
        for job_id, summary in metrics.items():
            live = self._live.get(job_id)
            self._live[job_id] = summary if live is None else live.then(summary)
        if metrics:
            self._mark("table")

    def _install(self, jobs: Iterable[Job]) -> None:
        """Rows for the store's records (a record older than the one an event brought is ignored)."""
        with self._model_lock:
            for job in jobs:
                row = self._rows.get(job.id)
                if row is None:
                    self._rows[job.id] = _Row(job)
                elif job.updated_at > row.job.updated_at:
                    row.job = job
            self._selector_dirty = True
            self._mark("table")

    def _summary(self, job_id: str) -> tuple[_Summary, bool]:
        """The job's summary: the store's (once read) followed by the events'; and whether the store's is in."""
        base, live = self._base.get(job_id), self._live.get(job_id)
        if base is None:
            return (live or _Summary()), False
        return (base if live is None else base.then(live)), True

    def _want_summaries(self, job_ids: Iterable[str]) -> None:
        """Have the worker read these jobs' metrics (each job once)."""
        with self._model_lock:
            if self._closed:
                return
            for job_id in job_ids:
                if job_id not in self._base and job_id not in self._requested:
                    self._requested.add(job_id)
                    self._to_read.append(job_id)
            if self._to_read and self._worker is None:
                self._worker = threading.Thread(target=self._read_summaries, name="trainorch-dashboard-store",
                                                daemon=True)
                self._worker.start()

    def _read_summaries(self) -> None:
        """The worker: read the requested jobs' metrics from the store, then exit (it comes back on demand)."""
        while True:
            with self._model_lock:
                if self._closed or not self._to_read:
                    self._worker = None
                    return
                job_id = self._to_read.popleft()
            summary = _Summary()
            try:
                for m in self._orch.store.metrics(job_id):  # may wait on SQLite: no lock held here
                    summary.add(m)
            except Exception:
                log.debug("could not read the metrics of %s", job_id, exc_info=True)
            with self._model_lock:
                self._base[job_id] = summary
                self._mark("table")
                self._summary_ready.notify_all()
            self._scheduler.poke()

    def _mark(self, *names: str) -> None:
        for name in names:
            part = self._parts.get(name)
            if part is not None:
                part.dirty = True

    def _visible_rows(self) -> list[_Row]:
        state, provider = self.state_filter.value, self.provider_filter.value
        rows = [r for r in self._rows.values()
                if (not state or r.job.state.value == state) and (not provider or r.job.provider == provider)]
        rows.sort(key=lambda r: r.job.created_at, reverse=True)
        return rows[:DASHBOARD_MAX_ROWS]

    def _update_selector(self) -> bool:
        """Offer the shown jobs in the selector; True if its options changed."""
        with self._model_lock:
            self._drain()
            self._selector_dirty = False
            ids = [r.job.id for r in self._visible_rows()]
        # Outside the model lock: setting the value may open a panel (which reads the store).
        options = [(f"{i}", i) for i in ids]
        if list(self.selector.options) == options:
            return False
        current = self.selector.value
        with self.selector.hold_trait_notifications():
            self.selector.options = options
            self.selector.value = current if current in ids else None
        return True

    # -- flushing (the scheduler's thread) --------------------------------------------------------

    def _wants_flush(self, now: float) -> bool:
        if self._closed:
            return False
        with self._model_lock:
            self._drain()
            if now - self._last_tick >= 5.0 and any(r.job.state.is_live for r in self._rows.values()):
                self._last_tick = now
                self._mark("table")  # ages and costs move
            return self._selector_dirty or any(p.dirty for p in self._parts.values())

    def _flush(self, now: float, budget: Budget) -> None:
        if self._selector_dirty and budget.msgs >= 2 and self._update_selector():
            budget.spend(200)
        with self._model_lock:
            for name in ("notice", "table"):
                self._parts[name].flush(now, budget)

    def _flush_all(self, now: float) -> None:
        if self._selector_dirty:
            self._update_selector()
        budget = Budget(math.inf, math.inf)
        with self._model_lock:
            self._drain()
            for part in self._parts.values():
                part.flush(now, budget, 0.0)

    def flush_now(self) -> None:
        self._flush_all(self._scheduler.clock())

    # -- rendering (under _model_lock; in-memory only) ----------------------------------------------

    def _render_table(self, now: float) -> str:
        with self._model_lock:
            rows = self._visible_rows()
            total = len(self._rows)
            self._want_summaries(r.job.id for r in rows)
            wall = time.time()
            body = []
            for r in rows:
                job = r.job
                prog, loaded = self._summary(job.id)
                frac = progress_fraction(job.state, prog)
                pct = ("" if loaded else "\u2026") if frac is None else f"{frac * 100:.0f}%"
                bar = ("" if frac is None else
                       f"<div style='display:inline-block;width:60px;height:6px;background:#e5e7eb;border-radius:3px;"
                       f"vertical-align:middle;margin-right:4px'><div style='width:{frac * 100:.0f}%;height:100%;"
                       f"background:{STATE_COLORS[job.state]};border-radius:3px'></div></div>")
                loss = _fmt_loss(prog.last_loss) if loaded or prog.last_loss is not None else "\u2026"
                age = wall - job.created_at.timestamp()
                body.append(
                    f"<tr class='trainorch-row' data-job-id='{_esc(job.id)}' data-state='{job.state.value}'>"
                    f"<td><code>{_esc(job.id)}</code></td><td>{_esc(job.spec.name)}</td><td>{_esc(job.provider)}</td>"
                    f"<td>{_badge(job.state)}</td><td style='white-space:nowrap'>{bar}{pct}</td>"
                    f"<td>{loss}</td><td>{_fmt_money(job.cost_so_far)}</td>"
                    f"<td>{_fmt_duration(age)}</td></tr>"
                )
        if not body:
            return f"<div style='font-size:12px;color:#6b7280'>no jobs match ({total} in the workspace)</div>"
        return ("<table class='trainorch-table trainorch-jobs'><tr><th>job</th><th>name</th><th>provider</th>"
                "<th>state</th><th>progress</th><th>last loss</th><th>cost</th><th>age</th></tr>"
                + "".join(body) + "</table>"
                + f"<div style='font-size:11px;color:#6b7280'>{len(body)} of {total} jobs</div>")

    def _render_notice(self, now: float) -> str:
        if not self._notices:
            return ""
        items = []
        for when, job_id, state in reversed(self._notices):
            color = STATE_COLORS[state]
            stamp = time.strftime("%H:%M:%S", time.localtime(when))
            items.append(f"<div class='trainorch-notice' data-state='{state.value}' style='border-left:4px solid {color};"
                         f"background:{color}1a;padding:2px 8px;margin:2px 0;font-size:12px'>"
                         f"{STATE_ICONS.get(state, '')} <code>{_esc(job_id)}</code> {state.value.lower()} at {stamp}</div>")
        return "".join(items)

    # -- interaction --------------------------------------------------------------------------

    def _on_filter(self, _change: Any = None) -> None:
        self._update_selector()
        with self._model_lock:
            self._mark("table")
        self._flush_all(self._scheduler.clock())

    def _on_select(self, change: Any) -> None:
        if change.get("new"):
            self.open_job(change["new"])

    def _on_open(self, _button: Any = None) -> None:
        if self.selector.value:
            self.open_job(self.selector.value)

    def open_job(self, job_id: str) -> JobPanel:
        """Show ``job_id``'s panel below the table (closing the previous one)."""
        if self.panel is not None and self.panel.job_id == job_id and not self.panel._closed:
            return self.panel
        old = self.panel
        self.panel = JobPanel(self._orch, job_id, scheduler=self._scheduler)
        self.detail.children = (self.panel,)
        if old is not None:
            old.close()
        return self.panel

    def close(self) -> None:
        if not self._detach():
            return
        with self._model_lock:
            self._to_read.clear()  # the worker ends after the read it may be in
            self._summary_ready.notify_all()
        if self.panel is not None:
            self.panel.close()
        self._close_children()
        super().close()

    def __repr__(self) -> str:
        from .display import text_summary

        with self._model_lock:
            rows = self._visible_rows()
        return "\n".join(text_summary(r.job) for r in rows) or "no jobs"

