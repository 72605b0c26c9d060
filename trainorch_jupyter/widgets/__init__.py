"""The notebook face's widgets: a live panel per job, a dashboard of the workspace's jobs.

Only this package imports ipywidgets. It builds on the orchestrator's public API (docs/API.md). What a job
looks like (state badge colours and icons, cost, progress and loss texts, the brief of its metrics) comes from
:mod:`trainorch_jupyter.jobview`, which the Jupyter server's API (and so the JupyterLab sidebar) uses too.

Where things are
----------------
- ``panel.py``: :class:`JobPanel` and its bounded :class:`LogBuffer`
- ``dashboard.py``: :class:`Dashboard`
- ``chart.py``: :class:`Progress` (what the metrics say) and :func:`render_loss_svg`
- ``throttle.py``: the one flusher thread and its message budget (:class:`_Scheduler`, ``_Part``)
- ``routing.py``: busy-cell routing of button clicks to a kernel subshell (:class:`_SubshellRouter`)
- ``display.py``: ``display_job`` / ``display_dashboard`` (the magics' entry points), the views each cell
  showed, and the terminal fallback :func:`text_summary`

Every name of the former ``widgets.py`` module is still importable from here, and setting one of its tunables
or hooks on this package (``trainorch_jupyter.widgets.HIDDEN_INTERVAL_S = 2``, a test's ``monkeypatch``) sets it
where the code reads it.

How updates reach the browser without hurting the kernel
---------------------------------------------------------
* Orchestrator events (log lines, metrics, state changes) arrive on the orchestrator's loop thread,
  which drives every job. A callback only hands the event over: it appends it to the view's inbox
  (or folds a metric into a per-job summary) under the view's ``_lock``, which nothing ever holds
  for more than such O(1) work, and returns. It never touches a widget, the store, or a lock held
  across I/O, rendering or a comm message (``_model_lock``): a slow store read (SQLite waiting up
  to 30 s on another kernel's write) or a slow comm message cannot stall the jobs.
* The flusher thread drains the inboxes into each view's model and renders, under ``_model_lock``.
  Store reads happen at construction (on the caller's thread) or, for the dashboard, on its own
  worker thread, once per job.
* One flusher thread per process (:class:`_Scheduler`) wakes ~10 times a second and lets each view
  (panel or dashboard) turn its dirty parts into trait values. Every part has a minimum interval
  (a few updates a second per panel), a trait is only set when its value really changed (so only
  changed values are sent), and all views together share ONE token bucket of ~20 comm messages/s
  and ~400 KB/s: far below Jupyter's IOPub limits (1000 msgs/s, 1 MB/s), whatever the number of
  panels or the log rate.
* The log view is a bounded deque of the last N lines rendered into one HTML value on a timer;
  the Output widget's per-call stdout append (which resends the whole output list each time) is never used.
* The loss chart is a light inline SVG in an ``HTML`` widget: one message per redraw, ~10 bytes
  per point (decimated above :data:`CHART_MAX_POINTS` per series), no JS dependency, and it stays
  visible in a saved notebook.

Buttons while another cell runs
-------------------------------
A click is a ``comm_msg`` on the kernel's shell channel. On the main shell it waits until a busy cell
ends (ipywidgets#3468; measured with ipykernel 7.4: a click sent 1 s into a ``time.sleep(6)`` cell
ran 5 s later). ipykernel 7 has kernel subshells (JEP 91), and JupyterLab >= 4.4 sends widget comm
messages over a subshell of its own by default (``commsOverSubshells: perCommTarget``). But
ipykernel 7.4 hands a ``comm_msg`` to the subshell that last sent on that comm (its private
``Comm._reply_subshell_for``): the main shell, for a panel a cell showed. :class:`_SubshellRouter`
overrides that hook on our buttons' comms (checked signature; a log line where it cannot apply): a
message the frontend sent over a live subshell is handled there (the official path); one sent on the
main shell (the classic notebook, ``commsOverSubshells: disabled``) or on a subshell that is gone goes
to a subshell this kernel makes for the panels (a public ``create_subshell_request``). Where none of
that is available (ipykernel 6, other kernels) the buttons still work, after the busy cell.
``TRAINORCH_WIDGET_SUBSHELL``: ``auto`` (default), ``frontend`` (only the frontend's subshell), ``0``.

Whatever thread handles it, a confirmed Cancel only records the request in the workspace's store
(``Orchestrator.cancel``); whichever process drives the job (this kernel's orchestrator thread, another kernel,
or the Jupyter server extension's driver) honours it within a second. With the trainorch JupyterLab extension the
browser need not reach the kernel at all: the Cancel buttons carry the classes ``trainorch-cancel`` and
``trainorch-cancel-confirm`` and the panel's header ``data-job-id``, so the lab extension can cancel through
``POST /api/training/jobs/{id}/cancel``; the subshell routing stays the path where it is not installed.
"""

# Every name of the former single module stays importable from here (re-exports, not used here).
# ruff: noqa: F401

from __future__ import annotations

import sys
import types
from typing import Any

from ..jobview import STATE_COLORS, STATE_ICONS
from ..jobview import MetricSummary as _Summary
from ..jobview import as_int as _int
from ..jobview import badge_html as _badge
from ..jobview import esc as _esc
from ..jobview import finite as _finite
from ..jobview import fmt_bytes as _fmt_bytes
from ..jobview import fmt_duration as _fmt_duration
from ..jobview import fmt_loss as _fmt_loss
from ..jobview import fmt_money as _fmt_money
from ..jobview import state_of as _state_of
from . import chart, dashboard, display, panel, routing, throttle
from .chart import CHART_MAX_POINTS, Progress, _decimate, _nice_ticks, render_loss_svg
from .dashboard import DASHBOARD_FIRST_WAIT_S, DASHBOARD_INTERVAL_S, DASHBOARD_MAX_ROWS, Dashboard, _Row
from .display import (
    _cell_lock,
    _cell_views,
    _current_cell_id,
    _has_widget_frontend,
    close_cell_views,
    display_dashboard,
    display_job,
    text_summary,
    track_cell_view,
)
from .panel import (
    _PANEL_CSS,
    CHART_INTERVAL_S,
    DOWNLOAD_WAIT_S,
    HEADER_INTERVAL_S,
    LOG_INTERVAL_S,
    MAX_LINE_CHARS,
    PENDING_LOG_CHARS,
    JobPanel,
    LogBuffer,
    _log_overlap,
    _PanelEvent,
    _verified,
)
from .routing import (
    _click_context,
    _create_subshell,
    _hook_problem,
    _kernel_subshell_manager,
    _live_subshells,
    _router,
    _SubshellRouter,
)
from .throttle import (
    GLOBAL_BYTES_PER_S,
    GLOBAL_MSGS_PER_S,
    HIDDEN_INTERVAL_S,
    TICK_S,
    Budget,
    _hide,
    _Part,
    _Scheduler,
    _scheduler,
    _View,
    _walk,
    get_scheduler,
    log,
)

__all__ = [
    "Dashboard",
    "JobPanel",
    "display_dashboard",
    "display_job",
    "render_loss_svg",
    "text_summary",
]

_PARTS = (throttle, routing, chart, panel, dashboard, display)


class _Package(types.ModuleType):
    """This package as a module whose attributes, when set, are set in each part that holds the name too: the
    code reads its tunables and hooks as globals of its own part, as it did in the single module."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if not name.startswith("__"):
            for part in _PARTS:
                if name in vars(part):
                    setattr(part, name, value)


sys.modules[__name__].__class__ = _Package
