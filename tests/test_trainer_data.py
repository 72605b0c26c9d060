"""Unit tests of the trainer's data side and command line: reading, checking, formatting, label masking."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainorch_jupyter.model import METRIC_PREFIX, TrainerConfig
from trainorch_jupyter.trainer import cli
from trainorch_jupyter.trainer.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    collate,
    combine,
    encode_record,
    load_records,
    split_records,
)
from trainorch_jupyter.trainer.make_data import make_dataset

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[object]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------
# Contract with the rest of the package
# --------------------------------------------------------------------------------------------


def test_metric_prefix_matches_the_package() -> None:
    assert cli.METRIC_PREFIX == METRIC_PREFIX


def test_parser_defaults_equal_trainer_config_defaults() -> None:
    args = cli.build_parser().parse_args(["--model", "m", "--data", "d.jsonl", "--output-dir", "o"])
    for f in dataclasses.fields(TrainerConfig):
        if f.name in ("model", "data"):
            continue
        assert getattr(args, f.name) == f.default, f.name


def test_cli_args_of_every_field_parse(tmp_path: Path) -> None:
    cfg = TrainerConfig(
        model="tiny", data="x.jsonl", steps=7, lr=1e-3, lr_schedule="linear", warmup_steps=2, batch_size=3, grad_accum=2,
        seq_len=64, lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("q_proj", "v_proj"), eval_fraction=0.2,
        seed=5, log_every=2, gradient_checkpointing=True, device="cpu",
    )  # fmt: skip
    args = cli.parse_args(cfg.cli_args(str(tmp_path / "data.jsonl"), str(tmp_path / "out")))
    assert args.steps == 7 and args.epochs is None and args.lr == 1e-3 and args.lr_schedule == "linear"
    assert args.target_modules == ["q_proj", "v_proj"] and args.gradient_checkpointing and args.device == "cpu"
    assert args.output_dir == tmp_path / "out" and args.data == tmp_path / "data.jsonl"
    args = cli.parse_args(TrainerConfig(model="tiny", data="x.csv", epochs=1.5).cli_args("rel/data.csv", str(tmp_path)))
    assert args.epochs == 1.5 and args.steps is None


def test_output_dir_from_env_and_relative_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINORCH_OUTPUT_DIR", str(tmp_path / "envout"))
    monkeypatch.chdir(tmp_path)
    args = cli.parse_args(["--model", "tiny", "--data", "d.jsonl"])
    assert args.output_dir == tmp_path / "envout"
    assert args.data == tmp_path / "d.jsonl"
    monkeypatch.delenv("TRAINORCH_OUTPUT_DIR")
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--model", "tiny", "--data", "d.jsonl"])
    assert e.value.code == 2


def test_steps_and_epochs_exclusive() -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "m", "--data", "d", "--output-dir", "o", "--steps", "3", "--epochs", "1"])


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------


def test_bundled_data_loads_and_matches_its_generator() -> None:
    records, fmt = load_records(REPO / "notebooks/data/train.jsonl")
    assert fmt == "prompt_response" and 1000 <= len(records) <= 2000
    held, fmt2 = load_records(REPO / "notebooks/data/heldout.jsonl")
    assert fmt2 == "prompt_response"
    train, heldout = make_dataset(0)
    assert [r.fields for r in records] == train and [r.fields for r in held] == heldout
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (REPO / "notebooks/data" / name).stat().st_size < 200_000


def test_formats_detected(tmp_path: Path) -> None:
    assert load_records(jsonl(tmp_path / "a.jsonl", [{"text": "hi"}, {"text": "yo"}]))[1] == "text"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert load_records(jsonl(tmp_path / "b.json", [{"messages": msgs}]))[1] == "messages"
    recs, fmt = load_records(write(tmp_path / "c.csv", 'prompt,response\n"a, b",c\nd,"e\nf"\ng,h\n'))
    assert fmt == "prompt_response" and [r.line for r in recs] == [2, 3, 5]
    assert recs[1].fields == {"prompt": "d", "response": "e\nf"}
    # blank lines are skipped, line numbers stay those of the file
    recs, _ = load_records(write(tmp_path / "d.jsonl", '\n{"text": "a"}\n\n{"text": "b"}\n'))
    assert [r.line for r in recs] == [2, 4]


BAD_CASES: list[tuple[str, str, int, str]] = [
    ("missing.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', 2, "missing field 'response'"),
    ("empty.jsonl", "", 1, "empty file"),
    ("blank.jsonl", "\n\n", 1, "empty file"),
    ("malformed.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",\n', 3, "malformed JSON"),
    ("unknown.jsonl", '{"question": "a", "answer": "b"}\n', 1, "unknown format"),
    ("mixed.jsonl", '{"prompt": "a", "response": "b"}\n{"text": "c"}\n', 2, "mixed formats"),
    ("nocols.csv", "question,answer\na,b\n", 1, "'prompt'/'response' or 'text' columns"),
    ("halfcols.csv", "prompt,answer\na,b\n", 1, "missing column 'response'"),
    ("types.jsonl", '{"prompt": "a", "response": 3}\n', 1, "field 'response' must be a string"),
    ("notobj.jsonl", '["a", "b"]\n', 1, "expected a JSON object"),
    ("emptytext.jsonl", '{"text": "ok"}\n{"text": "  "}\n', 2, "field 'text' is empty"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', 1, "last message must be the assistant"),
    ("role.jsonl", '{"messages": [{"role": "bot", "content": "a"}]}\n', 1, "messages[0].role"),
]


@pytest.mark.parametrize(("name", "content", "line", "needle"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_data_names_line_and_field(tmp_path: Path, name: str, content: str, line: int, needle: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.line == line
    assert needle in e.value.message
    assert str(e.value).startswith(f"{path}: line {line}: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")


@given(n=st.integers(0, 300), frac=st.sampled_from([0.0, 0.05, 0.1, 0.5]), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_split_is_a_seeded_partition(n: int, frac: float, seed: int) -> None:
    recs = [Record(i + 1, {"text": str(i)}) for i in range(n)]
    train, ev = split_records(recs, frac, seed)
    assert sorted(r.line for r in train + ev) == list(range(1, n + 1))
    if frac == 0 or n < 2:
        assert ev == []
    else:
        assert 1 <= len(ev) <= n - 1 and abs(len(ev) - n * frac) <= 1
    assert split_records(recs, frac, seed) == (train, ev)


# --------------------------------------------------------------------------------------------
# Formatting and label masking
# --------------------------------------------------------------------------------------------

ids_st = st.lists(st.integers(3, 999), max_size=40)


@given(prompt=ids_st, response=ids_st, seq_len=st.integers(8, 64), eos=st.sampled_from([2, None]))
@settings(max_examples=300, deadline=None)
def test_combine_masks_exactly_the_prompt(prompt: list[int], response: list[int], seq_len: int, eos: int | None) -> None:
    ex = combine(prompt, response, eos, seq_len)
    full_resp = response + ([eos] if eos is not None else [])
    assert len(ex.input_ids) == len(ex.labels) <= seq_len
    n_prompt = sum(1 for x in ex.labels if x == IGNORE_INDEX)
    # The masked part is a suffix of the prompt, the trained part a prefix of response + EOS.
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    kept_prompt, kept_resp = ex.input_ids[:n_prompt], ex.input_ids[n_prompt:]
    assert kept_prompt == (prompt[len(prompt) - n_prompt :] if n_prompt else [])
    assert kept_resp == full_resp[: len(kept_resp)]
    # Response tokens are never masked, and trained labels equal the inputs.
    assert ex.labels[n_prompt:] == kept_resp
    if full_resp:
        assert kept_resp, "some response token is always kept"
    if len(prompt) + len(full_resp) <= seq_len:
        assert ex.input_ids == prompt + full_resp


def test_collate_pads_right_and_masks_padding() -> None:
    a = combine([5, 6], [7], 2, 16)
    b = combine([5], [7, 8, 9], 2, 16)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0], [5, 7, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2, -100], [-100, 7, 8, 9, 2]]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from trainorch_jupyter.trainer.tiny import _train_tokenizer, corpus_texts

    tok = _train_tokenizer(corpus_texts(None, 0))
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_encode_prompt_response(tiny_tokenizer: Any) -> None:
    tok = tiny_tokenizer
    ex = encode_record(tok, {"prompt": "upper: red cat\n", "response": "RED CAT"}, "prompt_response", 64)
    n_prompt = ex.labels.count(IGNORE_INDEX)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[:n_prompt], skip_special_tokens=True) == "upper: red cat\n"
    assert tok.decode(ex.labels[n_prompt:], skip_special_tokens=True) == "RED CAT"


def test_encode_text_trains_everything(tiny_tokenizer: Any) -> None:
    ex = encode_record(tiny_tokenizer, {"text": "red cat runs " * 20}, "text", 16)
    assert len(ex.input_ids) == 16 and ex.labels == ex.input_ids


def test_encode_chat_masks_all_but_the_last_answer(tiny_tokenizer: Any) -> None:
    tok = tiny_tokenizer
    msgs = [
        {"role": "system", "content": "be loud"},
        {"role": "user", "content": "upper: red"},
        {"role": "assistant", "content": "RED"},
        {"role": "user", "content": "upper: cat"},
        {"role": "assistant", "content": "CAT"},
    ]
    ex = encode_record(tok, {"messages": msgs}, "messages", 256)
    n_prompt = ex.labels.count(IGNORE_INDEX)
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(ex.labels[n_prompt:], skip_special_tokens=True) == "CAT"
    prompt = tok.decode(ex.input_ids[:n_prompt], skip_special_tokens=True)
    assert prompt.endswith("<|assistant|>\n") and "be loud" in prompt and "RED" in prompt


def test_chat_fallback_template_without_tokenizer_template(tiny_tokenizer: Any) -> None:
    tok = tiny_tokenizer
    saved = tok.chat_template
    tok.chat_template = None
    try:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        ex = encode_record(tok, {"messages": msgs}, "messages", 64)
        n_prompt = ex.labels.count(IGNORE_INDEX)
        assert tok.decode(ex.input_ids[:n_prompt], skip_special_tokens=True) == "<|user|>\nhi\n<|assistant|>\n"
        assert tok.decode(ex.labels[n_prompt:], skip_special_tokens=True) == "yo"
    finally:
        tok.chat_template = saved


@given(prompt=st.text(max_size=60), response=st.text(min_size=1, max_size=60), seq_len=st.integers(8, 48))
@settings(max_examples=80, deadline=None)
def test_real_tokenizer_never_masks_response_tokens(tiny_tokenizer: Any, prompt: str, response: str, seq_len: int) -> None:
    tok = tiny_tokenizer
    ex = encode_record(tok, {"prompt": prompt, "response": response}, "prompt_response", seq_len)
    resp_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = ex.labels.count(IGNORE_INDEX)
    assert ex.labels[n_prompt:] == resp_ids[: len(ex.labels) - n_prompt]
    assert len(ex.labels) - n_prompt >= 1 and len(ex.input_ids) <= seq_len
