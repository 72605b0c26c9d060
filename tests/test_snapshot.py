"""The workdir snapshot: what is sent and what is left out (gitignore semantics through pathspec), the size cap,
a deterministic content-addressed archive, the command composed around it, and real local jobs that run in it
(an edit after submit does not reach them; packages go into a per-job environment, never the kernel's)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from trainorch_jupyter import snapshot as snap
from trainorch_jupyter.checks import prepare
from trainorch_jupyter.model import JobSpec, JobState, SpecError, TrainerConfig
from trainorch_jupyter.orchestrator.run import _UNPACK, ENVIRONMENT_FILE, build_command

from .helpers import orchestrator

PROBE = "trainorch_wheel_probe"


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def make_wheel(dest: Path, name: str = PROBE, version: str = "0.1") -> Path:
    """A pure-Python wheel built by hand (no network, no build backend): ``import name; name.VALUE == 42``."""
    dest.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: trainorch-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    whl = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return whl


def sent(found: snap.Scan) -> set[str]:
    return {e.path for e in found.entries if e.kind != "dir"}


def left(found: snap.Scan) -> dict[str, str]:
    return {lo.path: lo.reason for lo in found.left_out}


# --------------------------------------------------------------------------------------------
# What is sent
# --------------------------------------------------------------------------------------------


def test_gitignore_trainorchignore_and_what_is_always_left_out(tmp_path: Path) -> None:
    ws = write(tmp_path / "nb", {
        "train.py": "print(1)\n", "helper.py": "X = 1\n", "data.csv": "a,b\n1,2\n",
        ".gitignore": "*.log\nsecrets/\ndata.csv\n",
        ".trainorchignore": "!data.csv\nscratch.txt\n",
        "run.log": "x", "secrets/key.txt": "k", "scratch.txt": "s",
        ".git/HEAD": "ref", ".trainorch/jobs.db": "db", "artifacts/job/a.bin": "a",
        "__pycache__/x.pyc": "c", ".ipynb_checkpoints/nb-checkpoint.ipynb": "{}",
        "venv/pyvenv.cfg": "home = /usr", "venv/lib/x.py": "",
        "conda/conda-meta/history": "", "pkg/artifacts/keep.txt": "nested artifacts are the user's",
        "pkg/__init__.py": "",
    })
    found = snap.scan(ws)
    assert sent(found) == {"train.py", "helper.py", "data.csv", ".gitignore", ".trainorchignore",
                           "pkg/__init__.py", "pkg/artifacts/keep.txt"}
    out = left(found)
    assert out["run.log"] == "ignored by .gitignore (pattern '*.log')"
    assert out["secrets/"] == "ignored by .gitignore (pattern 'secrets/')"
    assert out["scratch.txt"] == "ignored by .trainorchignore (pattern 'scratch.txt')"
    assert "git" in out[".git/"] and "trainorch" in out[".trainorch/"] and "artifacts" in out["artifacts/"]
    assert out["venv/"] == out["conda/"] == "a virtual environment"
    assert "__pycache__/" in out and ".ipynb_checkpoints/" in out
    assert found.left_out_count == len(found.left_out) == 10


def test_nested_gitignores_and_negation_follow_git(tmp_path: Path) -> None:
    ws = write(tmp_path / "nb", {
        ".gitignore": "*.csv\n!keep.csv\n",
        "a.csv": "", "keep.csv": "", "sub/b.csv": "", "sub/.gitignore": "!b.csv\n*.tmp\n", "sub/x.tmp": "",
        "deep/inner/c.tmp": "",
    })
    found = snap.scan(ws)
    assert {"keep.csv", "sub/b.csv", "deep/inner/c.tmp"} <= sent(found)
    assert "a.csv" in left(found) and "sub/x.tmp" in left(found)
    assert left(found)["sub/x.tmp"] == "ignored by sub/.gitignore (pattern '*.tmp')"


def test_gitignores_above_the_workdir_apply_inside_a_repository_only(tmp_path: Path) -> None:
    write(tmp_path / "repo", {".gitignore": "*.csv\n/nb/local.txt\n", "nb/data.csv": "", "nb/local.txt": "",
                              "nb/train.py": "", ".git/HEAD": ""})
    found = snap.scan(tmp_path / "repo" / "nb")
    assert sent(found) == {"train.py"}
    assert "repo/.gitignore" in left(found)["data.csv"] and "pattern '/nb/local.txt'" in left(found)["local.txt"]
    # The same files outside any git repository: nothing above the workdir applies.
    write(tmp_path / "plain", {".gitignore": "*.csv\n", "nb/data.csv": "", "nb/train.py": ""})
    assert sent(snap.scan(tmp_path / "plain" / "nb")) == {"data.csv", "train.py"}


def test_symlinks_inside_are_kept_outside_are_skipped(tmp_path: Path) -> None:
    outside = write(tmp_path / "elsewhere", {"secret.txt": "not for the machine"})
    ws = write(tmp_path / "nb", {"data/real.csv": "a\n1\n", "train.py": ""})
    (ws / "link.csv").symlink_to("data/real.csv")
    (ws / "out.txt").symlink_to(outside / "secret.txt")
    (ws / "dangling").symlink_to(ws / "nowhere")
    found = snap.scan(ws)
    assert "link.csv" in sent(found)
    assert "symbolic link to outside" in left(found)["out.txt"]
    assert "symbolic link to outside" in left(found)["dangling"]
    made = snap.pack(found, tmp_path / "store")
    dest = tmp_path / "unpacked"
    dest.mkdir()
    subprocess.run([sys.executable, "-c", _UNPACK, str(made.path), str(dest)], check=True)
    assert (dest / "link.csv").is_symlink() and (dest / "link.csv").read_text() == "a\n1\n"
    assert not (dest / "out.txt").exists()
    with tarfile.open(made.path) as tar:
        assert b"not for the machine" not in b"".join(
            tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())  # type: ignore[union-attr]


def test_the_archive_is_deterministic_content_addressed_and_keeps_exec_bits(tmp_path: Path) -> None:
    ws = write(tmp_path / "nb", {"train.py": "print('v1')\n", "run.sh": "#!/bin/sh\necho hi\n", "d/e/f.txt": "f"})
    (ws / "run.sh").chmod(0o755)
    (ws / "empty").mkdir()
    store = tmp_path / "ws"
    first = snap.pack(snap.scan(ws), store)
    os.utime(ws / "train.py", (1, 1))  # times do not matter, only the bytes
    again = snap.pack(snap.scan(ws), store)
    assert first.sha256 == again.sha256 and first.path == again.path
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256
    assert first.path == store / ".trainorch" / "snapshots" / f"{first.sha256}.tar.gz"
    manifest = snap.load_manifest(store, first.sha256)
    assert manifest is not None
    assert {f["path"]: f["sha256"] for f in manifest["files"]}["train.py"] == \
        hashlib.sha256(b"print('v1')\n").hexdigest()
    (ws / "train.py").write_text("print('v2')\n")
    changed = snap.pack(snap.scan(ws), store)
    assert changed.sha256 != first.sha256
    assert first.path.exists()  # the first snapshot is still there for a rerun
    dest = tmp_path / "out"
    dest.mkdir()
    subprocess.run([sys.executable, "-c", _UNPACK, str(first.path), str(dest)], check=True)
    assert (dest / "train.py").read_text() == "print('v1')\n"
    assert os.access(dest / "run.sh", os.X_OK) and not os.access(dest / "train.py", os.X_OK)
    assert (dest / "empty").is_dir() and (dest / "d" / "e" / "f.txt").read_text() == "f"


def test_the_size_cap_names_the_largest_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = write(tmp_path / "nb", {"train.py": "x" * 10, "big/weights.bin": b"\0" * 1_500_000,
                                 "medium.npy": b"\0" * 400_000})
    monkeypatch.setenv(snap.MAX_MB_ENV, "1")
    limit = snap.max_bytes()
    assert limit == 1_000_000
    found = snap.scan(ws, max_total=limit)
    with pytest.raises(SpecError) as err:
        found.check_size(limit)
    msg = str(err.value)
    assert "\n" not in msg and "1.9 MB" in msg and "1.0 MB" in msg
    assert msg.index("big/weights.bin (1.5 MB)") < msg.index("medium.npy (400.0 KB)")
    assert ".trainorchignore" in msg and snap.MAX_MB_ENV in msg and "--no-workdir" in msg
    assert snap.max_bytes(5) == 5_000_000  # the spec's own cap wins
    snap.scan(ws).check_size(snap.max_bytes(5))
    with pytest.raises(SpecError, match="more than 2 files"):
        snap.scan(ws).check_size(snap.max_bytes(5), max_files=2)


def test_a_huge_folder_is_not_walked_to_the_end(tmp_path: Path) -> None:
    ws = tmp_path / "home"
    for i in range(30):
        write(ws, {f"d{i}/blob.bin": b"\0" * 100_000})
    found = snap.scan(ws, max_total=1_000)  # stops once well over the cap
    assert found.truncated and len(found.files) < 30
    with pytest.raises(SpecError, match="at least"):
        found.check_size(1_000)


def test_a_file_that_grows_past_the_cap_while_packed_fails(tmp_path: Path) -> None:
    ws = write(tmp_path / "nb", {"a.bin": b"\0" * 1000})
    found = snap.scan(ws)
    (ws / "a.bin").write_bytes(b"\0" * 5000)
    with pytest.raises(SpecError, match="grew past the cap"):
        snap.pack(found, tmp_path / "store", limit=2000)
    assert list((tmp_path / "store" / ".trainorch" / "snapshots").iterdir()) == []  # nothing half-written left


# --------------------------------------------------------------------------------------------
# The command composed around it
# --------------------------------------------------------------------------------------------


def test_a_plain_command_is_started_as_it_is() -> None:
    spec = JobSpec(name="x", command=("python", "-c", "print(1)"))
    assert build_command(spec, "local") == ["python", "-c", "print(1)"]


def test_the_composed_command_unpacks_installs_then_execs() -> None:
    spec = JobSpec(name="x", command=("python", "train.py", "--lr", "it's"), workdir="/nb", snapshot="a" * 64,
                   pip=("scikit-learn>=1.3", "./wheels/p.whl"), isolated=True)
    argv = build_command(spec, "local", remote=False, requirements=True)
    assert argv[:2] == ["/bin/sh", "-c"]
    script = argv[2]
    order = [script.index(s) for s in ("set -e", ".trainorch-workdir.tar.gz", "-m venv --without-pip "
                                       "--system-site-packages", "pip install --progress-bar off 'scikit-learn>=1.3' "
                                       "./wheels/p.whl", "-r requirements.txt", "packages recorded",
                                       "exec python train.py --lr 'it'\"'\"'s'")]
    assert order == sorted(order)
    assert "[trainorch] pip install scikit-learn>=1.3 ./wheels/p.whl" in script
    # On local without --isolated, requirements.txt is not installed into the kernel's environment: it says so.
    plain = build_command(JobSpec(name="x", command=("python", "t.py"), workdir="/nb"), "local", remote=False,
                          requirements=True)[2]
    assert "-m pip" not in plain and "not installed" in plain and "-m venv" not in plain
    # On a remote machine requirements.txt goes into the machine's Python.
    remote = build_command(JobSpec(name="x", command=("python3", "t.py"), workdir="/nb"), "runpod", remote=True,
                           requirements=True)[2]
    assert '"$PY" -m pip install --progress-bar off -r requirements.txt' in remote and "PY=python3" in remote


def test_a_remote_trainer_job_still_brings_this_package_and_its_packages(tmp_path: Path) -> None:
    data = write(tmp_path, {"d.jsonl": '{"text": "hello"}\n'}) / "d.jsonl"
    spec = JobSpec(name="x", provider="runpod", train=TrainerConfig(model="tiny", data=str(data)))
    script = build_command(spec, "runpod", wheel="trainorch_jupyter-0.1-py3-none-any.whl", packages=["torch>=2.2"],
                           remote=True)[2]
    assert "-m zipfile -e '${TRAINORCH_INPUT_DIR}/trainorch_jupyter-0.1-py3-none-any.whl'" in script
    assert "[trainorch] pip install torch>=2.2" in script
    assert 'exec "$PY" -m trainorch_jupyter.trainer --model tiny --data \'${TRAINORCH_INPUT_DIR}/data.jsonl\'' in script
    local = build_command(dataclasses_replace(spec, provider="local"), "local", remote=False)
    assert local[:3] == [sys.executable, "-m", "trainorch_jupyter.trainer"]


def dataclasses_replace(spec: JobSpec, **kw: object) -> JobSpec:
    import dataclasses

    return dataclasses.replace(spec, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Real local jobs
# --------------------------------------------------------------------------------------------

TRAIN_PY = """\
import csv, os, helper
rows = list(csv.DictReader(open("data/table.csv")))
print("VERSION 1", "rows", len(rows), "total", helper.total(rows), flush=True)
print("IGNORED PRESENT", os.path.exists("notes.log"), flush=True)
open(os.path.join(os.environ["TRAINORCH_OUTPUT_DIR"], "total.txt"), "w").write(str(helper.total(rows)))
"""


def _notebook_folder(root: Path) -> Path:
    return write(root, {"train.py": TRAIN_PY, "helper.py": "def total(rows):\n    return sum(int(r['n']) for r in rows)\n",
                        "data/table.csv": "name,n\na,1\nb,2\nc,39\n", ".gitignore": "*.log\n", "notes.log": "private"})


def test_a_command_runs_in_its_snapshot_and_a_later_edit_does_not_reach_it(tmp_path: Path) -> None:
    ws = _notebook_folder(tmp_path)
    with orchestrator(ws) as orch:
        spec = JobSpec(name="wd", command=(sys.executable, "train.py"), workdir=str(ws))
        ready = prepare(spec, workspace=ws, remote=False)
        assert ready.spec.snapshot and ready.snapshot is not None and ready.snapshot.files == 4
        (ws / "train.py").write_text("raise SystemExit('the edited file ran')\n")  # after submit's snapshot
        final = orch.submit(ready.spec).wait(120)
        assert final.state is JobState.COMPLETED, (final.error, orch.logs(final.id))
        log = orch.logs(final.id)
        assert "VERSION 1 rows 3 total 42" in log and "IGNORED PRESENT False" in log
        assert log.splitlines()[0].startswith("VERSION 1")  # the log is the command's own
        (art,) = final.artifacts
        assert art.name == "total.txt" and art.path.read_text() == "42"
        assert final.snapshot and final.snapshot["sha256"] == ready.spec.snapshot and final.snapshot["files"] == 4
        assert final.input_hashes[".trainorch-workdir.tar.gz"] == ready.spec.snapshot
        assert final.command and final.command[:2] == ["/bin/sh", "-c"]


@pytest.mark.timeout(300)
def test_isolated_packages_go_into_the_jobs_environment_never_the_kernels(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing may come from the network
    # trainorch_jupyter itself is an editable install here (a .pth in the kernel's site-packages): seen too.
    ws = write(tmp_path, {"use.py": f"import {PROBE}, pathspec, trainorch_jupyter\nprint('PROBE', {PROBE}.VALUE)\n",
                          "requirements.txt": "pathspec\n"})
    make_wheel(ws / "wheels")
    with orchestrator(ws) as orch:
        spec = JobSpec(name="iso", command=("python", "use.py"), workdir=str(ws), isolated=True,
                       pip=(str(ws / "wheels" / f"{PROBE}-0.1-py3-none-any.whl"),))
        ready = prepare(spec, workspace=ws, remote=False)
        assert ready.spec.pip == (f"./wheels/{PROBE}-0.1-py3-none-any.whl",)  # relative to the workdir
        final = orch.submit(ready.spec).wait(240)
        log = orch.logs(final.id)
        assert final.state is JobState.COMPLETED, (final.error, log)
        assert f"[trainorch] pip install ./wheels/{PROBE}-0.1-py3-none-any.whl" in log
        assert "Successfully installed trainorch-wheel-probe-0.1" in log
        assert "[trainorch] pip install -r requirements.txt" in log and "Requirement already satisfied: pathspec" in log
        assert "PROBE 42" in log
        assert final.packages is not None
        assert final.packages["packages"][PROBE] == "0.1" and "pathspec" in final.packages["packages"]
        assert final.packages["requested"] == [f"./wheels/{PROBE}-0.1-py3-none-any.whl", "-r requirements.txt"]
        assert ENVIRONMENT_FILE in {a.name for a in final.artifacts}
    # The kernel's (this process's) environment did not get it.
    assert importlib.util.find_spec(PROBE) is None
    assert not list(Path(sys.prefix).rglob(f"{PROBE}*"))


def test_pip_on_local_needs_isolated(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="--isolated"):
        prepare(JobSpec(name="x", command=("true",), pip=("requests",)), workspace=tmp_path, remote=False)
    prepare(JobSpec(name="x", command=("true",), pip=("requests",)), workspace=tmp_path, remote=True)


def test_a_spec_from_python_without_a_snapshot_is_packed_when_it_starts(tmp_path: Path) -> None:
    ws = _notebook_folder(tmp_path)
    with orchestrator(ws) as orch:
        final = orch.submit({"name": "api", "command": [sys.executable, "train.py"], "workdir": str(ws)}).wait(120)
        assert final.state is JobState.COMPLETED, (final.error, orch.logs(final.id))
        assert "VERSION 1 rows 3 total 42" in orch.logs(final.id)
        assert final.snapshot and (ws / ".trainorch" / "snapshots" / f"{final.snapshot['sha256']}.tar.gz").is_file()


def test_a_snapshot_that_is_gone_fails_the_job_clearly(tmp_path: Path) -> None:
    ws = _notebook_folder(tmp_path)
    ready = prepare(JobSpec(name="gone", command=("python", "train.py"), workdir=str(ws)), workspace=ws, remote=False)
    assert ready.snapshot is not None
    ready.snapshot.path.write_bytes(b"not the archive any more")
    with orchestrator(ws) as orch:
        final = orch.submit(ready.spec).wait(60)
    assert final.state is JobState.FAILED
    assert "snapshot" in (final.error or "") and "cannot be sent again" in (final.error or "")


def test_a_prepared_spec_prepares_again_from_its_snapshot_alone(tmp_path: Path) -> None:
    """What `%train rerun` does: the "./" paths of a prepared spec are inside its snapshot, even when the workdir
    is not the notebook's folder, and the folder itself may be gone by then."""
    ws = tmp_path / "nb"
    code = write(ws / "project", {"run.py": "print(1)\n", "models/m/config.json": "{}", "d.jsonl": '{"text": "a b"}\n'})
    make_wheel(code / "wheels")
    spec = JobSpec(name="again", provider="runpod", workdir="project", isolated=True,
                   pip=(f"project/wheels/{PROBE}-0.1-py3-none-any.whl",),
                   train=TrainerConfig(model="project/models/m", data=str(code / "d.jsonl"), eval_fraction=0.0))
    first = prepare(spec, workspace=ws, remote=True)
    assert first.spec.pip == (f"./wheels/{PROBE}-0.1-py3-none-any.whl",)
    assert first.spec.train is not None and first.spec.train.model == "./models/m"
    import shutil

    data = tmp_path / "d.jsonl"
    shutil.copy(code / "d.jsonl", data)
    shutil.rmtree(code)
    again = prepare(dataclasses_replace(first.spec, train=dataclasses_replace(first.spec.train, data=str(data))),
                    workspace=ws, remote=True)
    assert again.spec.snapshot == first.spec.snapshot and again.spec.pip == first.spec.pip
    assert again.snapshot is not None and again.snapshot.files == first.snapshot.files  # type: ignore[union-attr]
