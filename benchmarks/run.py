"""``make bench``: every benchmark, each as ratios against a baseline measured in the same run.

Every ratio is the median of alternated rounds after a warm-up, with min-max (``benchmarks/stats.py``). The
machine should be otherwise idle: on a shared machine the spread says how far to trust a figure.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

BENCHES = ["bench_orchestrator", "bench_trainer", "bench_download", "bench_fleet"]


def ratio_lines(results: dict[str, Any]) -> list[str]:
    """One line per ratio found in the results: ``bench.figure: median (min-max, n rounds)``."""
    out: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            if set(node) >= {"median", "min", "max", "n"}:
                if "ratio" in prefix:
                    out.append(f"{prefix}: {node['median']} ({node['min']}-{node['max']}, {node['n']} rounds)")
                return
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)

    walk("", results)
    return out


def main() -> int:
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for name in BENCHES:
        mod = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        results[name] = mod.run()
        print(json.dumps(results[name], indent=2), flush=True)
        print(f"   ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(json.dumps(results, indent=2))
    print(f"\n== ratios: median (min-max) of alternated rounds; {os.cpu_count()} CPUs, load average at start "
          f"{load if load is None else round(load, 2)}, {time.perf_counter() - t_all:.0f}s in all")
    for line in ratio_lines(results):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
