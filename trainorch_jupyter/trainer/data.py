"""Training data: read and check a JSONL/CSV file, format records into token ids and masked labels.

Reading and checking (:func:`load_records`) needs nothing beyond the standard library, so bad data fails at
once, before torch or any model is loaded. Three record formats, detected from the first record and required
of every record:

- ``prompt`` / ``response``: loss on the response tokens (and the EOS) only;
- ``text``: loss on every token;
- ``messages``: a chat, a list of ``{"role", "content"}`` whose last message is the assistant's; loss on that
  last assistant message (and the EOS) only. The tokenizer's chat template renders it when it has one, else
  :data:`FALLBACK_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Format = Literal["prompt_response", "text", "messages"]
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMAT_FIELDS: dict[str, str] = {
    "prompt_response": "'prompt'/'response'",
    "text": "'text'",
    "messages": "'messages'",
}


class DataError(Exception):
    """The data file is unusable. ``str()`` is the one line the trainer prints: ``<file>: line N: <what>``."""

    def __init__(self, file: str | Path, line: int, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(f"{self.file}: line {line}: {message}")


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line of the file where the record starts
    fields: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------


def detect_format(fields: Mapping[str, Any]) -> Format | None:
    if "messages" in fields:
        return "messages"
    if "prompt" in fields or "response" in fields:
        return "prompt_response"
    if "text" in fields:
        return "text"
    return None


def _field_names(fields: Mapping[str, Any]) -> str:
    names = [f"'{k}'" for k in list(fields)[:6]]
    return ", ".join(names) if names else "none"


def _check_string(file: str, line: int, fields: Mapping[str, Any], name: str, *, allow_empty: bool) -> None:
    if name not in fields or fields[name] is None:
        raise DataError(file, line, f"missing field '{name}'")
    value = fields[name]
    if not isinstance(value, str):
        raise DataError(file, line, f"field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(file, line, f"field '{name}' is empty")


def check_record(file: str, rec: Record, fmt: Format) -> None:
    f = rec.fields
    got = detect_format(f)
    if got is not None and got != fmt:
        raise DataError(
            file, rec.line,
            f"mixed formats: the first record has {FORMAT_FIELDS[fmt]} fields, this one has {FORMAT_FIELDS[got]} (fields: {_field_names(f)})",
        )
    if fmt == "prompt_response":
        _check_string(file, rec.line, f, "prompt", allow_empty=True)
        _check_string(file, rec.line, f, "response", allow_empty=False)
    elif fmt == "text":
        _check_string(file, rec.line, f, "text", allow_empty=False)
    else:
        msgs = f.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(file, rec.line, "field 'messages' must be a non-empty list of {'role', 'content'} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(file, rec.line, f"field 'messages[{i}]' must be an object with 'role' and 'content'")
            role = m.get("role")
            if role not in ROLES:
                raise DataError(file, rec.line, f"field 'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(m.get("content"), str):
                raise DataError(file, rec.line, f"field 'messages[{i}].content' must be a string")
        if msgs[-1]["role"] != "assistant":
            raise DataError(file, rec.line, f"field 'messages': the last message must be the assistant's (the one trained on), got role {msgs[-1]['role']!r}")


def _read_jsonl(path: Path, shown: str) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                if lineno == 1 and raw.lstrip().startswith("["):
                    raise DataError(shown, lineno, "expected one JSON object per line (JSONL), got a JSON array") from None
                raise DataError(shown, lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(shown, lineno, f"expected a JSON object with fields such as 'prompt'/'response', 'text' or 'messages', got {type(obj).__name__}")
            records.append(Record(lineno, obj))
    return records


def _read_csv(path: Path, shown: str) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            return []
        cols = {c.strip() for c in header if c is not None}
        if not ({"prompt", "response"} <= cols or "text" in cols):
            missing = "response" if "prompt" in cols else "prompt" if "response" in cols else None
            what = f"missing column '{missing}'" if missing else "no 'prompt'/'response' or 'text' columns"
            raise DataError(shown, 1, f"CSV header has {what} (columns: {', '.join(repr(c) for c in header)})")
        start = reader.line_num + 1
        try:
            for row in reader:
                fields = {k.strip(): v for k, v in row.items() if k is not None}
                if None in row:
                    raise DataError(shown, start, f"more values than the {len(header)} columns of the header")
                records.append(Record(start, fields))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(shown, reader.line_num, f"malformed CSV: {e}") from None
    return records


def load_records(path: str | Path) -> tuple[list[Record], Format]:
    """Read every record of a JSONL (``.jsonl``/``.json``) or ``.csv`` file and check them all.

    Raises :class:`DataError` for the first problem: missing file, empty file, malformed JSON, a record of no
    known format, a record of another format than the first, a missing or mistyped field.
    """
    p = Path(path)
    shown = str(path)
    if not p.is_file():
        raise DataError(shown, 0, "file not found")
    try:
        records = _read_csv(p, shown) if p.suffix.lower() == ".csv" else _read_jsonl(p, shown)
    except UnicodeDecodeError as e:
        raise DataError(shown, 0, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise DataError(shown, 1, "empty file: no records (expected 'prompt'/'response', 'text' or 'messages' records)")
    first = records[0]
    fmt = detect_format(first.fields)
    if fmt is None:
        raise DataError(
            shown, first.line,
            f"unknown format: expected a 'prompt' and 'response' field, a 'text' field or a 'messages' field (fields: {_field_names(first.fields)})",
        )
    for rec in records:
        check_record(shown, rec, fmt)
    return records, fmt


def _record_texts(fields: Mapping[str, Any], fmt: Format) -> list[str]:
    if fmt == "prompt_response":
        return [fields.get("prompt") or "", fields.get("response") or ""]
    if fmt == "text":
        return [fields.get("text") or ""]
    return [m.get("content") or "" for m in fields.get("messages") or [] if isinstance(m, dict)]


def estimate_tokens(text: str) -> int:
    """A floor on the tokens of ``text`` without its tokenizer: one token per 8 bytes of UTF-8 (subword
    tokenizers average 3-5 bytes per token on prose and code). Used only to say an example is certainly long."""
    return -(-len(text.encode("utf-8")) // 8)


def check_for_training(file: str | Path, records: Sequence[Record], fmt: Format, *, seq_len: int,
                       eval_fraction: float, count_tokens: Any = None) -> None:
    """What makes a training run pointless although each record is valid, as a :class:`DataError`:

    - too few examples for the eval split: with ``eval_fraction`` > 0, at least 2 are needed (one to train on,
      one held out);
    - every example longer than ``seq_len`` tokens (each would be cut). ``count_tokens(text) -> int`` is the
      model's tokenizer (the trainer's count: specials of the prompt, the response, the EOS); without it a floor
      (:func:`estimate_tokens`) is used, so the error is only raised when it is certain.

    Stops at the first example that fits, so a good file costs one tokenization."""
    shown = str(file)
    if not records:
        raise DataError(shown, 1, "empty file: no records")
    if eval_fraction > 0 and len(records) < 2:
        raise DataError(shown, records[0].line, f"only {len(records)} example: too few for an eval split of "
                        f"{eval_fraction:g} (at least 2 are needed: one to train on, one held out); add examples "
                        "or set the eval fraction to 0")
    exact = count_tokens is not None
    shortest: tuple[int, Record] | None = None
    for rec in records:
        texts = _record_texts(rec.fields, fmt)
        if exact:
            n = sum(int(count_tokens(t)) for t in texts) + (1 if fmt != "messages" else 0)
        else:
            n = sum(estimate_tokens(t) for t in texts)
        if n <= seq_len:
            return
        if shortest is None or n < shortest[0]:
            shortest = (n, rec)
    assert shortest is not None
    n, rec = shortest
    about = f"{n} tokens" if exact else f"at least {n} tokens (estimated from its length)"
    raise DataError(shown, rec.line, f"every example is longer than the sequence length of {seq_len} tokens, so "
                    f"each would be cut (this one, the shortest, has {about}); raise the sequence length "
                    f"(--seq-len {max(n, seq_len * 2)}) or shorten the examples")


def split_records(records: Sequence[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded shuffle, then the first ``round(n * eval_fraction)`` (at least 1 when the fraction is > 0 and
    there are 2+ records) for eval and the rest for training. Eval is empty when the fraction is 0."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = len(records)
    n_eval = 0
    if eval_fraction > 0 and n >= 2:
        n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


# --------------------------------------------------------------------------------------------
# Formatting into token ids
# --------------------------------------------------------------------------------------------

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def combine(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int | None, seq_len: int) -> Example:
    """Prompt + response (+ EOS) truncated to ``seq_len``, labels masking the prompt.

    When the whole does not fit, the response keeps up to ``seq_len // 2`` tokens (or all of it if shorter),
    the prompt keeps its *last* tokens in the rest, and the response is cut at the end; so every example keeps
    at least one trained token as long as the response (or the EOS) is not empty.
    """
    resp = list(response_ids)
    if eos_id is not None and (not resp or resp[-1] != eos_id):
        resp.append(eos_id)
    prompt = list(prompt_ids)
    if len(prompt) + len(resp) > seq_len:
        budget = min(len(resp), max(1, seq_len // 2))
        keep_prompt = min(len(prompt), seq_len - budget)
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
        resp = resp[: seq_len - len(prompt)]
    return Example(prompt + resp, [IGNORE_INDEX] * len(prompt) + resp)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template))


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_record(tokenizer: Any, fields: Mapping[str, Any], fmt: Format, seq_len: int) -> Example:
    eos = tokenizer.eos_token_id
    if fmt == "prompt_response":
        return combine(_ids(tokenizer, fields["prompt"], special=True), _ids(tokenizer, fields["response"], special=False), eos, seq_len)
    if fmt == "text":
        ids = _ids(tokenizer, fields["text"], special=True)
        if eos is not None:
            ids.append(eos)
        ids = ids[:seq_len]
        return Example(ids, list(ids))
    msgs = [{"role": m["role"], "content": m["content"]} for m in fields["messages"]]
    prompt_text = render_chat(tokenizer, msgs[:-1], add_generation_prompt=True)
    full_text = render_chat(tokenizer, msgs, add_generation_prompt=False)
    # Templates may add special tokens themselves; do not add them twice.
    has_bos = tokenizer.bos_token is not None and full_text.startswith(tokenizer.bos_token)
    if full_text.startswith(prompt_text):
        answer = full_text[len(prompt_text) :].rstrip("\n")
        if tokenizer.eos_token and answer.endswith(tokenizer.eos_token):
            answer = answer[: -len(tokenizer.eos_token)]
        return combine(_ids(tokenizer, prompt_text, special=not has_bos), _ids(tokenizer, answer, special=False), eos, seq_len)
    # A template whose rendering of the full chat does not extend the prompt's: train on the whole chat.
    ids = _ids(tokenizer, full_text, special=not has_bos)[:seq_len]
    return Example(ids, list(ids))


def encode_records(tokenizer: Any, records: Sequence[Record], fmt: Format, seq_len: int) -> list[Example]:
    return [encode_record(tokenizer, r.fields, fmt, seq_len) for r in records]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` tensors (labels -100 on padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
