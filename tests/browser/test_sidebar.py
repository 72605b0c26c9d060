"""The JupyterLab extension in a real JupyterLab (headless Chromium), against the real server extension.

A job submitted from a notebook shows in the "Training jobs" sidebar and advances; Cancel in the sidebar acts
while a cell runs ``time.sleep(30)`` (the sidebar talks to the server, never to the kernel); the status bar counts
the running jobs; a JupyterLab notification says when a job ends; a job's log opens in the main area and its
artifacts folder in the file browser.

Needs the built extension (``make labextension``, which ``make test`` runs) and the server extension enabled by
the install (``jupyter-config/server-config``). ``TRAINORCH_UPDATE_DOCS=1`` also writes the README's picture,
docs/sidebar.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.browser.conftest import REPO, SHOTS, Lab, Shots
from tests.browser.test_panel_browser import EMIT, _run_cell
from tests.helpers import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

DOCS_SHOT = REPO / "docs" / "sidebar.png"
LABEXTENSION = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "trainorch-jupyter" / "package.json"


def _api(lab: Lab, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{lab.url}{path}", data=data, method=method,
                                 headers={"Authorization": f"token {lab.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def _require_extensions(lab: Lab) -> None:
    if not LABEXTENSION.exists():
        pytest.fail(f"the JupyterLab extension is not installed ({LABEXTENSION} is missing): run `make labextension`",
                    pytrace=False)
    try:
        _api(lab, "GET", "/api/training/summary")
    except urllib.error.HTTPError as exc:
        pytest.fail(f"the server extension does not answer /api/training/summary ({exc.code}): is "
                    "trainorch_jupyter.server enabled (`jupyter server extension list`; `make install`)?",
                    pytrace=False)


def _make_notebook(lab: Lab) -> str:
    emit = lab.root / "emit.py"
    emit.write_text(EMIT)
    cells = [
        "%load_ext trainorch_jupyter",
        f"long = %train submit --provider local --name sidebarlong -- python {emit} 5000 5000 0.1\nlong",
        "import time\nt0 = time.time()\ntime.sleep(30)\nprint('busy cell done after', round(time.time() - t0), 's')",
        f"quick = %train submit --provider local --name sidebarquick -- python {emit} 60 600 0.1\nquick",
    ]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, lab.root / "sidebar.ipynb")
    return "sidebar.ipynb"


def _row(page: Any, name: str) -> Any:
    return page.locator(".jp-TrainorchJobs .jp-TrainorchJobs-job",
                        has=page.locator(".jp-TrainorchJobs-name", has_text=re.compile(f"^{name}$")))


def _attr(locator: Any, attr: str) -> str:
    return locator.first.get_attribute(attr) or ""


def _progress(row: Any) -> float:
    return float(_attr(row.locator(".jp-TrainorchJobs-progress"), "data-progress") or 0)


def _busy(cell: Any) -> bool:
    return "[*]" in cell.locator(".jp-InputPrompt").inner_text()


def _toast(page: Any, text: str) -> Any:
    return page.locator(".Toastify__toast", has_text=text)


def _last_line(log: Any) -> int:
    return max((int(n) for n in re.findall(r"log line (\d+)", log.locator(".jp-TrainorchLog-text").inner_text())),
               default=0)


def _log_view(page: Any, job_id: str) -> Any:
    return page.locator(f"[id='trainorch-log-{job_id}'] .jp-TrainorchLog")


def _open_sidebar(page: Any) -> Any:
    """Show the sidebar (a tab of JupyterLab's left area)."""
    page.locator(".jp-SideBar .lm-TabBar-tab[data-id='trainorch-jobs']").click()
    sidebar = page.locator(".jp-TrainorchJobs")
    sidebar.wait_for(state="visible")
    return sidebar


def _sidebar_shot(page: Any, path: Path) -> None:
    """The sidebar down to its last job (not the empty panel below)."""
    box = page.locator(".jp-TrainorchJobs").bounding_box()
    last = page.locator(".jp-TrainorchJobs .jp-TrainorchJobs-job").last.bounding_box()
    height = last["y"] + last["height"] - box["y"] + 6
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": height})


def test_sidebar_lists_advances_cancels_during_busy_cell_and_notifies(lab: Lab, page: Any, shots: Shots) -> None:
    _require_extensions(lab)
    for old in SHOTS.glob("test_sidebar_lists_advances_cancels_during_busy_cell_and_notifies-*.png"):
        old.unlink()
    name = _make_notebook(lab)
    page.goto(lab.notebook_url(name))
    try:
        _scenario(lab, page, shots)
    except Exception:
        shots("failure")
        for row in page.locator(".jp-TrainorchJobs-job").all():
            print("ROW", row.get_attribute("data-job-id"), row.get_attribute("data-state"), row.inner_text())
        raise
    finally:
        for kernel in _api(lab, "GET", "/api/kernels") or []:  # free the CPU for the next test
            with contextlib.suppress(Exception):
                _api(lab, "DELETE", f"/api/kernels/{kernel['id']}")


def _scenario(lab: Lab, page: Any, shots: Shots) -> None:
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(state="visible", timeout=90_000)
    page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=90_000)
    no_news = page.get_by_role("button", name="No", exact=True)
    if no_news.count():
        no_news.first.click()
    sidebar = _open_sidebar(page)
    status = page.locator(".jp-TrainorchStatus")
    wait_for(lambda: status.inner_text() == "0 running \u00b7 $0.00", timeout=30, what="an empty status bar item")

    _run_cell(page, 0)  # %load_ext
    _run_cell(page, 1)  # a long job, submitted by the notebook's kernel
    long = _row(page, "sidebarlong")
    long.wait_for(timeout=60_000)  # the server saw it in the store and pushed it
    wait_for(lambda: _attr(long, "data-state") == "RUNNING", timeout=60, what="the long job RUNNING")
    wait_for(lambda: _progress(long) > 0, timeout=60, what="progress")
    first = _progress(long)
    wait_for(lambda: _progress(long) > first + 2, timeout=60, what="progress advancing")
    assert re.search(r"step \d+/5000", long.locator(".jp-TrainorchJobs-progressText").inner_text())
    assert "loss" in long.locator(".jp-TrainorchJobs-progressText").inner_text()
    assert _attr(long.locator(".jp-TrainorchJobs-badge"), "data-state") == "RUNNING"
    wait_for(lambda: _attr(status, "data-running") == "1", timeout=30, what="the status bar counting 1")
    assert re.fullmatch(r"1 running \u00b7 \$\d+\.\d{2,4}", status.inner_text()), status.inner_text()
    shots("sidebar-running")
    # Its log in the main area, following the job.
    long.get_by_role("button", name="Log").click()
    log = _log_view(page, _attr(long, "data-job-id"))
    wait_for(lambda: _last_line(log) > 0, timeout=30, what="the log")
    seen = _last_line(log)
    wait_for(lambda: _last_line(log) > seen + 5, timeout=30, what="the log following the job")
    shots("log-following")
    page.locator("#jp-main-dock-panel .lm-TabBar-tab", has_text="sidebar.ipynb").click()

    _run_cell(page, 2)  # the busy cell: time.sleep(30)
    busy_cell = page.locator(".jp-Notebook .jp-Cell").nth(2)
    wait_for(lambda: _busy(busy_cell), timeout=20, what="the busy cell running")
    t_click = time.monotonic()
    long.get_by_role("button", name="Cancel").click()
    page.get_by_role("button", name="Cancel job").click()  # the confirm dialog
    wait_for(lambda: _attr(long, "data-state") == "CANCELLED", timeout=28, what="CANCELLED")
    cancelled_after = time.monotonic() - t_click
    still_busy = _busy(busy_cell)
    shots("cancelled-during-busy-cell")
    assert still_busy, "the busy cell had already finished: Cancel was not shown to act during a busy cell"
    print(f"sidebar cancel acted {cancelled_after:.1f}s after the click, while the busy cell still ran")
    _toast(page, "sidebarlong cancelled").wait_for(timeout=15_000)
    wait_for(lambda: _attr(status, "data-running") == "0", timeout=15, what="the status bar back to 0")

    _run_cell(page, 3)  # a short job, queued behind the busy cell: it ends COMPLETED
    quick = _row(page, "sidebarquick")
    quick.wait_for(timeout=90_000)
    with contextlib.suppress(AssertionError):  # the README's picture: one job running, one cancelled
        wait_for(lambda: _attr(quick, "data-state") != "RUNNING" or _progress(quick) > 25, timeout=30)
    _sidebar_shot(page, SHOTS / "sidebar.png")
    if os.environ.get("TRAINORCH_UPDATE_DOCS") == "1":
        _sidebar_shot(page, DOCS_SHOT)
    wait_for(lambda: _attr(quick, "data-state") == "COMPLETED", timeout=120, what="the short job COMPLETED")
    _toast(page, "sidebarquick completed").wait_for(timeout=15_000)
    assert [r.get_attribute("data-state") for r in sidebar.locator(".jp-TrainorchJobs-job").all()] == \
        ["COMPLETED", "CANCELLED"]  # the newest first
    shots("completed-notification")

    # Its log in the main area, read to the end; its artifacts folder in the file browser.
    quick.get_by_role("button", name="Log").click()
    log = _log_view(page, _attr(quick, "data-job-id"))
    wait_for(lambda: _attr(log, "data-complete") == "true", timeout=30, what="the whole log")
    assert _last_line(log) == 600
    shots("log")
    artifacts = quick.get_by_role("button", name="Artifacts")
    wait_for(lambda: artifacts.is_enabled(), timeout=30, what="the artifacts folder")
    artifacts.click()
    job_id = _attr(quick, "data-job-id")
    crumbs = page.locator(".jp-FileBrowser .jp-BreadCrumbs")
    wait_for(lambda: job_id in crumbs.inner_text(), timeout=20, what="the file browser in the artifacts folder")
    page.locator(".jp-FileBrowser .jp-DirListing-item", has_text="adapter_config.json").wait_for(timeout=20_000)
    shots("artifacts-in-file-browser")
    # All of it came by the server's event stream, not by the polling fallback.
    assert _attr(sidebar.locator(".jp-TrainorchJobs-mode"), "data-mode") == "stream"


def test_sidebar_polls_when_the_event_stream_is_not_there(lab: Lab, page: Any, shots: Shots) -> None:
    """With the event stream refused (a proxy that drops it, say), the sidebar polls GET /jobs?since= instead:
    a job created and submitted through the REST API (the server drives it) shows, advances, and cancels."""
    _require_extensions(lab)
    for old in SHOTS.glob("test_sidebar_polls_when_the_event_stream_is_not_there-*.png"):
        old.unlink()
    page.route(re.compile(r".*/api/training/events.*"), lambda route: route.abort())
    emit = lab.root / "emit.py"
    emit.write_text(EMIT)
    page.goto(f"{lab.url}/lab?token={lab.token}&reset")
    try:
        sidebar = _open_sidebar(page)
        wait_for(lambda: _attr(sidebar.locator(".jp-TrainorchJobs-mode"), "data-mode") == "polling", timeout=30,
                 what="the polling fallback")
        job = _api(lab, "POST", "/api/training/jobs",
                   {"name": "polled", "command": [sys.executable, str(emit), "5000", "5000", "0.1"]})
        _api(lab, "POST", f"/api/training/jobs/{job['id']}/submit")
        row = _row(page, "polled")
        row.wait_for(timeout=30_000)
        wait_for(lambda: _progress(row) > 0, timeout=60, what="progress")
        first = _progress(row)
        wait_for(lambda: _progress(row) > first + 1, timeout=60, what="progress advancing by polling")
        wait_for(lambda: _attr(page.locator(".jp-TrainorchStatus"), "data-running") == "1", timeout=30)
        shots("polling")
        row.get_by_role("button", name="Cancel").click()
        page.get_by_role("button", name="Cancel job").click()
        wait_for(lambda: _attr(row, "data-state") == "CANCELLED", timeout=30, what="CANCELLED")
        _toast(page, "polled cancelled").wait_for(timeout=15_000)
        assert _attr(sidebar.locator(".jp-TrainorchJobs-mode"), "data-mode") in ("polling", "idle")
        shots("cancelled")
        # Hidden, with no job live, it does not poll at all.
        page.locator(".jp-SideBar .lm-TabBar-tab[data-id='trainorch-jobs']").click()
        sidebar.wait_for(state="hidden")
        time.sleep(1)
        polls: list[str] = []

        def on_request(request: Any) -> None:
            if "/api/training/jobs" in request.url:
                polls.append(request.url)

        page.on("request", on_request)
        time.sleep(12)
        assert polls == [], polls
    except Exception:
        shots("failure")
        raise
