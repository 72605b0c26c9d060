"""The quickstart notebook (what `make demo` runs) executes top to bottom and its adapter learned the task."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from trainorch_jupyter import demo

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # real training: minutes on a loaded machine


def test_quickstart_notebook_runs_and_the_adapter_learns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    nb_dir = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", nb_dir, ignore=shutil.ignore_patterns(".trainorch", "artifacts", "*.executed.ipynb"))
    monkeypatch.setenv("TRAINORCH_WORKSPACE", str(nb_dir))
    assert demo.main(["--notebook", str(nb_dir / "quickstart.ipynb"), "--timeout", "600"]) == 0
    shown = capsys.readouterr().out
    assert "COMPLETED" in shown and "sha256" in shown and "eval loss" in shown
    executed = nbformat.read(nb_dir / "quickstart.executed.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in text
    last = [ln for ln in text.splitlines() if ln.startswith("exact answers on")][-1]
    before, after = int(last.split("before ")[1].split(",")[0]), int(last.split("after ")[1])
    assert after >= before + 20  # the tuned model answers most held-out prompts; the base model none
