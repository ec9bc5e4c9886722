"""Supervised fine-tuning on conversations: the loss counts only the assistant's tokens.

Data: `.jsonl` rows with `messages` (OpenAI / Hugging Face chat format: `system`, `user`,
`assistant`, `tool` roles) or with `prompt` and `completion` (strings, or message lists as TRL
writes conversational prompt-completion data); `.parquet` files with the same columns. Each
conversation is rendered with the model directory's own chat template; the assistant tokens are
the template's `{% generation %}` blocks, or else what each assistant turn adds to the rendered
conversation (`Tokenizer.assistant_spans`).

Rows: with `task.packing` conversations are packed whole into rows of `data.seq_len + 1` tokens,
each its own document (no attention across conversations, positions restart), the rest padded;
otherwise one conversation per row, padded. A conversation longer than a row is cut to its first
tokens (`task.overlong = "truncate"`) or left out (`"drop"`); both are counted in the log line,
and so is a truncated conversation left with no assistant token (dropped).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallm.errors import UserError
from parallm.models.attention import AttentionSpec
from parallm.train.data import RowDataset, iter_jsonl, read_parquet
from parallm.train.tasks import IGNORE_INDEX, Batch, Task, next_token_loss_sum, register_task

ROLES = ("system", "user", "assistant", "tool")
# Channels of a row: token ids, 1 where the token is the assistant's, document id, position.
IDS, ASSISTANT, DOC, POS = range(4)


def read_rows(path: Path, task: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a `.jsonl` or `.parquet` file (`where` names the line or
    row for errors); `task` names who reads it, for the error about any other file type."""
    if path.suffix == ".parquet":
        yield from ((f"{path}: row {i}", r) for i, r in enumerate(read_parquet(path).to_pylist()))
    elif path.suffix == ".jsonl":
        yield from iter_jsonl(path)
    else:
        raise UserError(f"{path}: {task} reads .jsonl or .parquet rows, not {path.suffix!r}")


def read_conversations(path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(where, messages) for each conversation of a `.jsonl` or `.parquet` file."""
    for where, row in read_rows(path, "sft"):
        yield where, to_messages(row, where)


def to_messages(row: Any, where: str) -> list[dict[str, Any]]:
    """A row's conversation as a message list; a UserError naming the row when it is not one."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a conversation is a JSON object with 'messages' or 'prompt'")
    if row.get("messages") is not None:
        messages = row["messages"]
    elif row.get("prompt") is not None and row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        messages = list(prompt) + list(completion)
    else:
        raise UserError(f"{where}: no 'messages', nor 'prompt' and 'completion'")
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def check_messages(messages: Any, where: str, field: str = "messages") -> None:
    """A UserError naming the row unless `messages` is a list of objects with a valid role."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"{where}: {field} must be a list of objects with 'role' and 'content'")
    for m in messages:
        if m.get("role") not in ROLES:
            raise UserError(
                f"{where}: role {m.get('role')!r} is not valid; valid: {', '.join(ROLES)}"
            )


@contextmanager
def template_errors(where: str):
    """Chat template failures on a row as one UserError naming the row."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except Exception as e:  # a template that fails on this conversation (jinja errors)
        raise UserError(f"{where}: chat template failed ({type(e).__name__}: {e})") from None


def tokenize_conversation(tokenizer, messages, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a 0/1 assistant mask (a token is the assistant's when any of its
    characters is in an assistant span, as `transformers`' assistant mask)."""
    with template_errors(where):
        text, spans = tokenizer.assistant_spans(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.array([o[0] for o in offsets], dtype=np.int64)
    ends = np.array([o[1] for o in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.int64)
    for lo, hi in spans:
        mask |= (ends > lo) & (starts < hi)
    return np.asarray(ids, dtype=np.int64), mask


def pad_id(tokenizer) -> int:
    """The id that fills a row after its documents: pad, else EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def pack_rows(
    units: list[list[tuple[np.ndarray, np.ndarray]]], width: int, pad_id: int, *, packing: bool
) -> np.ndarray:
    """(N, 4, width) rows of documents (ids, 0/1 mask). A unit (a conversation; a preference
    pair's two sequences) is never split across rows: units in order, as many per row as fit
    (packing) or one per row. Each document has its own id and positions from 0; padding is a
    document of its own with a zero mask."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = width  # start a new row first
    for unit in units:
        size = sum(len(ids) for ids, _ in unit)
        if not packing or used + size > width:
            rows.append([])
            used = 0
        rows[-1].extend(unit)
        used += size
    out = np.zeros((len(rows), 4, width), dtype=np.int64)
    out[:, IDS] = pad_id
    for r, row in enumerate(rows):
        at = 0
        for doc, (ids, mask) in enumerate(row):
            n = len(ids)
            out[r, :, at : at + n] = (ids, mask, np.full(n, doc), np.arange(n))
            at += n
        out[r, DOC, at:] = len(row)  # padding: a document of its own
        out[r, POS, at:] = np.arange(width - at)
    return out


def row_labels(ids: torch.Tensor, mask: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Next-token labels (B, T) of rows' channels (B, T + 1): a label counts when the token
    predicted is marked (an assistant's, a completion's), in the same document."""
    counted = (mask[:, 1:] == 1) & (docs[:, 1:] == docs[:, :-1])
    return ids[:, 1:].masked_fill(~counted, IGNORE_INDEX)


@register_task
class SFT(Task):
    name = "sft"

    def dataset(self, files: list[Path], data_cfg, *, seed: int) -> RowDataset:
        tok = self.tokenizer
        if tok is None:
            raise UserError("task.name: 'sft' needs a tokenizer with a chat template")
        tok.apply_chat_template([{"role": "user", "content": "x"}])  # no template: one error
        width = data_cfg.seq_len + 1
        convs, truncated, dropped, n = [], 0, 0, 0
        for path in files:
            for where, messages in read_conversations(path):
                n += 1
                ids, mask = tokenize_conversation(tok, messages, where)
                if len(ids) > width:
                    if self.cfg.overlong == "drop":
                        dropped += 1
                        continue
                    ids, mask, truncated = ids[:width], mask[:width], truncated + 1
                if not mask[1:].any():  # nothing left to learn (the assistant was cut off)
                    dropped += 1
                    continue
                convs.append((ids, mask))
        if not convs:
            raise UserError(
                f"data.paths: no conversation with an assistant token fits in data.seq_len + 1 "
                f"= {width} tokens ({n} read, {dropped} dropped)"
            )
        rows = pack_rows([[c] for c in convs], width, pad_id(tok), packing=self.cfg.packing)
        self.data_summary = (
            f"sft: {n} conversations -> {len(rows)} rows of {width} tokens "
            f"({'packed' if self.cfg.packing else 'padded'}); {truncated} truncated, {dropped} "
            f"dropped (task.overlong={self.cfg.overlong!r}); "
            f"{int(sum(m[1:].sum() for _, m in convs)):,} assistant tokens"
        )
        return RowDataset(rows, seed=seed, shuffle=data_cfg.shuffle)

    def batch(self, rows: torch.Tensor) -> Batch:
        ids, assistant, docs, pos = rows.unbind(1)  # each (B, T + 1)
        labels = row_labels(ids, assistant, docs)
        attention = AttentionSpec.of_kind("document")
        return Batch(ids[:, :-1], labels, pos[:, :-1], docs[:, :-1], attention)

    labelled_logits_only = True  # most positions are prompts or padding
    random_tokens = False  # conversations, not token streams
    attention_kind = "document"  # each packed conversation attends to itself

    def loss_sum(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return next_token_loss_sum(logits, batch)
