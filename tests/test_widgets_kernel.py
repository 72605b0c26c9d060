"""The widgets in a real IPython kernel, with real local jobs (%load_ext trainorch_jupyter)."""

from __future__ import annotations

import json
import statistics
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel_utils import ARTIFACTS, KernelSession, wait_until

EMIT = textwrap.dedent(
    """
    import json, os, sys, time
    steps, lines, sleep = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    per = max(1, lines // max(1, steps))
    n = 0
    for s in range(1, steps + 1):
        chunk = []
        for _ in range(per):
            n += 1
            chunk.append(f"log line {n} " + "." * 40)
        print("\\n".join(chunk))
        print("TRAINORCH_METRIC " + json.dumps({"step": s, "total_steps": steps, "loss": 2.0 / s}))
        if s % 5 == 0:
            print("TRAINORCH_METRIC " + json.dumps({"kind": "eval", "step": s, "eval_loss": 2.2 / s}))
        time.sleep(sleep)
    out = os.environ["TRAINORCH_OUTPUT_DIR"]
    open(os.path.join(out, "adapter_config.json"), "w").write('{"r": 8}')
    open(os.path.join(out, "weights.bin"), "wb").write(os.urandom(4096))
    """
)

# Cells print their findings as one JSON line; these helpers live in the kernel.
HELPERS = textwrap.dedent(
    """
    import json, re, time, ipywidgets
    import trainorch_jupyter.widgets as W
    from trainorch_jupyter.orchestrator import get_orchestrator
    orch = get_orchestrator()

    def panels_of(job_id):
        return [w for w in list(ipywidgets.Widget.widgets.values())
                if isinstance(w, W.JobPanel) and w.job_id == job_id and not w._closed]

    def panel_facts(p):
        chart = p.chart.value
        train = re.search(r"class='train'[^>]* points='([^']*)'", chart)
        ev = re.search(r"class='eval'[^>]* points='([^']*)'", chart)
        return {
            "state": p.state.value,
            "header_state": re.search(r"data-state='(\\w+)'", p.header.value).group(1),
            "progress": re.search(r"data-progress='([\\d.]+)'", p.header.value).group(1),
            "train_points": len(train.group(1).split()) if train else 0,
            "eval_points": len(ev.group(1).split()) if ev else 0,
            "log_lines": p.log_text.splitlines(),
            "log_view_lines": int(re.search(r"data-lines='(\\d+)'", p.log_view.value).group(1)),
            "artifact_rows": p.artifact_table.value.count("<tr class='trainorch-artifact'>"),
            "artifact_table": p.artifact_table.value,
            "verified": p.artifact_table.value.count("verified</span>"),
            "notice": "Job completed" in p.header.value,
            "cancel_disabled": p.cancel_button.disabled,
            "download_disabled": p.download_button.disabled,
            "routed": p.routed_clicks,
            "comm_ids": {k: getattr(p, k).comm.comm_id for k in ("cancel_button", "confirm_button", "header")},
        }
    """
)


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelSession]:
    ws = tmp_path_factory.mktemp("kernel-ws")
    (ws / "emit.py").write_text(EMIT)
    with KernelSession(ws) as session:
        session.run("%load_ext trainorch_jupyter")
        session.run(HELPERS)
        yield session
        session.save("kernel-widgets")


def submit(ks: KernelSession, name: str, steps: int, lines: int, sleep: float, var: str = "job") -> str:
    """Submit a local job; the cell's value is the handle, displayed as a JobPanel."""
    script = ks.workspace / "emit.py"
    res = ks.run(f"{var} = %train submit --provider local --name {name} -- python {script} {steps} {lines} {sleep}\n{var}")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in res.outputs), res.outputs
    return ks.run(f"print(json.dumps({var}.id))").json()


def test_panel_after_a_local_job(ks: KernelSession) -> None:
    job_id = submit(ks, "panel", steps=30, lines=600, sleep=0.02)
    ks.run("job.wait(60); time.sleep(1.5)", timeout=90)
    facts = ks.run(f"print(json.dumps(panel_facts(panels_of({job_id!r})[0])))").json()
    truth = ks.run("print(json.dumps({'tail': job.logs(tail=200).splitlines(), 'metrics': len(job.metrics()), "
                   "'hashes': [a.hash_sha256 for a in job.artifacts]}))").json()
    assert facts["state"] == facts["header_state"] == "COMPLETED"
    assert facts["progress"] == "100.0"
    assert facts["train_points"] == 30 and facts["eval_points"] == 6  # every metrics point
    assert truth["metrics"] == 36
    assert facts["log_view_lines"] == 200
    assert facts["log_lines"] == truth["tail"]  # the last N lines, in order
    assert facts["artifact_rows"] == 2 and facts["verified"] == 2
    for h in truth["hashes"]:
        assert h in facts["artifact_table"]
    assert facts["notice"] and facts["cancel_disabled"] and not facts["download_disabled"]
    # A new panel (as `%train panel JOB` makes after a kernel restart) rebuilds all of it from the store.
    ks.run(f"%train panel {job_id} --log-lines 50")
    again = ks.run(f"print(json.dumps(panel_facts(panels_of({job_id!r})[-1])))").json()
    assert again["train_points"] == 30 and again["eval_points"] == 6
    assert again["log_lines"] == truth["tail"][-50:]
    assert again["artifact_rows"] == 2 and again["progress"] == "100.0"


def test_cancel_handler_cancels_the_job(ks: KernelSession) -> None:
    job_id = submit(ks, "cancel", steps=2000, lines=2000, sleep=0.05, var="long")
    ks.run("wait_until = lambda f, t=30: next((True for _ in range(int(t * 10)) if f() or time.sleep(0.1)), False)")
    ks.run("assert wait_until(lambda: long.status.value == 'RUNNING')")
    ks.run(f"p = panels_of({job_id!r})[0]; p.cancel_button.click(); assert long.status.value == 'RUNNING'; "
           "p.confirm_button.click()")
    state = ks.run("print(json.dumps(long.wait(30).state.value))", timeout=60).json()
    assert state == "CANCELLED"
    ks.run("time.sleep(1.0)")
    facts = ks.run(f"print(json.dumps(panel_facts(panels_of({job_id!r})[0])))").json()
    assert facts["header_state"] == "CANCELLED" and facts["cancel_disabled"]


@pytest.mark.parametrize("routed", [True, False], ids=["subshell", "main-shell"])
def test_click_during_a_busy_cell(ks: KernelSession, routed: bool) -> None:
    """A click sent while a cell runs: with subshell routing it acts at once, else after the cell."""
    job_id = submit(ks, f"busy-{'sub' if routed else 'main'}", steps=2000, lines=2000, sleep=0.05, var="busy")
    ks.run("assert wait_until(lambda: busy.status.value == 'RUNNING')")
    ids = ks.run(f"bp = W.JobPanel(orch, {job_id!r}, route_clicks={routed}); display(bp); "
                 "print(json.dumps(panel_facts(bp)))").json()
    assert ids["routed"] is routed
    comm = ids["comm_ids"]
    busy_cell = ks.submit("time.sleep(6)")
    time.sleep(1.0)
    t_click = time.monotonic()
    ks.click(comm["cancel_button"])
    time.sleep(0.3)
    ks.click(comm["confirm_button"])

    def cancelled_seen() -> float | None:
        for m in ks.comm_msgs(since=t_click):
            data = m.content.get("data", {})
            value = data.get("state", {}).get("value", "") if isinstance(data, dict) else ""
            if m.content.get("comm_id") == comm["header"] and "data-state='CANCELLED'" in value:
                return m.time
        return None

    seen = wait_until(cancelled_seen, timeout=30)
    ks.wait(busy_cell, timeout=30)
    delay = seen - t_click
    if routed:
        assert seen < busy_cell.finished, "the click waited for the busy cell"
        assert delay < 4.0
    else:
        assert seen >= busy_cell.finished - 0.05  # ipywidgets#3468: the click waited for the cell
    _record(f"click_during_busy_cell_{'subshell' if routed else 'main_shell'}_s", round(delay, 2))
    assert ks.run("print(json.dumps(busy.wait(30).state.value))", timeout=60).json() == "CANCELLED"


def test_message_budget_and_cell_latency_while_streaming_20k_lines(ks: KernelSession) -> None:
    ks.run("%train dashboard")  # a dashboard updates too, under the same budget
    t0 = time.monotonic()
    job_id = submit(ks, "stream", steps=100, lines=20_000, sleep=0.06, var="stream")
    latencies = []
    while True:
        res = ks.run("x = 1 + 1\nprint(json.dumps(stream.status.value))")
        latencies.append(res.seconds)
        if res.json() in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.2)
    ks.run("time.sleep(1.5)")
    t1 = time.monotonic()
    facts = ks.run(f"print(json.dumps(panel_facts(panels_of({job_id!r})[0])))").json()
    assert facts["header_state"] == "COMPLETED" and facts["train_points"] == 100
    assert any(line.startswith("log line 20000 ") for line in facts["log_lines"][-5:])
    msgs = ks.comm_msgs(since=t0, until=t1)
    duration = t1 - t0
    times = [m.time for m in msgs]
    # the busiest 1-second window
    peak = max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)
    peak_bytes = max((sum(m.size for m in msgs if t <= m.time < t + 1.0) for t in times), default=0)
    rate = len(msgs) / duration
    _record("stream_20k_duration_s", round(duration, 1))
    _record("stream_20k_comm_msgs", len(msgs))
    _record("stream_20k_comm_msgs_per_s", round(rate, 1))
    _record("stream_20k_peak_msgs_in_1s", peak)
    _record("stream_20k_peak_bytes_in_1s", peak_bytes)
    _record("cell_latency_while_streaming_median_s", round(statistics.median(latencies), 3))
    _record("cell_latency_while_streaming_max_s", round(max(latencies), 3))
    assert len(latencies) >= 5
    assert rate <= 22, rate  # one global budget of ~20 msgs/s
    assert peak <= 45, peak  # the bucket's burst (20) + one second of refill (20) + slack
    assert peak_bytes < 1_000_000  # Jupyter's IOPub data limit
    assert statistics.median(latencies) < 1.0 and max(latencies) < 5.0


def _record(key: str, value: object) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "widget-measurements.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"{key} = {value}")


def test_terminal_fallback_in_plain_ipython(tmp_path: Path) -> None:
    """In plain IPython (no kernel, no widgets), a job's display is the text summary."""
    import subprocess
    import sys

    script = textwrap.dedent(
        """
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "trainorch_jupyter")
        ip.run_cell('job = %train submit --provider local --name term -- python -c "print(1)"')
        ip.run_cell("job.wait(60)")
        ip.run_cell("job")
        from trainorch_jupyter.widgets import text_summary
        print("SUMMARY", text_summary(ip.user_ns["job"]).splitlines()[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "TRAINORCH_WORKSPACE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SUMMARY term-" in out.stdout and "COMPLETED" in out.stdout
