"""Checks before billing: the trainer's data (with the trainer's own checker), the model name's shape, the
workdir's size, a cloud job's price cap; each failure one line naming the user's file (and line), nothing stored,
created or billed. Also a command job with its workdir and packages on RunPod through the fake."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainorch_jupyter.checks import check_model, prepare
from trainorch_jupyter.fakes import RunPodFake
from trainorch_jupyter.fakes.base import OpenAPIValidator
from trainorch_jupyter.model import JobSpec, JobState, Resources, SpecError, TrainerConfig
from trainorch_jupyter.store import Store

from .helpers import orchestrator
from .nbrun import errors_of, run_cells, text_of

SPEC = Path(__file__).resolve().parent / "specs" / "runpod-rest-v2.openapi.json"
CANARY = "rpa_CANARY0checks0KEY0must0never0leak0d41d8cd9"
BIN = str(Path(sys.executable).parent)
GOOD = [{"prompt": f"upper: word{i}\n", "response": f"WORD{i}"} for i in range(8)]


def jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer(ws: Path, data: str, **kw: object) -> JobSpec:
    return JobSpec(name="t", train=TrainerConfig(model=str(kw.pop("model", "tiny")), data=data, **kw))  # type: ignore[arg-type]


def refused(spec: JobSpec, ws: Path, *, remote: bool = False) -> str:
    with pytest.raises(SpecError) as err:
        prepare(spec, workspace=ws, remote=remote)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# The trainer's data, read with the trainer's checker in this process
# --------------------------------------------------------------------------------------------


def test_bad_data_names_the_users_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c" "response": "d"}\n')
    msg = refused(trainer(tmp_path, "bad.jsonl"), tmp_path)
    assert msg.startswith("train.data: bad.jsonl: line 2: malformed JSON"), msg
    jsonl(tmp_path / "mixed.jsonl", [*GOOD[:3], {"text": "x"}])
    assert "mixed.jsonl: line 4: mixed formats" in refused(trainer(tmp_path, "mixed.jsonl"), tmp_path)
    jsonl(tmp_path / "field.jsonl", [*GOOD[:2], {"prompt": "p", "response": 3}])
    assert "field.jsonl: line 3: field 'response' must be a string" in refused(trainer(tmp_path, "field.jsonl"), tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "empty.jsonl: line 1: empty file" in refused(trainer(tmp_path, "empty.jsonl"), tmp_path)
    (tmp_path / "cols.csv").write_text("question,answer\nq,a\n")
    assert "cols.csv: line 1: CSV header has" in refused(trainer(tmp_path, "cols.csv"), tmp_path)
    assert "gone.jsonl: file not found" in refused(trainer(tmp_path, "gone.jsonl"), tmp_path)


def test_too_few_examples_for_the_eval_split(tmp_path: Path) -> None:
    jsonl(tmp_path / "one.jsonl", GOOD[:1])
    msg = refused(trainer(tmp_path, "one.jsonl"), tmp_path)
    assert "one.jsonl: line 1: only 1 example: too few for an eval split of 0.1" in msg
    prepare(trainer(tmp_path, "one.jsonl", eval_fraction=0.0), workspace=tmp_path, remote=False)  # no split: fine


def test_every_example_longer_than_the_sequence_length(tmp_path: Path) -> None:
    long = [{"text": "lorem ipsum dolor sit amet " * (20 + i)} for i in range(5)]
    jsonl(tmp_path / "long.jsonl", long)
    # No tokenizer on this machine for a hub id: a floor from the length says it is certain.
    msg = refused(trainer(tmp_path, "long.jsonl", model="org/some-model", seq_len=32), tmp_path)
    assert "long.jsonl: line 1: every example is longer than the sequence length of 32 tokens" in msg
    assert "estimated" in msg
    prepare(trainer(tmp_path, "long.jsonl", model="org/some-model", seq_len=2048), workspace=tmp_path, remote=False)
    # One example that fits is enough.
    jsonl(tmp_path / "some.jsonl", [*long, {"text": "short"}])
    prepare(trainer(tmp_path, "some.jsonl", model="org/some-model", seq_len=32), workspace=tmp_path, remote=False)


def test_the_models_own_tokenizer_counts_when_it_is_here(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    words = ["a", "b", "c", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model / "tokenizer.json"))
    # 12 words -> 12 tokens with this tokenizer (plus the EOS): over 8; the length floor alone would say 3.
    jsonl(tmp_path / "d.jsonl", [{"text": "a b c a b c a b c a b c"}] * 3)
    msg = refused(trainer(tmp_path, "d.jsonl", model="./my-model", seq_len=8), tmp_path)
    assert "has 13 tokens" in msg and "estimated" not in msg


def test_the_model_names_shape(tmp_path: Path) -> None:
    assert check_model("tiny", tmp_path) == ("tiny", None)
    assert check_model("Qwen/Qwen2.5-0.5B", tmp_path) == ("hub", None)
    assert check_model("gpt2", tmp_path) == ("hub", None)
    for name, words in (("./nope", "no such folder: ./nope"), ("/abs/where/model", "no such folder"),
                        ("bad id!", "neither a hub id"), ("a/b/c", "no such folder"), ("org/na me", "neither"),
                        ("org--x/y", "neither")):
        with pytest.raises(SpecError, match=r"train\.model") as err:
            check_model(name, tmp_path)
        assert words in str(err.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(SpecError, match=r"no config\.json"):
        check_model("folder", tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SpecError, match="is a file"):
        check_model("weights.bin", tmp_path)


def test_a_local_model_folder_reaches_the_machine_only_inside_the_workdir(tmp_path: Path) -> None:
    jsonl(tmp_path / "d.jsonl", GOOD)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    spec = trainer(tmp_path, "d.jsonl", model="models/m")
    assert "on this computer, not on the machine" in refused(spec, tmp_path, remote=True)
    sent = prepare(JobSpec(**{**spec.__dict__, "workdir": str(tmp_path)}), workspace=tmp_path, remote=True)
    assert sent.spec.train is not None and sent.spec.train.model == "./models/m"  # relative to the workdir
    here = prepare(spec, workspace=tmp_path, remote=False)
    assert here.spec.train is not None and here.spec.train.model == str(tmp_path / "models" / "m")


def test_an_oversized_workdir_names_its_largest_files(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "weights.safetensors").write_bytes(b"\0" * 300_000)
    spec = JobSpec(name="x", command=("python", "train.py"), workdir=str(tmp_path), workdir_max_mb=0.2)
    msg = refused(spec, tmp_path)
    assert msg.startswith("workdir: the workdir") and "weights.safetensors (300.0 KB)" in msg
    assert not (tmp_path / ".trainorch" / "snapshots").exists()  # nothing stored
    with open(tmp_path / "weights.safetensors", "wb") as fh:  # sparse: 600 MB to the checks, nothing on disk
        fh.truncate(600_000_000)
    msg = refused(JobSpec(name="x", provider="runpod", command=("true",), workdir=str(tmp_path),
                          resources=Resources(disk_gb=1), workdir_max_mb=1000), tmp_path, remote=True)
    assert msg.startswith("resources.disk_gb: the workdir (600.0 MB) does not fit")


# --------------------------------------------------------------------------------------------
# The same, from the notebook, with a local job and a RunPod job: nothing created
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> OpenAPIValidator:
    return OpenAPIValidator.cached(SPEC)


@pytest.fixture
def runpod(validator: OpenAPIValidator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[RunPodFake]:
    fake = RunPodFake(api_keys={CANARY}, provision_s=0.2, start_s=0.2, ports_delay_s=0.2, restart_delay_s=0.2,
                      kill_grace_s=1.0, rate_limits=[], validator=validator, work_dir=tmp_path / "pods",
                      extra_env={"PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PIP_NO_INDEX": "1"}).start()
    monkeypatch.setenv("RUNPOD_API_KEY", CANARY)
    monkeypatch.setenv("TRAINORCH_RUNPOD_URL", fake.base_url)
    try:
        yield fake
        assert fake.ledger.spec_mismatches("request") == []
    finally:
        fake.stop()


def one_usage_error(cell: dict[str, object]) -> str:
    """What IPython shows for a UsageError: one line on stderr, no traceback."""
    shown = text_of(cell)
    assert not errors_of(cell) and shown.startswith("UsageError: "), shown
    assert len(shown.strip().splitlines()) == 1 and "Traceback" not in shown, shown
    return shown.removeprefix("UsageError: ").strip()


def creates(fake: RunPodFake) -> list[dict[str, object]]:
    return [r for r in fake.ledger.requests() if r["method"] == "POST" and str(r["path"]).rstrip("/") == "/v1/pods"]


def test_refused_in_the_notebook_one_line_each_and_no_job_no_pod(runpod: RunPodFake, tmp_path: Path) -> None:
    ws = tmp_path / "nb"
    ws.mkdir()
    (ws / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c" "response": "d"}\n')
    (ws / "train.py").write_text("print('hi')\n")
    (ws / "big.bin").write_bytes(b"\0" * 1_500_000)
    attempts = []
    for provider in ("local", "runpod"):
        p = "" if provider == "local" else "--provider runpod --gpu 'RTX 4090' "
        attempts += [f"%train submit {p}--model tiny --data bad.jsonl --steps 2",
                     f"%train submit {p}--model tiny --data missing.jsonl --steps 2",
                     f"%train submit {p}-- python train.py"]
    cells = ["%load_ext trainorch_jupyter", *attempts,
             "%env TRAINORCH_WORKDIR_MAX_MB=5\n%train submit --dry-run -- python train.py",
             "from trainorch_jupyter import get_orchestrator\nprint('JOBS', len(get_orchestrator().jobs()))"]
    out = run_cells(cells, ws, allow_errors=True, timeout=120,
                    env={"RUNPOD_API_KEY": CANARY, "TRAINORCH_RUNPOD_URL": runpod.base_url,
                         "TRAINORCH_WORKDIR_MAX_MB": "1"})
    errors = [one_usage_error(cell) for cell in out[1:7]]
    for i in (0, 3):
        assert errors[i].startswith("train.data: bad.jsonl: line 2: malformed JSON"), errors[i]
        assert "missing.jsonl" in errors[i + 1] and "not found" in errors[i + 1]
        assert "big.bin (1.5 MB)" in errors[i + 2] and "over the cap of 1.0 MB" in errors[i + 2]
    assert ".trainorch/" not in " ".join(errors)
    dry = text_of(out[7])
    assert "dry run: nothing was created, stored or sent" in dry, dry
    assert "workdir    .: 3 files" in dry and "largest  big.bin (1.5 MB)" in dry and "command    python train.py" in dry
    assert "JOBS 0" in text_of(out[8])
    assert Store(ws).list_jobs() == []
    assert creates(runpod) == [] and runpod.state()["machines_billing"] == 0
    assert not (ws / ".trainorch" / "snapshots").exists() or not list((ws / ".trainorch" / "snapshots").iterdir())


def test_a_price_cap_below_the_offer_fails_before_the_create_naming_both(runpod: RunPodFake, tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        final = orch.submit({"name": "cheap", "provider": "runpod", "command": ["true"],
                             "resources": {"gpu": "RTX 4090", "max_price_per_hour": 0.05}}).wait(60)
    assert final.state is JobState.FAILED
    error = final.error or ""
    assert "$0.05/h" in error and "RTX 4090" in error and "above the max price" in error and "nothing was created" in error
    assert creates(runpod) == []


TRAIN_PY = """\
import csv, os, helper, pathspec
rows = list(csv.DictReader(open("table.csv")))
out = os.path.join(os.environ["TRAINORCH_OUTPUT_DIR"], "total.txt")
open(out, "w").write(str(helper.total(rows)))
print("TOTAL", helper.total(rows), "IGNORED", os.path.exists("secret.env"), flush=True)
"""


def test_a_command_with_its_workdir_and_packages_on_runpod(runpod: RunPodFake, tmp_path: Path) -> None:
    ws = tmp_path / "nb"
    ws.mkdir()
    (ws / "train.py").write_text(TRAIN_PY)
    (ws / "helper.py").write_text("def total(rows):\n    return sum(int(r['n']) for r in rows)\n")
    (ws / "table.csv").write_text("n\n40\n2\n")
    (ws / ".gitignore").write_text("*.env\n")
    (ws / "secret.env").write_text("TOKEN=never-sent\n")
    (ws / "requirements.txt").write_text("pathspec\n")  # already installed where the fake's pods run: no network
    spec = JobSpec(name="rp-wd", provider="runpod", command=("python3", "train.py"), workdir=str(ws),
                   resources=Resources(gpu="RTX 4090"))
    ready = prepare(spec, workspace=ws, remote=True)
    with orchestrator(ws) as orch:
        job = orch.submit(ready.spec)
        final = job.wait(240)
        log = job.logs()
        assert final.state is JobState.COMPLETED, (final.error, log)
    assert "TOTAL 42 IGNORED False" in log
    assert "[trainorch] pip install -r requirements.txt" in log and "Requirement already satisfied: pathspec" in log
    total = next(a for a in final.artifacts if a.name == "total.txt")
    assert total.path.read_text() == "42" and hashlib.sha256(b"42").hexdigest() == total.hash_sha256
    assert final.snapshot and final.snapshot["sha256"] == ready.spec.snapshot
    assert final.packages and "pathspec" in final.packages["packages"]
    assert final.packages["requested"] == ["-r requirements.txt"]
    assert runpod.state()["machines_billing"] == 0
