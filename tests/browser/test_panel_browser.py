"""The job panel and the dashboard in a real JupyterLab, in headless Chromium."""

from __future__ import annotations

import contextlib
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
    # the chart redraws at most once a second: it follows within a few
    wait_for(lambda: int(_attr(panel.locator("svg.trainorch-chart"), "data-train-points") or 0) > train_first, timeout=10)
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


# --------------------------------------------------------------------------------------------
# Cancel during a busy cell, by each path (issue 7 item 18)
# --------------------------------------------------------------------------------------------

SETTINGS = "@jupyterlab/apputils-extension:kernels-settings"


def _lab_api(lab: Lab, method: str, path: str, body: Any = None) -> Any:
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{lab.url}{path}", data=data, method=method,
                                 headers={"Authorization": f"token {lab.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def _comms_over_subshells(lab: Lab, value: str | None) -> str:
    """Set JupyterLab's ``commsOverSubshells`` (None: its default) as a user would in Settings; the value in force."""
    import json

    raw = "{}" if value is None else json.dumps({"commsOverSubshells": value})
    _lab_api(lab, "PUT", f"/lab/api/settings/{SETTINGS}", {"raw": raw})
    got = _lab_api(lab, "GET", f"/lab/api/settings/{SETTINGS}")
    default = got["schema"]["properties"]["commsOverSubshells"]["default"]  # with any overrides.json applied
    return str(got["settings"].get("commsOverSubshells", default))


@pytest.mark.parametrize("path", ["official", "fallback"])
def test_cancel_during_a_busy_cell_by_each_path(lab: Lab, page: Any, shots: Shots, path: str) -> None:
    """official: JupyterLab's default ``commsOverSubshells: perCommTarget`` sends the clicks over a subshell it
    made; our hook only keeps ipykernel 7.4 from handing them back to the main shell (mode ``frontend``: no
    subshell of ours). fallback: ``commsOverSubshells: disabled`` sends them on the main shell; the hook sends
    them to the kernel's own subshell. Either way Cancel acts while another cell is busy."""
    import json

    in_force = _comms_over_subshells(lab, None if path == "official" else "disabled")
    assert in_force == ("perCommTarget" if path == "official" else "disabled")  # perCommTarget: 4.6's default
    mode = "frontend" if path == "official" else "auto"
    emit = lab.root / "emit.py"
    emit.write_text(EMIT)
    cells = [
        f"%env TRAINORCH_WIDGET_SUBSHELL={mode}\n%load_ext trainorch_jupyter",
        f"long = %train submit --provider local --name {path}job -- python {emit} 5000 5000 0.1\nlong",
        "import time\ntime.sleep(25)\nbusy_end = time.time()",
        "import json, ipywidgets\nfrom trainorch_jupyter import widgets as W\n"
        "p = [w for w in ipywidgets.Widget.widgets.values() if isinstance(w, W.JobPanel) and w.job_id == long.id][0]\n"
        "print('REPORT ' + json.dumps({'clicks': list(p.clicks), 'own': W._router._subshell_id, 'end': busy_end,"
        " 'routed': p.routed_clicks, 'state': long.status.value}))",
    ]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    name = f"cancel-{path}.ipynb"
    nbformat.write(nb, lab.root / name)
    page.goto(lab.notebook_url(name))
    try:
        page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(state="visible", timeout=90_000)
        page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=90_000)
        no_news = page.get_by_role("button", name="No", exact=True)
        if no_news.count():
            no_news.first.click()
        _run_cell(page, 0)
        _run_cell(page, 1)
        panel = _panel(page, f"{path}job")
        panel.wait_for(timeout=60_000)
        wait_for(lambda: _attr(panel.locator(".trainorch-header"), "data-state") == "RUNNING", timeout=60)
        _run_cell(page, 2)
        busy_cell = page.locator(".jp-Notebook .jp-Cell").nth(2)
        wait_for(lambda: "[*]" in busy_cell.locator(".jp-InputPrompt").inner_text(), timeout=20)
        t_click = time.monotonic()
        panel.get_by_role("button", name="Cancel").click()
        confirm = panel.get_by_role("button", name="Confirm cancel")
        confirm.wait_for(timeout=20_000)
        confirm.click()
        wait_for(lambda: _attr(panel.locator(".trainorch-header"), "data-state") == "CANCELLED", timeout=60)
        cancelled_after = time.monotonic() - t_click
        still_busy = "[*]" in busy_cell.locator(".jp-InputPrompt").inner_text()
        shots("cancelled-during-busy-cell")
        assert still_busy, "the busy cell had already finished: the click was not shown to act during a busy cell"
        print(f"{path}: cancel acted {cancelled_after:.1f}s after the click, while the busy cell still ran")
        wait_for(lambda: "[*]" not in busy_cell.locator(".jp-InputPrompt").inner_text(), timeout=60)
        _run_cell(page, 3)
        output = page.locator(".jp-Notebook .jp-Cell").nth(3).locator(".jp-OutputArea-output")
        text = wait_for(lambda: next((t for t in output.all_inner_texts() if "REPORT " in t), None), timeout=30)
        report = json.loads(text.split("REPORT ", 1)[1].replace("\n", "").strip())
    except Exception:
        shots("failure")
        raise
    finally:
        for kernel in _lab_api(lab, "GET", "/api/kernels") or []:  # free the CPU for the next test
            with contextlib.suppress(Exception):
                _lab_api(lab, "DELETE", f"/api/kernels/{kernel['id']}")
    print(f"{path}: {report}")
    assert report["routed"] and report["state"] == "CANCELLED"
    clicks = [c for c in report["clicks"] if c["button"] in ("cancel", "confirm")]
    assert [c["button"] for c in clicks] == ["cancel", "confirm"]
    assert all(c["at"] < report["end"] for c in clicks)  # handled while the busy cell ran
    if path == "official":
        # JupyterLab addressed its own subshell, and the click ran there; the kernel made none of its own
        assert report["own"] is None
        assert all(c["addressed"] and c["subshell"] == c["addressed"] for c in clicks), clicks
    else:
        # JupyterLab sent it on the main shell; it ran on the kernel's own subshell
        assert report["own"]
        assert all(c["addressed"] is None and c["subshell"] == report["own"] for c in clicks), clicks
