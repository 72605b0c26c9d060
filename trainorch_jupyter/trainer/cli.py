"""The trainer's command line (docs/PROTOCOL.md section 3). Checks the data before importing torch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# Same literal as trainorch_jupyter.model.METRIC_PREFIX (a test checks it); the trainer imports nothing of the
# package so it also runs where only this folder was shipped.
METRIC_PREFIX = "TRAINORCH_METRIC "
SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXIT_DATA_ERROR = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _fraction(hi_open: bool) -> argparse._ActionType:
    def parse(text: str) -> float:
        value = float(text)
        if not (0.0 <= value < 1.0 if hi_open else 0.0 <= value <= 0.5):
            raise argparse.ArgumentTypeError(f"must be in {'[0, 1)' if hi_open else '[0, 0.5]'}, got {value}")
        return value

    return parse


def _modules(text: str) -> list[str]:
    mods = [m.strip() for m in text.split(",") if m.strip()]
    if not mods:
        raise argparse.ArgumentTypeError("give module names such as q_proj,v_proj")
    return mods


def build_parser() -> argparse.ArgumentParser:
    """Defaults equal those of ``trainorch_jupyter.model.TrainerConfig`` (a test checks it)."""
    p = argparse.ArgumentParser(
        prog="python -m trainorch_jupyter.trainer",
        description="Fine-tune a LoRA adapter on a causal language model and save it with PEFT.",
    )
    p.add_argument("--model", required=True, help="from_pretrained name or local path, or 'tiny' for the offline tiny model")
    p.add_argument("--data", required=True, type=Path, help="JSONL (.jsonl/.json) or CSV file; relative paths resolve against the cwd")
    p.add_argument("--output-dir", type=Path, default=None, help="where the adapter goes (default: $TRAINORCH_OUTPUT_DIR)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps to run")
    length.add_argument("--epochs", type=_positive_float, default=None, help="passes over the training split (default 1)")
    p.add_argument("--lr", type=_positive_float, default=2e-4)
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--warmup-steps", type=_nonneg_int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--grad-accum", type=_positive_int, default=1)
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--lora-r", type=_positive_int, default=8)
    p.add_argument("--lora-alpha", type=_positive_int, default=16)
    p.add_argument("--lora-dropout", type=_fraction(hi_open=True), default=0.05)
    p.add_argument("--target-modules", type=_modules, default=None, help="comma-separated module names (default: per architecture)")
    p.add_argument("--eval-fraction", type=_fraction(hi_open=False), default=0.1)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--log-every", type=_positive_int, default=5)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", choices=DEVICES, default="auto")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output_dir is None:
        env = os.environ.get("TRAINORCH_OUTPUT_DIR")
        if not env:
            parser.error("--output-dir is required when $TRAINORCH_OUTPUT_DIR is not set")
        args.output_dir = Path(env)
    args.data = Path(args.data).expanduser()
    if not args.data.is_absolute():
        args.data = Path.cwd() / args.data
    args.output_dir = Path(args.output_dir).expanduser().resolve()
    if args.seq_len < 8:
        parser.error("--seq-len must be at least 8")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .data import DataError, load_records

    try:
        records, fmt = load_records(args.data)
    except DataError as e:
        print(f"DataError: {e}", file=sys.stderr, flush=True)
        return EXIT_DATA_ERROR

    from .train import train

    return train(args, records, fmt)
