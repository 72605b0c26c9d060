"""The trainer's training speed against a plain hand-written PEFT loop, same model, data, batch and seq len.

Both run in this one process, alternately, on the offline tiny model and the bundled demo data:

- the trainer: ``trainorch_jupyter.trainer.cli.main([...])`` (its loop's tokens/s from ``training_summary.json``:
  non-padding tokens of the training steps over the loop's wall time, evaluation excluded);
- the plain loop: tokenise prompt+response, pad, ``get_peft_model``, ``AdamW``, ``loss.backward()``, ``step()``.

``python -m benchmarks.bench_trainer`` prints the figures and ``trainer/plain`` (1.0 = no overhead).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "notebooks" / "data" / "train.jsonl"


def _plain_loop(model_path: Path, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    texts = [r["prompt"] + r["response"] + tok.eos_token for r in rows]
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))  # fmt: skip
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        enc = tok(rng.sample(texts, batch_size), return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(enc["attention_mask"].sum())
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens, "final_loss": float(loss)}


def _trainer(out: Path, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int) -> dict[str, float]:
    from trainorch_jupyter.trainer.cli import main

    args = ["--model", "tiny", "--data", str(DATA), "--output-dir", str(out), "--steps", str(steps),
            "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--lr", str(lr), "--seed", str(seed),
            "--log-every", str(steps), "--device", "cpu"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    if rc != 0:
        raise RuntimeError(f"trainer exited with {rc}")
    s = json.loads((out / "training_summary.json").read_text())
    return {"tokens_per_s": s["tokens_per_s"], "seconds": s["train_runtime_s"], "tokens": s["tokens"], "final_loss": s["train_loss_end"]}


def run(*, steps: int = 40, batch_size: int = 16, seq_len: int = 64, lr: float = 5e-3, seed: int = 0, repeats: int = 2) -> dict[str, Any]:
    """Best of ``repeats`` alternating runs of each; returns the figures and ``ratio`` = trainer / plain."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRAINORCH_CACHE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmpdir = Path(tmp)
        os.environ.setdefault("TRAINORCH_CACHE", str(tmpdir / "cache"))
        import torch

        from trainorch_jupyter.trainer.tiny import build_tiny_model
        from trainorch_jupyter.trainer.train import cpu_threads

        torch.set_num_threads(cpu_threads())  # what the trainer sets, for the plain loop too
        model_path = build_tiny_model()
        kw = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed}
        _plain_loop(model_path, **{**kw, "steps": 5})  # warm-up: allocator, kernels, imports
        plain: list[dict[str, float]] = []
        trainer: list[dict[str, float]] = []
        for i in range(repeats):
            trainer.append(_trainer(tmpdir / f"out{i}", **kw))
            plain.append(_plain_loop(model_path, **kw))
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    best_t = max(trainer, key=lambda r: r["tokens_per_s"])
    best_p = max(plain, key=lambda r: r["tokens_per_s"])
    return {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "threads": torch.get_num_threads(),
        "trainer_tokens_per_s": round(best_t["tokens_per_s"], 1),
        "plain_tokens_per_s": round(best_p["tokens_per_s"], 1),
        "ratio": round(best_t["tokens_per_s"] / best_p["tokens_per_s"], 3),
        "trainer_runs": trainer,
        "plain_runs": plain,
    }


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=2))
    print(
        f"trainer {result['trainer_tokens_per_s']:.0f} tok/s vs plain PEFT loop {result['plain_tokens_per_s']:.0f} tok/s:"
        f" ratio {result['ratio']:.3f} (1.0 = no overhead)",
        file=sys.stderr,
    )
