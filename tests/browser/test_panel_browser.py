"""The job panel and the dashboard in a real JupyterLab, in headless Chromium."""

from __future__ import annotations

import re
import textwrap
import time
from typing import Any

import nbformat
import pytest

from tests.browser.conftest import SHOTS, Lab, Shots
from tests.helpers import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

EMIT = textwrap.dedent(
    """
    import json, os, sys, time
    steps, lines, sleep = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    per = max(1, lines // max(1, steps))
    n = 0
    for s in range(1, steps + 1):
        for _ in range(per):
            n += 1
            print(f"log line {n}")
        print("TRAINORCH_METRIC " + json.dumps({"step": s, "total_steps": steps, "loss": 2.0 / s ** 0.5}))
        if s % 10 == 0:
            print("TRAINORCH_METRIC " + json.dumps({"kind": "eval", "step": s, "eval_loss": 2.3 / s ** 0.5}))
        time.sleep(sleep)
    out = os.environ["TRAINORCH_OUTPUT_DIR"]
    open(os.path.join(out, "adapter_config.json"), "w").write('{"r": 8}')
    open(os.path.join(out, "weights.bin"), "wb").write(os.urandom(8192))
    """
)


def _make_notebook(lab: Lab) -> str:
    emit = lab.root / "emit.py"
    emit.write_text(EMIT)
    cells = [
        "%load_ext trainorch_jupyter",
        f"job = %train submit --provider local --name browser -- python {emit} 80 4000 0.1\njob",
        f"long = %train submit --provider local --name longjob -- python {emit} 5000 5000 0.1\nlong",
        "import time\nt0 = time.time()\ntime.sleep(25)\nprint('busy cell done after', round(time.time() - t0), 's')",
        "%train dashboard",
    ]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, lab.root / "demo.ipynb")
    return "demo.ipynb"


def _run_cell(page: Any, index: int) -> None:
    """Click into cell ``index``'s editor and run it with Shift+Enter (what a user does)."""
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _panel(page: Any, name: str) -> Any:
    return page.locator(".trainorch-panel", has=page.locator(f".trainorch-header[data-job-id^='{name}-']"))


def _attr(locator: Any, attr: str) -> str:
    return locator.first.get_attribute(attr) or ""


def test_panel_live_cancel_during_busy_cell_and_dashboard(lab: Lab, page: Any, shots: Shots) -> None:
    for old in SHOTS.glob("test_panel_live_cancel_during_busy_cell_and_dashboard-*.png"):
        old.unlink()
    name = _make_notebook(lab)
    page.goto(lab.notebook_url(name))
    try:
        _scenario(lab, page, shots)
    except Exception:
        shots("failure")
        for h in page.locator(".trainorch-header").all():
            print("HEADER", h.get_attribute("data-job-id"), h.get_attribute("data-state"))
        print("NOTEBOOK windowing:", page.evaluate("document.querySelector('.jp-Notebook')?.className"))
        raise


def _scenario(lab: Lab, page: Any, shots: Shots) -> None:
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(state="visible", timeout=90_000)
    # The kernel is ready when the status bar says "... | Idle".
    page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=90_000)
    no_news = page.get_by_role("button", name="No", exact=True)
    if no_news.count():
        no_news.first.click()
    shots("opened")
    _run_cell(page, 0)  # %load_ext
    _run_cell(page, 1)  # submit the job: its panel shows under the cell
    panel = _panel(page, "browser")
    panel.wait_for(timeout=60_000)
    shots("panel-rendered")

    header = panel.locator(".trainorch-header")
    progress = panel.locator(".trainorch-progress")
    # Progress, chart and log advance while the job runs.
    wait_for(lambda: float(_attr(progress, "data-progress") or 0) > 0, timeout=60)
    first = float(_attr(progress, "data-progress"))
    train_first = int(_attr(panel.locator("svg.trainorch-chart"), "data-train-points") or 0)
    wait_for(lambda: float(_attr(progress, "data-progress") or 0) > first + 5, timeout=60)
    assert int(_attr(panel.locator("svg.trainorch-chart"), "data-train-points")) > train_first
    assert panel.locator("svg.trainorch-chart polyline.train").count() == 1
    log_text = panel.locator(".trainorch-log pre").inner_text()
    assert re.search(r"log line \d+", log_text), log_text[:200]
    shots("progress-chart-log")

    _run_cell(page, 2)  # a second, long job
    long_panel = _panel(page, "longjob")
    long_panel.wait_for(timeout=60_000)
    wait_for(lambda: _attr(long_panel.locator(".trainorch-header"), "data-state") == "RUNNING", timeout=60)

    _run_cell(page, 3)  # a busy cell: time.sleep(25)
    busy_cell = page.locator(".jp-Notebook .jp-Cell").nth(3)
    wait_for(lambda: "[*]" in busy_cell.locator(".jp-InputPrompt").inner_text(), timeout=20)
    t_click = time.monotonic()
    long_panel.get_by_role("button", name="Cancel").click()
    confirm = long_panel.get_by_role("button", name="Confirm cancel")
    confirm.wait_for(timeout=30_000)  # the confirm step shows while the cell is still busy
    shots("confirm-cancel")
    confirm.click()
    wait_for(lambda: _attr(long_panel.locator(".trainorch-header"), "data-state") == "CANCELLED", timeout=60)
    cancelled_after = time.monotonic() - t_click
    still_busy = "[*]" in busy_cell.locator(".jp-InputPrompt").inner_text()
    shots("cancelled-during-busy-cell")
    assert still_busy, "the busy cell had already finished: the click was not shown to act during a busy cell"
    assert cancelled_after < 20, cancelled_after
    assert long_panel.locator(".trainorch-notice").inner_text().strip().startswith("\u25a0 Job cancelled")
    print(f"cancel acted {cancelled_after:.1f}s after the click, while the busy cell still ran")

    # The first job completes: final state, notice, artifacts with hashes.
    wait_for(lambda: _attr(header, "data-state") == "COMPLETED", timeout=90)
    wait_for(lambda: panel.locator("tr.trainorch-artifact").count() == 2, timeout=30)
    assert _attr(progress, "data-progress") == "100.0"
    assert "Job completed" in panel.locator(".trainorch-notice").inner_text()
    assert panel.locator("tr.trainorch-artifact", has_text="verified").count() == 2
    panel.scroll_into_view_if_needed()
    shots("completed-with-artifacts")

    # The dashboard (runs after the busy cell ends).
    wait_for(lambda: "[*]" not in busy_cell.locator(".jp-InputPrompt").inner_text(), timeout=60)
    _run_cell(page, 4)
    dash = page.locator(".trainorch-dashboard")
    dash.wait_for(timeout=60_000)
    rows = dash.locator("tr.trainorch-row")
    wait_for(lambda: rows.count() >= 2, timeout=30)
    assert dash.locator("tr.trainorch-row[data-state='CANCELLED']").count() == 1
    assert dash.locator("tr.trainorch-row[data-state='COMPLETED']").count() == 1
    dash.scroll_into_view_if_needed()
    shots("dashboard")
    # Open a job's panel from the dashboard.
    dash.locator("select").last.select_option(index=0)
    dash.locator(".trainorch-panel").wait_for(timeout=30_000)
    dash.locator(".trainorch-panel").scroll_into_view_if_needed()
    shots("dashboard-opened-panel")
