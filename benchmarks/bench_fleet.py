"""50 jobs at once across the three fake clouds: every request paced to each provider's limits (the fakes count
violations), and the orchestrator's own CPU while the jobs provision, run and poll.

The fakes run as separate processes (``python -m trainorch_jupyter.fakes``) with the providers' real rate limits
(RunPod's per-minute window, Lambda's 1 request/s and one launch per 12 s, Vast's per-endpoint spacing), so the CPU
measured here (``time.process_time`` of this process) is the orchestrator's alone: its loop, its HTTP clients, the
store. The figure reported is the orchestrator's CPU per wall second (cores) while jobs were live, against the same
process sleeping idle for the same wall time (the baseline: an orchestrator with no job).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

KEY = "bench-key-0123456789abcdef"
JOBS = {"runpod": 20, "vast": 20, "lambda": 10}
COMMAND = ["python3", "-c", "import time; print('up', flush=True); time.sleep(5); print('done', flush=True)"]


def _start_fake(name: str, work: Path) -> tuple[subprocess.Popen[str], str]:
    env_path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    cmd = [sys.executable, "-m", "trainorch_jupyter.fakes", name, "--port", "0", "--api-key", KEY,
           "--provision-s", "1", "--work-dir", str(work / name), "--env", f"PATH={env_path}", "--env", "PIP_NO_INDEX=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError(f"the {name} fake did not start: {url!r}")
    return proc, url


def _state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/_fake/state", timeout=30) as r:
        return dict(json.loads(r.read()))


def run() -> dict[str, Any]:
    from trainorch_jupyter.orchestrator import Orchestrator

    with tempfile.TemporaryDirectory(prefix="trainorch-fleet-") as tmp:
        work = Path(tmp)
        fakes = {name: _start_fake(name, work) for name in JOBS}
        saved = dict(os.environ)
        try:
            for name, (_, url) in fakes.items():
                os.environ[f"{name.upper()}_API_KEY"] = KEY
                os.environ[f"TRAINORCH_{name.upper()}_URL"] = url
            orch = Orchestrator(work / "ws")
            try:
                # Baseline: the same orchestrator, no job, for a few seconds.
                c0, w0 = time.process_time(), time.perf_counter()
                time.sleep(5.0)
                idle_cores = (time.process_time() - c0) / (time.perf_counter() - w0)
                c0, w0 = time.process_time(), time.perf_counter()
                handles = [orch.submit({"name": f"fleet-{name}-{i}", "provider": name, "command": COMMAND,
                                        "resources": {"gpu": "RTX 4090" if name != "lambda" else None}})
                           for name, n in JOBS.items() for i in range(n)]
                submit_s = time.perf_counter() - w0
                samples: list[float] = []
                last_c, last_w = time.process_time(), time.perf_counter()
                while any(not h.status.is_terminal for h in handles):
                    time.sleep(2.0)
                    c, w = time.process_time(), time.perf_counter()
                    samples.append((c - last_c) / (w - last_w))
                    last_c, last_w = c, w
                    if w - w0 > 1200:
                        break
                wall = time.perf_counter() - w0
                cores = (time.process_time() - c0) / wall
                states: dict[str, int] = {}
                for h in handles:
                    states[h.status.value] = states.get(h.status.value, 0) + 1
            finally:
                orch.close()
            fake_states = {name: _state(url) for name, (_, url) in fakes.items()}
        finally:
            os.environ.clear()
            os.environ.update(saved)
            for proc, _ in fakes.values():
                proc.terminate()
            for proc, _ in fakes.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    samples.sort()
    return {
        "jobs": sum(JOBS.values()),
        "per_provider": JOBS,
        "states": states,
        "submit_all_s": round(submit_s, 2),
        "all_done_s": round(wall, 1),
        "orchestrator_cores_while_live": {"mean": round(cores, 3),
                                          "p50": round(samples[len(samples) // 2], 3) if samples else None,
                                          "max": round(samples[-1], 3) if samples else None},
        "orchestrator_cores_idle_baseline": round(idle_cores, 4),
        "rate_limit_violations": {n: len(s.get("rate_limit_violations") or []) for n, s in fake_states.items()},
        "machines_billing_after": {n: s.get("machines_billing") for n, s in fake_states.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
