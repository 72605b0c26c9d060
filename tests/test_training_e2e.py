"""A real LoRA job from a real kernel through the runner: the adapter comes back verified and loads with PEFT."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from trainorch_jupyter.model import JobState
from trainorch_jupyter.store import Store

from .helpers import orchestrator
from .nbrun import errors_of, run_cells, text_of

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "notebooks" / "data" / "train.jsonl"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # real training: minutes on a loaded machine


def test_train_magic_runs_a_real_lora_job_and_the_adapter_loads(tmp_path: Path) -> None:
    cells = [
        "%load_ext trainorch_jupyter",
        f"job = %train submit --provider local --name e2e --model tiny --data {DATA} --steps 40 --batch-size 16 "
        "--lr 3e-3 --log-every 5 --wait\nprint('STATE', job.status.value)",
        "files = await job.download()\nprint('FILES', sorted(f.name for f in files))",
    ]
    out = run_cells(cells, tmp_path, timeout=600)
    for cell in out:
        assert not errors_of(cell), text_of(cell)
    assert "STATE COMPLETED" in text_of(out[1])
    (job,) = Store(tmp_path).list_jobs()
    assert job.spec.train is not None and job.spec.train.steps == 40
    art_dir = tmp_path / "artifacts" / job.id
    # Every downloaded file has the hash the runner computed where the trainer wrote it.
    manifest = json.loads((tmp_path / ".trainorch" / "machines" / job.id / "manifest.json").read_text())
    by_name = {f["path"]: f for f in manifest["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_summary.json"} <= set(by_name)
    for name, entry in by_name.items():
        assert hashlib.sha256((art_dir / name).read_bytes()).hexdigest() == entry["sha256"]
    # The data file went through the runner as a hash-checked input.
    uploaded = tmp_path / ".trainorch" / "machines" / job.id / "inputs" / "data.jsonl"
    assert uploaded.read_bytes() == DATA.read_bytes()
    # Metrics flowed into the store, steps in order.
    metrics = Store(tmp_path).metrics(job.id)
    steps = [m["step"] for m in metrics if m.get("kind", "train") == "train"]
    assert steps == sorted(steps) and steps[-1] == 40
    assert any(m.get("kind") == "summary" for m in metrics)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainorch_jupyter.trainer import load_adapter, load_tokenizer, resolve_model

    summary = json.loads((art_dir / "training_summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # The adapter names its base model by a name that loads anywhere, not the runner's cache path.
    assert json.loads((art_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    tok = load_tokenizer(str(art_dir))
    ids = tok("upper: red cat\n", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).eval()
    tuned = load_adapter(art_dir).eval()
    assert isinstance(tuned, PeftModel)
    with torch.no_grad():
        diff = (tuned(ids).logits - base(ids).logits).abs().max().item()
    assert diff > 1e-3  # the adapter changes the model


def test_cancelled_training_keeps_the_partial_adapter(tmp_path: Path) -> None:
    with orchestrator(tmp_path) as orch:
        job = orch.submit({"name": "partial", "train": {"model": "tiny", "data": str(DATA), "steps": 5000,
                                                        "batch_size": 8, "log_every": 1}})
        deadline = time.monotonic() + 240
        while not any(m.get("step", 0) >= 3 for m in job.metrics() if m.get("kind", "train") == "train"):
            assert time.monotonic() < deadline and not job.status.is_terminal, job.logs(tail=20)
            time.sleep(0.2)
        job.cancel()
        final = job.wait(120)
        assert final.state is JobState.CANCELLED
        names = {a.name for a in final.artifacts}
        assert {"adapter_model.safetensors", "training_summary.json"} <= names
        summary = json.loads((tmp_path / "artifacts" / job.id / "training_summary.json").read_text())
        assert summary["partial"] is True and 3 <= summary["steps"] < 5000
        assert "stopped by SIGTERM" in job.logs()
