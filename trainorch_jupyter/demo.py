"""``make demo``: execute the quickstart notebook headless and report the verified adapter.

Runs ``notebooks/quickstart.ipynb`` in a real kernel (nbclient) with the notebooks folder as the
workspace, saves the executed copy beside it (``quickstart.executed.ipynb``), then prints the adapter's
path, its SHA-256 (checked again against ``trainorch-artifact.json``), and the eval loss before/after.
Needs the ``dev`` extra (nbclient, ipykernel) and the ``train`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .artifacts import verify_local
from .model import JobState
from .store import Store


def _find_notebook(path: str | None) -> Path:
    if path:
        return Path(path).resolve()
    here = Path.cwd() / "notebooks" / "quickstart.ipynb"
    if here.exists():
        return here
    return (Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb").resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainorch_jupyter.demo", description=__doc__)
    parser.add_argument("--notebook", help="notebook to run (default notebooks/quickstart.ipynb)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = parser.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb_path = _find_notebook(args.notebook)
    if not nb_path.exists():
        print(f"demo: notebook not found: {nb_path}", file=sys.stderr)
        return 2
    workspace = nb_path.parent
    os.environ["TRAINORCH_WORKSPACE"] = str(workspace)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.time()
    print(f"demo: executing {nb_path} (workspace {workspace}) ...", flush=True)
    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workspace)}})
    out_path = nb_path.with_name(nb_path.stem + ".executed.ipynb")
    try:
        client.execute()
    except CellExecutionError as exc:
        nbformat.write(nb, out_path)
        print(f"demo: a cell failed; the executed notebook is in {out_path}\n{exc}", file=sys.stderr)
        return 1
    nbformat.write(nb, out_path)
    elapsed = time.time() - started

    store = Store(workspace)
    jobs = [j for j in store.list_jobs() if j.created_at.timestamp() >= started - 1]
    if not jobs:
        print("demo: the notebook ran but submitted no job", file=sys.stderr)
        return 1
    job = jobs[0]
    if job.state is not JobState.COMPLETED:
        print(f"demo: job {job.id} ended {job.state.value}: {job.error}", file=sys.stderr)
        return 1
    verified = {a.name: a for a in verify_local(workspace / "artifacts" / job.id)}
    adapter = verified.get("adapter_model.safetensors")
    if adapter is None:
        print(f"demo: job {job.id} has no adapter_model.safetensors", file=sys.stderr)
        return 1
    summary_path = workspace / "artifacts" / job.id / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    print()
    print(f"demo: job        {job.id} COMPLETED in {elapsed:.0f}s (notebook run)")
    print(f"demo: adapter    {adapter.path}")
    print(f"demo: sha256     {adapter.hash_sha256} (verified again against trainorch-artifact.json)")
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss_after")
    if isinstance(before, int | float) and isinstance(after, int | float):
        print(f"demo: eval loss  {before:.4f} -> {after:.4f}")
    print(f"demo: notebook   {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
