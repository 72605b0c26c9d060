"""The user's code on the machine, in a real kernel: a notebook folder with train.py (importing a helper beside
it, reading a CSV beside it) runs with `%train submit -- python train.py`; an edit while it runs does not reach
it; an ignored file is not sent; `%train rerun` sends the same snapshot; `--dry-run` creates nothing; a missing
script is diagnosed by its own name; packages go into the job's environment, never the kernel's."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from trainorch_jupyter.model import JobState
from trainorch_jupyter.store import Store

from .nbrun import errors_of, run_cells, text_of
from .test_snapshot import PROBE, make_wheel

TRAIN_PY = """\
import csv, hashlib, os, time
import helper

rows = list(csv.DictReader(open("data/scores.csv")))
print("VERSION 1: rows", len(rows), flush=True)
print("IGNORED PRESENT", os.path.exists("scratch.log"), flush=True)
print("WAITING", flush=True)
while not os.path.exists(os.environ["RELEASE"]):
    time.sleep(0.05)
source = open("train.py", "rb").read()
print("RAN", hashlib.sha256(source).hexdigest(), flush=True)
with open(os.path.join(os.environ["TRAINORCH_OUTPUT_DIR"], "mean.txt"), "w") as out:
    out.write(f"{helper.mean(rows):.2f}")
"""
EDITED = "print('VERSION 2', flush=True)\n"


def _folder(ws: Path) -> Path:
    (ws / "data").mkdir(parents=True)
    (ws / "train.py").write_text(TRAIN_PY)
    (ws / "helper.py").write_text("def mean(rows):\n    return sum(float(r['score']) for r in rows) / len(rows)\n")
    (ws / "data" / "scores.csv").write_text("name,score\nada,3\nbob,4\ncy,5.5\n")
    (ws / ".gitignore").write_text("*.log\n")
    (ws / "scratch.log").write_text("not for the machine\n")
    return ws


def test_train_py_with_its_helper_and_csv_runs_in_its_snapshot(tmp_path: Path) -> None:
    ws = _folder(tmp_path / "nb")
    release = tmp_path / "release.flag"
    v1 = hashlib.sha256(TRAIN_PY.encode()).hexdigest()
    cells = [
        "%load_ext trainorch_jupyter",
        f"job = %train submit --name wd --env RELEASE={release} -- python train.py\nprint('JOB', job.id)",
        # While it runs: edit train.py in the notebook folder, then let the job go on.
        "import time\nwhile 'WAITING' not in job.logs() and not job.status.is_terminal: time.sleep(0.05)\n"
        f"open('train.py', 'w').write({EDITED!r})\nopen({str(release)!r}, 'w').write('go')\n"
        "final = job.wait(120)\nprint('STATE', final.state.value)",
        "%train status wd",
        "%train submit --dry-run -- python train.py",
        "again = %train rerun wd --wait\nprint('RERUN', again.id, again.status.value)\nprint(again.logs())",
        "now = %train submit --wait --name now -- python train.py\nprint('NOW', now.status.value)\nprint(now.logs())",
    ]
    out = run_cells(cells, ws, timeout=180)
    for cell in out:
        assert not errors_of(cell), text_of(cell)
    job_id = re.search(r"JOB (wd-\S+)", text_of(out[1])).group(1)  # type: ignore[union-attr]
    assert "STATE COMPLETED" in text_of(out[2]), text_of(out[2])
    store = Store(ws)
    log = store.read_log(job_id)
    assert "VERSION 1: rows 3" in log and "IGNORED PRESENT False" in log
    assert f"RAN {v1}" in log  # the job ran train.py as it was at submit, not the edited file
    mean = ws / "artifacts" / job_id / "mean.txt"
    assert mean.read_text() == "4.17"
    (art,) = [a for a in store.get(job_id).artifacts if a.name == "mean.txt"]
    assert hashlib.sha256(mean.read_bytes()).hexdigest() == art.hash_sha256
    record = store.get(job_id)
    sha = record.spec.snapshot
    assert sha and record.snapshot and record.snapshot["files"] == 4  # train.py, helper.py, scores.csv, .gitignore
    status = text_of(out[3])
    assert f"snapshot sha256 {sha}" in status and "command   python train.py" in status
    dry = text_of(out[4])
    assert "dry run: nothing was created, stored or sent" in dry and "workdir    .: 4 files" in dry
    assert "scratch.log (ignored by .gitignore (pattern '*.log'))" in dry and "command    python train.py" in dry
    rerun = text_of(out[5])
    assert "COMPLETED" in rerun and "VERSION 1: rows 3" in rerun and f"RAN {v1}" in rerun  # the same snapshot
    assert "NOW COMPLETED" in text_of(out[6]) and "VERSION 2" in text_of(out[6])  # a new submit sends the edit
    jobs = store.list_jobs()
    assert len(jobs) == 3 and all(j.state is JobState.COMPLETED for j in jobs)  # the dry run made none
    again = next(j for j in jobs if j.id.startswith("wd-") and j.id != job_id)
    assert again.spec.snapshot == sha and again.spec.command == record.spec.command
    archives = sorted(p.name for p in (ws / ".trainorch" / "snapshots").glob("*.tar.gz"))
    assert len(archives) == 2 and f"{sha}.tar.gz" in archives


def test_a_missing_script_packages_and_a_changed_input(tmp_path: Path) -> None:
    ws = _folder(tmp_path / "nb")
    make_wheel(ws / "wheels")
    (ws / "notes.txt").write_text("first\n")
    cells = [
        "%load_ext trainorch_jupyter",
        "bad = %train submit --wait --name miss -- python miss.py",
        "%train status miss",
        "%train logs miss",
        f"pkg = %train submit --wait --name pkg --isolated --pip ./wheels/{PROBE}-0.1-py3-none-any.whl -- "
        f"python -c \"import {PROBE} as p; print('PROBE', p.VALUE)\"\nprint('PKG', pkg.status.value)\n"
        "print(pkg.logs())",
        f"import importlib.util\nprint('KERNEL HAS IT', importlib.util.find_spec({PROBE!r}) is not None)",
        "%train status pkg",
        "inp = %train submit --wait --name inp --input notes.txt -- python -c \"print('ok')\"",
        "open('notes.txt', 'w').write('changed\\n')",
        "%train rerun inp",
    ]
    out = run_cells(cells, ws, timeout=240, allow_errors=True, env={"PIP_NO_INDEX": "1"})
    status = text_of(out[2])
    assert "state     FAILED" in status
    assert "miss.py: it is not in your workdir" in status and ".trainorch/machines" not in status, status
    assert "can't open file" in text_of(out[3]) and ".trainorch/machines" not in text_of(out[3])
    pkg = text_of(out[4])
    assert "PKG COMPLETED" in pkg and "PROBE 42" in pkg, pkg
    assert f"[trainorch] pip install ./wheels/{PROBE}-0.1-py3-none-any.whl" in pkg
    assert "Successfully installed trainorch-wheel-probe-0.1" in pkg
    assert "KERNEL HAS IT False" in text_of(out[5])
    assert f"asked for: ./wheels/{PROBE}-0.1-py3-none-any.whl -> {PROBE}==0.1" in text_of(out[6]), text_of(out[6])
    refused = text_of(out[9])
    assert refused.startswith("UsageError: %train rerun: notes.txt changed since job inp-"), refused
    assert len(Store(ws).list_jobs()) == 3  # miss, pkg, inp: the refused rerun made none
