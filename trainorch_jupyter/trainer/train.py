"""The training run: load the model, wrap it with LoRA, a hand-written AdamW loop, metrics, SIGTERM, saving."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from .cli import METRIC_PREFIX
from .data import Example, Format, Record, collate, encode_records, split_records
from .models import TINY, recorded_name, resolve_model

# LoRA targets per ``config.model_type``.
ARCH_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "granite", "smollm3",
    )},
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "phi3": ["qkv_proj", "o_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}  # fmt: skip
ATTENTION_NAME = re.compile(
    r"^(q|k|v|o|qkv|out|query|key|value|query_key_value|c_attn|wqkv|w_pack|attn_out|q_lin|k_lin|v_lin|out_lin)(_proj)?$",
    re.IGNORECASE,
)
MAX_EVAL_EXAMPLES = 2000


def log(message: str) -> None:
    print(f"[trainer] {message}", flush=True)


def emit(kind: str, **values: Any) -> None:
    print(METRIC_PREFIX + json.dumps({"kind": kind, **values}, separators=(", ", ": ")), flush=True)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop stops at the next step. A second signal kills at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> dict[int, Any]:
        """Install the handlers; returns the previous ones for :meth:`restore`."""
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._handle)
        return previous

    @staticmethod
    def restore(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)
        print(f"[trainer] {self.signal_name} received: stopping at the next step", flush=True)


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("--device mps: MPS is not available")
    return torch.device(name)


def cpu_threads() -> int:
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """LoRA targets for the architecture; else every Linear named like an attention projection; else every
    Linear but the output head."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if model_type in ARCH_TARGETS:
        return list(ARCH_TARGETS[model_type])
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        pass
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear_types)]
    attention = sorted({n for n in names if ATTENTION_NAME.match(n)})
    if attention:
        return attention
    others = sorted({n for n in names if n not in ("lm_head", "embed_out", "output")})
    if not others:
        raise RuntimeError("found no Linear layers to put LoRA on; give --target-modules")
    return others


def lr_lambda(schedule: str, warmup: int, total: int) -> Any:
    def factor(step: int) -> float:  # step = optimizer steps done so far; the factor for the next one
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def micro_batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless seeded shuffled passes over ``examples`` (a fresh order each epoch); the last batch of a pass
    may be smaller."""
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]
        epoch += 1


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    stop: StopFlag | None = None,
) -> float:
    """Token-weighted mean loss over ``examples`` (model in eval mode, no dropout); NaN when empty."""
    was_training = model.training
    model.eval()
    amp = autocast_dtype(device)
    total, n_tokens = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            if stop:
                break
            batch = _to(collate(examples[i : i + batch_size], pad_id), device)
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(**batch).loss
            total += float(loss) * n
            n_tokens += n
    finally:
        model.train(was_training)
    return total / n_tokens if n_tokens else float("nan")


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        out[key] = str(value) if isinstance(value, Path) else value
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, records: list[Record], fmt: Format) -> int:
    """Run the whole job; 0 when the adapter was saved (also after SIGTERM), 1 when the model could not load."""
    stop = StopFlag()
    previous = stop.install()
    try:
        return _train(args, records, fmt, stop)
    finally:
        StopFlag.restore(previous)


def _train(args: argparse.Namespace, records: list[Record], fmt: Format, stop: StopFlag) -> int:
    t0 = time.time()

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft
    transformers.utils.logging.disable_progress_bar()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        device = pick_device(args.device)
    except RuntimeError as e:
        print(f"DeviceError: {e}", file=sys.stderr, flush=True)
        return 1
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    amp = autocast_dtype(device)

    model_path = resolve_model(args.model)
    if args.model == TINY:
        log(f"tiny model built offline at {model_path}")
    # What the adapter (its config and its card) records as its base model: a name that loads anywhere
    # (``tiny``, a hub id), never this machine's cache path (see .models).
    base_name, base_revision = recorded_name(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        print(f"ModelError: cannot load the tokenizer of {args.model!r}: {e}", file=sys.stderr, flush=True)
        return 1
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            print(f"ModelError: the tokenizer of {args.model!r} has neither a pad nor an eos token", file=sys.stderr, flush=True)
            return 1
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = int(tokenizer.pad_token_id)

    train_recs, eval_recs = split_records(records, args.eval_fraction, args.seed)
    train_ex = encode_records(tokenizer, train_recs, fmt, args.seq_len)
    eval_on = "eval split"
    if not eval_recs:
        eval_recs, eval_on = train_recs, "training split (no eval split)"
    eval_ex = encode_records(tokenizer, eval_recs[:MAX_EVAL_EXAMPLES], fmt, args.seq_len)
    n_train_tokens = sum(len(e.input_ids) for e in train_ex)
    log(
        f"data: {args.data} ({fmt}): {len(train_ex)} train / {len(eval_recs)} eval examples"
        f" (eval on the {eval_on}); {n_train_tokens} train tokens, mean {n_train_tokens / max(1, len(train_ex)):.1f} per example"
    )

    load_dtype = torch.bfloat16 if amp is torch.bfloat16 else torch.float32
    try:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=load_dtype)
    except (OSError, ValueError) as e:
        print(f"ModelError: cannot load {args.model!r}: {e}", file=sys.stderr, flush=True)
        return 1
    base.config.use_cache = False
    base.config.name_or_path = base_name  # read by peft for the adapter card's ``base_model``
    base.name_or_path = base_name  # read by get_peft_model for ``base_model_name_or_path``
    targets = list(args.target_modules) if args.target_modules else default_target_modules(base)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=getattr(base.config, "model_type", "") == "gpt2",
    )
    try:
        model = get_peft_model(base, lora, revision=base_revision)
    except ValueError as e:
        print(f"ModelError: LoRA target modules {','.join(targets)}: {e}", file=sys.stderr, flush=True)
        return 1
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {args.model} ({getattr(base.config, 'model_type', '?')}), {total_params:,} params,"
        f" {trainable:,} trainable ({100 * trainable / max(1, total_params):.2f}%); LoRA r={args.lora_r}"
        f" alpha={args.lora_alpha} on {','.join(targets)}"
    )
    log(
        f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", dtype {str(load_dtype).removeprefix('torch.')}" + (", bf16 autocast" if amp else "")
        + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
    )

    micro_per_epoch = math.ceil(len(train_ex) / args.batch_size)
    if args.steps is not None:
        total_steps = args.steps
    else:
        total_steps = max(1, math.ceil((args.epochs or 1.0) * micro_per_epoch / args.grad_accum))
    log(
        f"plan: {total_steps} steps x {args.batch_size} examples x {args.grad_accum} accumulation"
        f" = {total_steps * args.batch_size * args.grad_accum / max(1, len(train_ex)):.2f} epochs;"
        f" lr {args.lr:g} ({args.lr_schedule}, {args.warmup_steps} warmup)"
    )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_schedule, args.warmup_steps, total_steps))

    eval_bs = max(args.batch_size, 8)
    eval_before = evaluate(model, eval_ex, batch_size=eval_bs, pad_id=pad_id, device=device, stop=stop)
    if not stop:
        emit("eval", step=0, total_steps=total_steps, eval_loss=_finite(eval_before))

    model.train()
    batches = micro_batches(train_ex, args.batch_size, args.seed)
    t_train = time.time()
    step, micro_done, tokens_done = 0, 0, 0
    win_loss, win_n, win_tokens, t_win = 0.0, 0, 0, t_train
    last_loss: float | None = None
    first_loss: float | None = None
    while step < total_steps and not stop:
        chunk = [collate(next(batches), pad_id) for _ in range(args.grad_accum)]
        n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in chunk)
        step_loss = 0.0
        for b in chunk:
            if stop:
                break
            n = int((b["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            b = _to(b, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(**b).loss
            (loss * (n / n_labels)).backward()
            step_loss += float(loss.detach()) * n
            tokens = int(b["attention_mask"].sum())
            tokens_done += tokens
            win_tokens += tokens
            micro_done += 1
        if stop:
            optimizer.zero_grad(set_to_none=True)
            break
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if first_loss is None and n_labels:
            first_loss = step_loss / n_labels
        win_loss += step_loss
        win_n += n_labels
        if step % args.log_every == 0 or step == total_steps:
            now = time.time()
            elapsed = now - t_train
            last_loss = win_loss / win_n if win_n else float("nan")
            emit(
                "train",
                step=step,
                total_steps=total_steps,
                epoch=round(micro_done / micro_per_epoch, 4),
                loss=_finite(last_loss),
                lr=lr_now,
                tokens_per_s=round(win_tokens / max(now - t_win, 1e-9), 1),
                elapsed_s=round(elapsed, 3),
                eta_s=round(elapsed / step * (total_steps - step), 3),
            )
            win_loss, win_n, win_tokens, t_win = 0.0, 0, 0, now
    train_time = time.time() - t_train
    if win_n:  # steps after the last log line (only when stopped early)
        last_loss = win_loss / win_n
    partial = bool(stop) and step < total_steps

    args.output_dir.mkdir(parents=True, exist_ok=True)
    # The vocabulary is never resized here, so the full embeddings are saved only where LoRA targets them (peft's
    # "auto" says so then). Left at "auto" otherwise, peft would look the recorded base name up on the hub to
    # compare vocabulary sizes: a network call at save time, for ``tiny`` a name that is on no hub.
    embeddings_targeted = any(t in ("embed_tokens", "lm_head") for t in targets)
    model.save_pretrained(str(args.output_dir), safe_serialization=True,
                          save_embedding_layers="auto" if embeddings_targeted else False)

    eval_after: float | None = None
    if not partial:
        eval_after = evaluate(model, eval_ex, batch_size=eval_bs, pad_id=pad_id, device=device)
        emit("eval", step=step, total_steps=total_steps, eval_loss=_finite(eval_after))

    summary: dict[str, Any] = {
        "model": args.model,
        "model_path": model_path,
        "base_model": base_name,
        "data_format": fmt,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "eval_on": "eval" if eval_on == "eval split" else "train",
        "train_loss_start": _finite(first_loss),
        "train_loss_end": _finite(last_loss),
        "eval_loss_before": _finite(eval_before),
        "eval_loss_after": _finite(eval_after),
        "runtime_s": round(time.time() - t0, 3),
        "train_runtime_s": round(train_time, 3),
        "tokens": tokens_done,
        "tokens_per_s": round(tokens_done / max(train_time, 1e-9), 1),
        "trainable_params": trainable,
        "total_params": total_params,
        "steps": step,
        "total_steps": total_steps,
        "partial": partial,
        "stopped_by": stop.signal_name,
        "device": str(device),
        "dtype": str(load_dtype).removeprefix("torch."),
        "target_modules": targets,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "config": config_dict(args),
    }
    _write_json(args.output_dir / "training_summary.json", summary)
    emit(
        "summary",
        step=step,
        total_steps=total_steps,
        partial=partial,
        train_loss_start=summary["train_loss_start"],
        train_loss_end=summary["train_loss_end"],
        eval_loss_before=summary["eval_loss_before"],
        eval_loss_after=summary["eval_loss_after"],
        runtime_s=summary["runtime_s"],
        tokens=tokens_done,
        tokens_per_s=summary["tokens_per_s"],
        trainable_params=trainable,
    )
    if partial:
        log(f"stopped by {stop.signal_name} at step {step}; partial adapter saved to {args.output_dir}")
    else:
        log(
            f"done: {step} steps in {train_time:.1f}s, eval loss {eval_before:.4f} -> {eval_after:.4f};"
            f" adapter saved to {args.output_dir}"
        )
    return 0
