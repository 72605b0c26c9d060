"""The offline tiny model: a small Llama-shaped causal LM and a byte-level BPE tokenizer, built from nothing.

Nothing is downloaded. The tokenizer is trained with the ``tokenizers`` library on text (by default the
bundled demo task's corpus, generated in memory by :mod:`.make_data`), the model is randomly initialised from a
``LlamaConfig`` with a fixed seed, and both are written with ``save_pretrained`` so the trainer loads them
through the same ``from_pretrained`` path as any other model. Built once per content hash into a cache dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

TINY_VERSION = 1  # bump when the recipe below changes; it is part of the cache key
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    # 1/sqrt(hidden) instead of Llama's 0.02: with tied embeddings and a frozen base, 0.02 caps the logits
    # near uniform and LoRA on the attention alone learns very slowly.
    "initializer_range": 0.0625,
}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# The same simple template the trainer falls back to for tokenizers that have none.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_cache_root() -> Path:
    env = os.environ.get("TRAINORCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trainorch"


def _texts_from_files(files: Sequence[Path]) -> Iterator[str]:
    """Every string value of every record of JSONL/CSV files (any format), for tokenizer training."""
    import csv

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for file in files:
        with Path(file).open(encoding="utf-8", newline="") as f:
            if Path(file).suffix.lower() == ".csv":
                for row in csv.DictReader(f):
                    yield "".join(v for v in row.values() if isinstance(v, str))
            else:
                for line in f:
                    if line.strip():
                        yield "".join(strings(json.loads(line)))


def corpus_texts(data_files: Sequence[Path] | None, seed: int) -> list[str]:
    if data_files:
        return list(_texts_from_files(data_files))
    from .make_data import corpus

    return list(corpus(seed))


def _cache_key(texts: Iterable[str], seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": TINY_VERSION, "config": TINY_CONFIG, "seed": seed, "tpl": CHAT_TEMPLATE}, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(TINY_CONFIG["vocab_size"]),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=int(TINY_CONFIG["max_position_embeddings"])
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(dest: Path | None = None, *, data_files: Sequence[Path] | None = None, seed: int = 0) -> Path:
    """Build (once) the tiny model + tokenizer and return the folder to pass to ``from_pretrained``.

    ``dest`` is the folder to write; by default ``$TRAINORCH_CACHE/tiny-<hash>`` (``~/.cache/trainorch``
    without the variable), where the hash covers the recipe, the tokenizer corpus and the seed. A folder that
    already holds a complete build is reused as is. ``data_files`` (JSONL/CSV) replace the built-in demo corpus
    for training the tokenizer. Deterministic: the same inputs give the same files.
    """
    texts = corpus_texts(data_files, seed)
    if dest is None:
        dest = default_cache_root() / f"tiny-{_cache_key(texts, seed)}"
    dest = Path(dest)
    if (dest / ".complete").is_file():
        return dest

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()

    tokenizer = _train_tokenizer(texts)
    cfg = dict(TINY_CONFIG)
    cfg["vocab_size"] = len(tokenizer)
    config = LlamaConfig(
        **cfg,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Fork the RNG so building never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete earlier build
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished the same build first.
            if not (dest / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":
    print(build_tiny_model())
