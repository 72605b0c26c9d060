"""Generate the bundled demo data set (``notebooks/data/``): a string transformation a tiny model can learn.

The task: the prompt is ``"upper: <2-4 lowercase words>\\n"`` and the response is the same words in capitals,
e.g. ``{"prompt": "upper: red cat runs\\n", "response": "RED CAT RUNS"}``. The words come from a small fixed
list, so the offline tiny model's byte-level BPE learns each word (lowercase and capitals) as one token and a
few dozen LoRA steps on a CPU visibly learn the format and most of the mapping.

Deterministic for a given seed::

    python -m trainorch_jupyter.trainer.make_data --out notebooks/data --seed 0

writes ``train.jsonl`` (1,500 examples) and ``heldout.jsonl`` (40 examples whose word sequences never occur in
``train.jsonl``). No third-party imports: the trainer's tiny model uses :func:`corpus` to train its tokenizer
without reading any file.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

WORDS: tuple[str, ...] = (
    "red", "blue", "green", "cat", "dog", "fish", "bird", "tree", "sun", "moon",
    "star", "rain", "snow", "wind", "fire", "stone", "river", "hill", "road", "house",
    "book", "pen", "cup", "milk", "bread", "apple", "lamp", "door", "box", "ship",
    "runs", "jumps", "sings", "sleeps", "eats", "big", "small", "old", "new", "happy",
)  # fmt: skip

TASK_PREFIX = "upper: "
N_TRAIN = 1500
N_HELDOUT = 40


def make_example(rng: random.Random) -> dict[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
    text = " ".join(words)
    return {"prompt": f"{TASK_PREFIX}{text}\n", "response": text.upper()}


def make_dataset(seed: int = 0, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out examples; no held-out prompt occurs in the train set."""
    rng = random.Random(seed)
    heldout: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(heldout) < n_heldout:
        ex = make_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            heldout.append(ex)
    train: list[dict[str, str]] = []
    while len(train) < n_train:
        ex = make_example(rng)
        if ex["prompt"] not in seen:
            train.append(ex)
    return train, heldout


def corpus(seed: int = 0) -> Iterator[str]:
    """The texts of the default train set (prompt + response), for training the tiny model's tokenizer."""
    train, _ = make_dataset(seed)
    for ex in train:
        yield ex["prompt"] + ex["response"]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("notebooks/data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, heldout = make_dataset(args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} examples to {args.out / 'train.jsonl'} and {len(heldout)} to {args.out / 'heldout.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
