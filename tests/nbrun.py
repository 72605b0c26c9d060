"""Run notebook cells in a real kernel (nbclient) in a given workspace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient


def run_cells(cells: list[str], workspace: Path, *, timeout: int = 300, allow_errors: bool = False,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Execute ``cells`` in a fresh kernel whose cwd is ``workspace``; return the executed cells."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    saved = dict(os.environ)
    os.environ.update({"TRAINORCH_WORKSPACE": str(workspace), **(env or {})})
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                                resources={"metadata": {"path": str(workspace)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return [dict(c) for c in nb.cells]


def text_of(cell: dict[str, Any]) -> str:
    """Everything a cell showed, as text (streams, text/plain results, error names and values)."""
    parts: list[str] = []
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream":
            parts.append(out.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
            parts.append(out.get("data", {}).get("text/html", ""))
        elif kind == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}\n")
            parts.append("\n".join(out.get("traceback", [])))
    return "".join(parts)


def errors_of(cell: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
