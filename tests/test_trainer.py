"""The trainer as a real subprocess on the offline tiny model: learning, metrics, saved adapters, bad data, SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Real training runs (and a module fixture that trains): minutes, not seconds, on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]
TRAIN_DATA = REPO / "notebooks" / "data" / "train.jsonl"
PREFIX = "TRAINORCH_METRIC "


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private $TRAINORCH_CACHE for this module, the tiny model built in it once."""
    path = tmp_path_factory.mktemp("trainorch-cache")
    old = os.environ.get("TRAINORCH_CACHE")
    os.environ["TRAINORCH_CACHE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("TRAINORCH_CACHE", None)
        else:
            os.environ["TRAINORCH_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_path(cache_dir: Path) -> Path:
    from trainorch_jupyter.trainer.tiny import build_tiny_model

    return build_tiny_model()


def trainer_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRAINORCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1"})
    env.pop("TRAINORCH_OUTPUT_DIR", None)
    return env


def run_trainer(args: list[str], cache: Path, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainorch_jupyter.trainer", *args],
        env=trainer_env(cache), cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def metrics_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(PREFIX) :]) for line in stdout.splitlines() if line.startswith(PREFIX)]


def eval_loss_of(model: Any, out: Path, summary: dict[str, Any]) -> float:
    """The eval loss of ``model`` on the run's eval split, computed with the trainer's own pieces."""
    import torch
    from transformers import AutoTokenizer

    from trainorch_jupyter.trainer.data import encode_records, load_records, split_records
    from trainorch_jupyter.trainer.train import evaluate

    cfg = summary["config"]
    tok = AutoTokenizer.from_pretrained(summary["model_path"])
    records, fmt = load_records(cfg["data"])
    _, ev = split_records(records, cfg["eval_fraction"], cfg["seed"])
    examples = encode_records(tok, ev, fmt, cfg["seq_len"])
    return evaluate(model, examples, batch_size=max(cfg["batch_size"], 8), pad_id=tok.pad_token_id, device=torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# One real training run, shared by several tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_trainer(
        ["--model", "tiny", "--data", str(TRAIN_DATA), "--output-dir", str(out), "--steps", "60", "--batch-size", "16",
         "--lr", "5e-3", "--log-every", "10", "--seed", "0", "--device", "cpu"],
        cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_training_lowers_eval_loss_and_writes_the_adapter(trained: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = trained
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_summary.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "training_summary.json").read_text())
    assert s["partial"] is False and s["steps"] == s["total_steps"] == 60
    assert s["eval_loss_after"] < s["eval_loss_before"] - 1.0, s  # a margin, not an epsilon
    assert s["train_loss_end"] < s["train_loss_start"] - 1.0, s
    assert 0 < s["trainable_params"] < s["total_params"]
    assert s["tokens"] > 0 and s["runtime_s"] > 0 and s["data_format"] == "prompt_response"
    assert s["config"]["lr"] == 5e-3 and s["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert "params" in proc.stdout and "device: cpu" in proc.stdout and "1350 train / 150 eval" in proc.stdout


def test_metrics_lines(trained: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = trained
    metrics = metrics_of(proc.stdout)
    assert all(isinstance(m, dict) for m in metrics)
    assert metrics[0]["kind"] == "eval" and metrics[0]["step"] == 0
    assert metrics[-2]["kind"] == "eval" and metrics[-2]["step"] == 60
    assert metrics[-1]["kind"] == "summary" and metrics[-1]["partial"] is False
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [10, 20, 30, 40, 50, 60]
    assert {m["total_steps"] for m in metrics} == {60}
    for m in train:
        assert set(m) >= {"step", "total_steps", "epoch", "loss", "lr", "tokens_per_s", "elapsed_s", "eta_s"}
        assert m["tokens_per_s"] > 0 and m["loss"] > 0 and m["eta_s"] >= 0
    assert train[-1]["eta_s"] == 0
    assert [m["epoch"] for m in train] == sorted(m["epoch"] for m in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["lr"] < train[0]["lr"]  # cosine


def test_saved_adapter_loads_and_reproduces_the_eval_loss(trained: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = trained
    s = json.loads((out / "training_summary.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(s["model_path"])
    assert eval_loss_of(base, out, s) == pytest.approx(s["eval_loss_before"], abs=1e-4)
    model = PeftModel.from_pretrained(base, str(out))
    assert eval_loss_of(model, out, s) == pytest.approx(s["eval_loss_after"], abs=1e-4)


LOAD_ELSEWHERE = """
import json, sys
import torch
from trainorch_jupyter.trainer import load_adapter, load_tokenizer
from trainorch_jupyter.trainer.data import encode_records, load_records, split_records
from trainorch_jupyter.trainer.train import evaluate

cfg, adapter = json.loads(sys.argv[1]), sys.argv[2]
model = load_adapter(adapter)  # the product's loader: the base model the adapter records, built here
tok = load_tokenizer(adapter)
records, fmt = load_records(cfg["data"])
_, ev = split_records(records, cfg["eval_fraction"], cfg["seed"])
examples = encode_records(tok, ev, fmt, cfg["seq_len"])
loss = evaluate(model, examples, batch_size=max(cfg["batch_size"], 8), pad_id=tok.pad_token_id, device=torch.device("cpu"))
print(json.dumps({"eval_loss": loss, "base_path": model.get_base_model().name_or_path}))
"""


def test_adapter_records_a_base_model_that_loads_on_another_machine(
    trained: tuple[subprocess.CompletedProcess[str], Path], cache_dir: Path, tmp_path: Path
) -> None:
    """Issue 7 item 2: adapter_config.json and the adapter card named the base model by the training machine's
    cache path (``.../tiny-<hash>``), which exists nowhere else."""
    import shutil

    _, out = trained
    s = json.loads((out / "training_summary.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny" and s["base_model"] == "tiny"
    card = (out / "README.md").read_text()
    assert "\nbase_model: tiny\n" in card, card[:400]
    for name in ("adapter_config.json", "README.md"):
        assert str(cache_dir) not in (out / name).read_text(), name
    # Another machine: only the adapter's files, a fresh cache, the training machine's cache out of reach.
    adapter = tmp_path / "elsewhere" / "adapter"
    adapter.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        shutil.copy(out / name, adapter / name)
    other_cache = tmp_path / "other-cache"
    hidden = cache_dir.with_name(cache_dir.name + "-hidden")
    cache_dir.rename(hidden)
    try:
        proc = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, json.dumps(s["config"]), str(adapter)],
                              env=trainer_env(other_cache), cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                              timeout=240)
    finally:
        hidden.rename(cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["base_path"]).parent == other_cache  # built on "this" machine
    assert got["eval_loss"] == pytest.approx(s["eval_loss_after"], abs=1e-4)  # the same base, the same adapter


def test_recorded_base_model_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainorch_jupyter.trainer.models import recorded_name

    assert recorded_name("tiny") == ("tiny", None)
    assert recorded_name("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)  # a hub id stays as given
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert recorded_name("my-model") == (str(tmp_path / "my-model"), None)  # a local folder: its absolute path
    snap = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    assert recorded_name(str(snap)) == ("Qwen/Qwen2.5-0.5B", "a" * 40)  # hub cache: the hub id and revision


def test_an_adapter_on_a_missing_local_folder_says_so(tmp_path: Path) -> None:
    from trainorch_jupyter.trainer.models import load_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "/nowhere/my-model", "r": 8}))
    with pytest.raises(FileNotFoundError, match=r"local model folder /nowhere/my-model.*base_model="):
        load_adapter(tmp_path)


# --------------------------------------------------------------------------------------------
# Bad data: named error, exit 2, before any model (or torch) is loaded
# --------------------------------------------------------------------------------------------

BAD = {
    "missing.jsonl": ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "line 2: missing field 'response'"),
    "empty.jsonl": ("", "line 1: empty file"),
    "malformed.jsonl": ('{"text": "a"}\n{"text": "b",\n', "line 2: malformed JSON"),
    "unknown.jsonl": ('{"q": "a", "a": "b"}\n', "line 1: unknown format"),
    "mixed.jsonl": ('{"text": "a"}\n{"messages": []}\n', "line 2: mixed formats"),
    "nocols.csv": ("question,answer\na,b\n", "line 1: CSV header has no 'prompt'/'response' or 'text' columns"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_data_fails_fast_with_exit_2(tmp_path: Path, name: str) -> None:
    content, needle = BAD[name]
    data = tmp_path / name
    data.write_text(content)
    cache = tmp_path / "cache"
    code = (
        "import sys\n"
        "from trainorch_jupyter.trainer.cli import main\n"
        f"rc = main(['--model', 'tiny', '--data', {name!r}, '--output-dir', 'out'])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=trainer_env(cache), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == f"DataError: {tmp_path / name}: {needle}" or lines[0].startswith(f"DataError: {tmp_path / name}: {needle}")
    assert proc.stdout == ""
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_bad_data_via_module_entry_point(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n')
    proc = run_trainer(["--model", "tiny", "--data", "d.jsonl", "--output-dir", str(tmp_path / "o")], tmp_path / "c", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"DataError: {tmp_path / 'd.jsonl'}: line 1: missing field 'response'"


# --------------------------------------------------------------------------------------------
# SIGTERM, other formats and options, a local from_pretrained path
# --------------------------------------------------------------------------------------------


def test_sigterm_saves_a_partial_adapter(cache_dir: Path, tiny_path: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainorch_jupyter.trainer", "--model", str(tiny_path), "--data", str(TRAIN_DATA),
         "--output-dir", str(out), "--steps", "100000", "--log-every", "1", "--batch-size", "4", "--device", "cpu"],
        env=trainer_env(cache_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(PREFIX) and json.loads(line[len(PREFIX) :]).get("step", 0) >= 3 and '"train"' in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(lines) + rest
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in stdout and "partial adapter saved" in stdout
    s = json.loads((out / "training_summary.json").read_text())
    assert s["partial"] is True and 3 <= s["steps"] < 100000 and s["stopped_by"] == "SIGTERM"
    assert s["eval_loss_after"] is None and s["model_path"] == str(tiny_path)
    assert metrics_of(stdout)[-1] == {**metrics_of(stdout)[-1], "kind": "summary", "partial": True}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(out))
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_text_csv_epochs_accumulation_and_options(cache_dir: Path, tiny_path: Path, tmp_path: Path) -> None:
    rows = ["text"] + [f'"upper: red cat {i}\nRED CAT {i}"' for i in range(30)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = run_trainer(
        ["--model", str(tiny_path), "--data", "d.csv", "--output-dir", str(out), "--epochs", "1", "--batch-size", "4",
         "--grad-accum", "2", "--lr-schedule", "linear", "--warmup-steps", "1", "--target-modules", "q_proj,v_proj",
         "--eval-fraction", "0.2", "--log-every", "1", "--lora-r", "4", "--gradient-checkpointing"],
        cache_dir, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "training_summary.json").read_text())
    assert s["data_format"] == "text" and s["train_examples"] == 24 and s["eval_examples"] == 6
    assert s["total_steps"] == s["steps"] == 3  # ceil(ceil(24 / 4) / 2)
    train = [m for m in metrics_of(proc.stdout) if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3] and train[-1]["epoch"] == 1.0
    assert train[0]["lr"] == pytest.approx(2e-4) and train[2]["lr"] < train[1]["lr"]  # 1 warmup step, then linear decay
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 4


def test_chat_messages_train(cache_dir: Path, tiny_path: Path, tmp_path: Path) -> None:
    msgs = [
        {"messages": [{"role": "user", "content": f"upper: {w}"}, {"role": "assistant", "content": w.upper()}]}
        for w in ("red", "cat", "dog", "sun", "moon", "tree", "fish", "bird")
    ]
    (tmp_path / "chat.json").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    proc = run_trainer(
        ["--model", str(tiny_path), "--data", str(tmp_path / "chat.json"), "--output-dir", str(tmp_path / "o"),
         "--steps", "2", "--batch-size", "2", "--lora-dropout", "0"],
        cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "o" / "training_summary.json").read_text())
    assert s["data_format"] == "messages" and s["steps"] == 2 and s["eval_loss_after"] is not None


# --------------------------------------------------------------------------------------------
# Pieces in process
# --------------------------------------------------------------------------------------------


def test_tiny_build_is_deterministic_cached_and_loadable(tiny_path: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainorch_jupyter.trainer.tiny import build_tiny_model

    def digest(p: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir()) if f.is_file()}

    assert tiny_path.name.startswith("tiny-") and tiny_path.parent == Path(os.environ["TRAINORCH_CACHE"])
    stamps = {f.name: f.stat().st_mtime_ns for f in tiny_path.iterdir()}
    assert build_tiny_model() == tiny_path
    assert {f.name: f.stat().st_mtime_ns for f in tiny_path.iterdir()} == stamps, "a built model is reused, not rebuilt"
    other = build_tiny_model(tmp_path / "again")
    assert digest(other) == digest(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(other)
    tok = AutoTokenizer.from_pretrained(other)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers <= 4
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tok.eos_token and tok.bos_token and tok.pad_token and tok.chat_template
    assert tok("upper: red cat\n")["input_ids"][0] == tok.bos_token_id


def test_default_target_modules() -> None:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from trainorch_jupyter.trainer.train import default_target_modules

    small = {"vocab_size": 64}
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **small))
    assert default_target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, **small))
    assert default_target_modules(gpt2) == ["c_attn", "c_proj"]
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **small))
    assert default_target_modules(neox) == ["query_key_value"]

    class Odd(torch.nn.Module):
        def __init__(self, names: list[str]) -> None:
            super().__init__()
            for n in names:
                self.add_module(n, torch.nn.Linear(4, 4))

    assert default_target_modules(Odd(["query", "value", "fc1", "lm_head"])) == ["query", "value"]
    assert default_target_modules(Odd(["fc1", "fc2", "lm_head"])) == ["fc1", "fc2"]


def test_lr_schedules() -> None:
    from trainorch_jupyter.trainer.train import lr_lambda

    assert [lr_lambda("constant", 2, 10)(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    lin = lr_lambda("linear", 0, 10)
    assert [round(lin(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    cos = lr_lambda("cosine", 0, 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)


@pytest.mark.slow
def test_demo_job_learns_the_heldout_task(cache_dir: Path, tmp_path: Path) -> None:
    """The notebook's demo settings: eval loss falls from ~7 to ~0.5 and greedy answers on held-out prompts
    go from noise to mostly exact (about 20-40 s on 2 CPU cores)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    proc = run_trainer(
        ["--model", "tiny", "--data", str(TRAIN_DATA), "--output-dir", str(out), "--steps", "300", "--batch-size", "32",
         "--lr", "3e-3", "--log-every", "50"],
        cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "training_summary.json").read_text())
    assert s["eval_loss_before"] > 6 and s["eval_loss_after"] < 1.5, s

    tok = AutoTokenizer.from_pretrained(s["model_path"])
    rows = [json.loads(line) for line in (REPO / "notebooks/data/heldout.jsonl").read_text().splitlines()]

    def exact(model: Any) -> int:
        hits = 0
        with torch.no_grad():
            for r in rows:
                enc = tok(r["prompt"], return_tensors="pt")
                ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
                hits += tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() == r["response"]
        return hits

    base = AutoModelForCausalLM.from_pretrained(s["model_path"]).eval()
    assert exact(base) == 0
    assert exact(PeftModel.from_pretrained(base, str(out)).eval()) >= len(rows) // 2
