"""The trainer's training speed against a plain hand-written PEFT loop, same model, data, batch and seq len.

Both run in this one process, on the offline tiny model and the bundled demo data, and both are timed the same
way: the training steps only (forward, backward, optimizer step, making each batch's tensors), with the data
tokenised before the clock starts and no evaluation inside the clock:

- the trainer: ``trainorch_jupyter.trainer.cli.main([...])`` (its loop's tokens/s from ``training_summary.json``:
  non-padding tokens of the training steps over the loop's wall time; it tokenises and evaluates outside it);
- the plain loop: prompt+response tokenised once up front, then per step a sampled batch padded
  (``tokenizer.pad``), ``get_peft_model``, ``AdamW``, ``loss.backward()``, ``step()``.

One warm-up of each (discarded), then ``rounds`` alternated pairs (``benchmarks/stats.py``); the ratio
``trainer/plain`` (tokens/s; 1.0 = no overhead) is formed per pair and reported as median with min-max.
``python -m benchmarks.bench_trainer`` prints the figures.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks.stats import ROUNDS, alternated, ratios, spread
except ImportError:  # python benchmarks/bench_trainer.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.stats import ROUNDS, alternated, ratios, spread

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "notebooks" / "data" / "train.jsonl"


def _plain_loop(model_path: Path, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    # Tokenised before the clock starts, as the trainer does (its encode_records runs before its loop).
    encoded = [tok(r["prompt"] + r["response"] + tok.eos_token, truncation=True, max_length=seq_len)["input_ids"]
               for r in rows]
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))  # fmt: skip
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = tok.pad({"input_ids": rng.sample(encoded, batch_size)}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens, "final_loss": float(loss.detach())}


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


def run(*, steps: int = 40, batch_size: int = 16, seq_len: int = 64, lr: float = 5e-3, seed: int = 0,
        rounds: int = ROUNDS) -> dict[str, Any]:
    """A warm-up of each, then ``rounds`` alternated pairs; ``ratio`` = trainer / plain tokens/s per pair."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRAINORCH_CACHE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
            tmpdir = Path(tmp)
            os.environ.setdefault("TRAINORCH_CACHE", str(tmpdir / "cache"))
            import torch

            from trainorch_jupyter.trainer.tiny import build_tiny_model
            from trainorch_jupyter.trainer.train import cpu_threads

            torch.set_num_threads(cpu_threads())  # what the trainer sets, for the plain loop too
            model_path = build_tiny_model()
            kw = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed}
            runs: dict[str, list[dict[str, float]]] = {"trainer": [], "plain": []}
            count = itertools.count()

            def trainer() -> float:
                r = _trainer(tmpdir / f"out{next(count)}", **kw)
                runs["trainer"].append(r)
                return r["tokens_per_s"]

            def plain() -> float:
                r = _plain_loop(model_path, **kw)
                runs["plain"].append(r)
                return r["tokens_per_s"]

            tps = alternated({"trainer": trainer, "plain": plain}, rounds)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "trainer_tokens_per_s": spread(tps["trainer"], 1),
        "plain_tokens_per_s": spread(tps["plain"], 1),
        "ratio": spread(ratios(tps["trainer"], tps["plain"])),
        "trainer_runs": runs["trainer"][1:],  # the warm-up's dropped
        "plain_runs": runs["plain"][1:],
    }


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=2))
    r = result["ratio"]
    print(
        f"trainer {result['trainer_tokens_per_s']['median']:.0f} tok/s vs plain PEFT loop"
        f" {result['plain_tokens_per_s']['median']:.0f} tok/s: ratio {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f},"
        f" {r['n']} alternated pairs; 1.0 = no overhead)",
        file=sys.stderr,
    )
