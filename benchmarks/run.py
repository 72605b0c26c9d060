"""``make bench``: every benchmark, each as ratios against a baseline measured in the same run."""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any

BENCHES = ["bench_orchestrator", "bench_trainer", "bench_download"]


def main() -> int:
    results: dict[str, Any] = {}
    for name in BENCHES:
        mod = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        results[name] = mod.run()
        print(json.dumps(results[name], indent=2), flush=True)
        print(f"   ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
