"""What the orchestrator costs over running things directly, as ratios measured in one process run.

1. A trivial command through the orchestrator (submit -> runner -> wait -> download) vs ``subprocess.run``: the
   fixed overhead per job, and the ratio.
2. Log throughput: 200,000 lines through runner + orchestrator + store vs the same command piped to /dev/null by
   ``subprocess.run``.
3. The tiny LoRA job through ``%train submit --wait`` in a real kernel vs the trainer run directly
   (``python -m trainorch_jupyter.trainer`` as a subprocess), same options: wall-time ratio.

Each pair: one warm-up of both sides (discarded: it builds the tiny model, fills the page cache, starts the
orchestrator's loop and HTTP client), then ``rounds`` alternated pairs (direct first in even rounds, ours first
in odd ones); each figure is the median of the rounds with min-max (``benchmarks/stats.py``), and ``rounds_s``
lists each round's ``[direct, ours]`` seconds. One orchestrator and one kernel serve all rounds, as in a notebook:
their start is not a per-job cost.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import ROUNDS, alternated, ratios, spread

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "notebooks" / "data" / "train.jsonl"
TRAIN_OPTS = ["--model", "tiny", "--steps", "20", "--log-every", "5", "--seed", "0"]
LINES = 200_000


class _Kernel:
    """One real IPython kernel with the extension loaded; ``run(code)`` returns the cell's stream text."""

    def __init__(self, workspace: Path) -> None:
        from jupyter_client.manager import start_new_kernel

        workspace.mkdir(parents=True, exist_ok=True)
        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(workspace))
        self.run("%load_ext trainorch_jupyter")

    def run(self, code: str, timeout: float = 900) -> str:
        out: list[str] = []
        errors: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                errors.append("\n".join(msg["content"]["traceback"]))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        if reply["content"]["status"] != "ok" or errors:
            raise RuntimeError(f"cell failed: {code[:80]!r}: {''.join(errors) or reply['content']}")
        return "".join(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _direct_trainer(out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainorch_jupyter.trainer", *TRAIN_OPTS, "--data", str(DATA),
                    "--output-dir", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _through_magic(kernel: _Kernel) -> float:
    text = kernel.run(
        "import time\nt0 = time.perf_counter()\n"
        f"job = %train submit --wait --name bench {' '.join(TRAIN_OPTS)} --data {DATA}\n"
        "print('WALL', time.perf_counter() - t0, job.status.value)")
    wall, state = text.split("WALL", 1)[1].split()[:2]
    if state != "COMPLETED":
        raise RuntimeError(f"bench job ended {state}")
    return float(wall)


def _direct(command: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _orchestrated(orch: Any, command: list[str]) -> float:
    t0 = time.perf_counter()
    job = orch.submit({"name": "bench", "command": command})
    final = job.wait(600)
    took = time.perf_counter() - t0
    if final.state.value != "COMPLETED":
        raise RuntimeError(f"bench job ended {final.state.value}: {final.error}")
    return took


def _pair(direct: list[float], ours: list[float], digits: int = 3) -> dict[str, Any]:
    return {"direct_s": spread(direct, digits), "orchestrated_s": spread(ours, digits),
            "overhead_s": spread([o - d for o, d in zip(ours, direct, strict=True)], digits),
            "ratio": spread(ratios(ours, direct)),
            "rounds_s": [[round(d, digits), round(o, digits)] for d, o in zip(direct, ours, strict=True)]}


def run(*, with_training: bool = True, rounds: int = ROUNDS) -> dict[str, Any]:
    from trainorch_jupyter.orchestrator import Orchestrator

    results: dict[str, Any] = {"rounds": rounds}
    saved = {k: os.environ.get(k) for k in ("TRAINORCH_CACHE", "TRAINORCH_WORKSPACE", "HF_HUB_OFFLINE")}
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        tmpd = Path(tmp)
        # A private tiny-model cache: the warm-up builds it (a cold start, then excluded) for both sides.
        os.environ["TRAINORCH_CACHE"] = str(tmpd / "cache")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            orch = Orchestrator(tmpd / "ws")
            try:
                (tmpd / "direct").mkdir()
                trivial = [sys.executable, "-c",
                           "import os; open(os.environ.get('TRAINORCH_OUTPUT_DIR', '.') + '/x', 'w').write('x')"]
                m = alternated({"direct": lambda: _direct(trivial, tmpd / "direct"),
                                "orchestrated": lambda: _orchestrated(orch, trivial)}, rounds)
                results["trivial_job"] = _pair(m["direct"], m["orchestrated"])

                printer = [sys.executable, "-c",
                           f"import sys\nw = sys.stdout.write\nfor i in range({LINES}): w(f'line {{i}} ' + 'x' * 60 + '\\n')"]
                m = alternated({"direct": lambda: _direct(printer, tmpd / "direct"),
                                "orchestrated": lambda: _orchestrated(orch, printer)}, rounds)
                results["log_200k_lines"] = {**_pair(m["direct"], m["orchestrated"]),
                                             "orchestrated_lines_per_s": spread([LINES / s for s in m["orchestrated"]], 0)}
            finally:
                orch.close()

            if with_training:
                os.environ["TRAINORCH_WORKSPACE"] = str(tmpd / "ws-kernel")
                kernel = _Kernel(tmpd / "ws-kernel")
                runs = itertools.count()
                try:
                    m = alternated({"trainer_direct": lambda: _direct_trainer(tmpd / f"direct-out-{next(runs)}"),
                                    "through_train_magic": lambda: _through_magic(kernel)}, rounds)
                finally:
                    kernel.close()
                results["tiny_lora_job"] = {
                    "options": " ".join(TRAIN_OPTS),
                    "trainer_direct_s": spread(m["trainer_direct"], 2),
                    "through_train_magic_s": spread(m["through_train_magic"], 2),
                    "ratio": spread(ratios(m["through_train_magic"], m["trainer_direct"])),
                    "rounds_s": [[round(d, 2), round(o, 2)]
                                 for d, o in zip(m["trainer_direct"], m["through_train_magic"], strict=True)],
                }
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return results


if __name__ == "__main__":
    print(json.dumps(run(with_training="--no-training" not in sys.argv), indent=2))
