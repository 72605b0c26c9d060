"""What the orchestrator costs over running things directly, as ratios measured in one process run.

1. The tiny LoRA job through ``%train submit --wait`` in a real kernel vs the trainer run directly
   (``python -m trainorch_jupyter.trainer`` as a subprocess), same options: wall-time ratio.
2. A trivial command through the orchestrator (submit -> runner -> wait -> download) vs
   ``subprocess.run``: the fixed overhead per job, and the ratio.
3. Log throughput: 200,000 lines through runner + orchestrator + store vs the same command piped to
   /dev/null by ``subprocess.run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "notebooks" / "data" / "train.jsonl"
TRAIN_OPTS = ["--model", "tiny", "--steps", "40", "--log-every", "5", "--seed", "0"]
LINES = 200_000


def _direct_trainer(out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainorch_jupyter.trainer", *TRAIN_OPTS, "--data", str(DATA),
                    "--output-dir", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _through_magic(workspace: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    workspace.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext trainorch_jupyter"),
        nbformat.v4.new_code_cell(
            "import time\nt0 = time.perf_counter()\n"
            f"job = %train submit --wait --name bench {' '.join(TRAIN_OPTS)} --data {DATA}\n"
            "print('WALL', time.perf_counter() - t0, job.status.value)"),
    ]
    os.environ["TRAINORCH_WORKSPACE"] = str(workspace)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workspace)}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs if o.get("output_type") == "stream")
    wall, state = text.split("WALL", 1)[1].split()[:2]
    if state != "COMPLETED":
        raise RuntimeError(f"bench job ended {state}")
    return float(wall)


def _orchestrated(workspace: Path, command: list[str]) -> float:
    from trainorch_jupyter.orchestrator import Orchestrator

    orch = Orchestrator(workspace)
    try:
        t0 = time.perf_counter()
        job = orch.submit({"name": "bench", "command": command})
        final = job.wait(600)
        took = time.perf_counter() - t0
        if final.state.value != "COMPLETED":
            raise RuntimeError(f"bench job ended {final.state.value}: {final.error}")
        return took
    finally:
        orch.close()


def run(*, with_training: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        trivial = [sys.executable, "-c", "import os; open(os.environ.get('TRAINORCH_OUTPUT_DIR', '.') + '/x', 'w').write('x')"]
        t0 = time.perf_counter()
        subprocess.run(trivial, check=True, cwd=tmpd)
        direct_trivial = time.perf_counter() - t0
        orch_trivial = _orchestrated(tmpd / "ws1", trivial)
        results["trivial_job"] = {"direct_s": round(direct_trivial, 3), "orchestrated_s": round(orch_trivial, 3),
                                  "overhead_s": round(orch_trivial - direct_trivial, 3),
                                  "ratio": round(orch_trivial / direct_trivial, 2)}

        printer = [sys.executable, "-c", f"import sys\nw = sys.stdout.write\nfor i in range({LINES}): w(f'line {{i}} ' + 'x' * 60 + '\\n')"]
        t0 = time.perf_counter()
        subprocess.run(printer, check=True, stdout=subprocess.DEVNULL)
        direct_lines = time.perf_counter() - t0
        orch_lines = _orchestrated(tmpd / "ws2", printer)
        results["log_200k_lines"] = {"direct_s": round(direct_lines, 3), "orchestrated_s": round(orch_lines, 3),
                                     "orchestrated_lines_per_s": round(LINES / orch_lines),
                                     "ratio": round(orch_lines / direct_lines, 2)}

        if with_training:
            direct = _direct_trainer(tmpd / "direct-out")
            magic = _through_magic(tmpd / "ws3")
            results["tiny_lora_job"] = {"trainer_direct_s": round(direct, 2), "through_train_magic_s": round(magic, 2),
                                        "ratio": round(magic / direct, 3)}
    return results


if __name__ == "__main__":
    print(json.dumps(run(with_training="--no-training" not in sys.argv), indent=2))
