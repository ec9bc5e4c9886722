"""Preference optimisation on pairs: DPO (`task.loss = "sigmoid"`), IPO and SimPO, as TRL computes
them (`DPOTrainer`; SimPO as `CPOTrainer(loss_type="simpo", cpo_alpha=0)`).

Data: `.jsonl` / `.parquet` rows with `prompt`, `chosen`, `rejected`: strings (the completions get
EOS appended unless they end with it), or message lists (TRL's conversational format: the prompt's
messages, then the chosen / rejected assistant messages) rendered with the model directory's chat
template. Tokenised as TRL does: prompt+chosen and prompt+rejected whole, the completion being
what follows their common prefix with the prompt alone (with the generation prompt).

Rows: a pair is two documents in one row, prompt+chosen then prompt+rejected, each with its own
attention and positions from 0, so micro-batches and data-parallel ranks never split a pair; with
`task.packing` several pairs share a row. A pair longer than a row (`data.seq_len + 1` tokens) is
left out (`task.overlong = "drop"`) or has each sequence cut to its first half-row of tokens
(`"truncate"`, TRL's `keep_start` at max_length = half a row), and is dropped if that leaves a
completion empty or the two sequences alike; both are counted in the log line.

The counted unit is a pair. The log-probabilities of the reference model (per sequence, summed
over completion tokens) are computed by the step before the policy forward and travel in
`Batch.extras`; SimPO needs none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from parallm.errors import UserError
from parallm.models.attention import AttentionSpec
from parallm.train.data import RowDataset
from parallm.train.tasks import IGNORE_INDEX, Batch, Task, refuse_degrees, register_task
from parallm.train.tasks.sft import (
    check_messages,
    pack_rows,
    pad_id,
    read_rows,
    row_labels,
    template_errors,
)

FIELDS = ("prompt", "chosen", "rejected")
Tokens = tuple[np.ndarray, np.ndarray]  # token ids; 1 where the token is the completion's


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def render_chat(
    tokenizer, messages: list, where: str, *, generation_prompt: bool = False
) -> list[int]:
    with template_errors(where):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_pair(tokenizer, row: Any, where: str) -> tuple[Tokens, Tokens]:
    """prompt+chosen and prompt+rejected as (ids, completion mask), tokenised as TRL's
    `DPOTrainer` does; a UserError naming the row for a pair it cannot learn from."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a preference pair is an object with {', '.join(FIELDS)}")
    for name in FIELDS:
        if row.get(name) is None:
            raise UserError(f"{where}: no {name!r} (a pair has {', '.join(map(repr, FIELDS))})")
    prompt, chosen, rejected = (row[name] for name in FIELDS)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        eos = tokenizer.special_token("eos_token") or ""
        prompt_ids = tokenizer.encode(prompt)
        full = [
            tokenizer.encode(prompt + (c if c.endswith(eos) else c + eos))
            for c in (chosen, rejected)
        ]
    elif all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        for name in FIELDS:
            check_messages(row[name], where, name)
        prompt_ids = render_chat(tokenizer, prompt, where, generation_prompt=True)
        full = [render_chat(tokenizer, prompt + c, where) for c in (chosen, rejected)]
    else:
        raise UserError(
            f"{where}: 'prompt', 'chosen' and 'rejected' must be all strings or all message lists"
        )
    if full[0] == full[1]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ")
    # The completion starts where the prompt alone and the whole sequence part (a template may
    # render the prompt differently alone, or tokens merge across the boundary).
    start = min(_common_prefix(prompt_ids, ids) for ids in full)
    if start == 0:
        raise UserError(f"{where}: 'prompt' has no tokens before the completions")
    out = []
    for name, ids in zip(("chosen", "rejected"), full, strict=True):
        if len(ids) == start:
            raise UserError(f"{where}: {name!r} has no tokens after the prompt")
        mask = np.zeros(len(ids), dtype=np.int64)
        mask[start:] = 1
        out.append((np.asarray(ids, dtype=np.int64), mask))
    return out[0], out[1]


def _fit(pair: tuple[Tokens, Tokens], width: int, overlong: str) -> tuple | None:
    """The pair as it goes into a row of `width` tokens, or None when it is left out."""
    if sum(len(ids) for ids, _ in pair) <= width:
        return pair
    if overlong == "drop":
        return None
    (c, c_mask), (r, r_mask) = ((ids[: width // 2], mask[: width // 2]) for ids, mask in pair)
    if not (c_mask.any() and r_mask.any()) or np.array_equal(c, r):
        return None  # a completion cut away, or nothing left to tell the two apart
    return (c, c_mask), (r, r_mask)


def sequence_sums(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, S) per-sequence sums of (B, T) per-token `values` over counted labels: column 2k is
    a row's k-th pair's chosen sequence, 2k + 1 its rejected one (S even, >= T + 1 documents)."""
    b, t = values.shape
    slots = t + 1 + (t + 1) % 2
    out = values.new_zeros(b, slots)
    return out.scatter_add(1, batch.document_ids, values * batch.loss_mask)


@register_task
class DPO(Task):
    name = "dpo"
    random_tokens = False
    attention_kind = "document"  # a pair's two sequences are two documents

    def needs_reference(self) -> bool:
        return self.cfg.loss != "simpo"

    def check_layout(self, dims) -> None:
        # A pair's loss is not a sum over its tokens, so its sequences must sit whole on one
        # rank (no context parallelism); the reference forward runs outside any schedule.
        refuse_degrees(
            "dpo",
            dims,
            {
                "pp": "the reference forward would need its own pipeline schedule",
                "cp": "a pair's loss needs its whole sequences on one rank",
            },
        )

    def dataset(self, files: list[Path], data_cfg, *, seed: int) -> RowDataset:
        tok = self.tokenizer
        if tok is None:
            raise UserError("task.name: 'dpo' needs a tokenizer (tokenizer.path or model.path)")
        width = data_cfg.seq_len + 1
        pairs, truncated, dropped, n = [], 0, 0, 0
        for path in files:
            for where, row in read_rows(path, "dpo"):
                n += 1
                pair = tokenize_pair(tok, row, where)
                fitted = _fit(pair, width, self.cfg.overlong)
                if fitted is None:
                    dropped += 1
                    continue
                truncated += fitted is not pair
                pairs.append(list(fitted))
        if not pairs:
            raise UserError(
                f"data.paths: no preference pair fits in data.seq_len + 1 = {width} tokens "
                f"({n} read, {dropped} dropped)"
            )
        rows = pack_rows(pairs, width, pad_id(tok), packing=self.cfg.packing)
        self.data_summary = (
            f"dpo: {n} pairs -> {len(rows)} rows of {width} tokens "
            f"({'packed' if self.cfg.packing else 'one pair a row'}); {truncated} truncated, "
            f"{dropped} dropped (task.overlong={self.cfg.overlong!r}); loss {self.cfg.loss}, "
            f"beta {self.cfg.beta}"
        )
        return RowDataset(rows, seed=seed, shuffle=data_cfg.shuffle)

    def batch(self, rows: torch.Tensor) -> Batch:
        ids, completion, docs, pos = rows.unbind(1)  # each (B, T + 1)
        labels = row_labels(ids, completion, docs)
        # A row's last pair's rejected sequence is its last document with completion tokens.
        pairs = ((docs * completion).amax(1) + 1) // 2  # (B,)
        attention = AttentionSpec.of_kind("document")
        return Batch(ids[:, :-1], labels, pos[:, :-1], docs[:, :-1], attention, {"pairs": pairs})

    def count(self, batch: Batch) -> torch.Tensor:
        return batch.extras["pairs"].sum()

    def reference_extras(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ref_logps": sequence_sums(_token_logps(logits, batch), batch)}

    def loss_sum(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss_and_metrics(logits, batch)[0]

    def loss_and_metrics(
        self, logits: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss of the batch's pairs, and the sums of their rewards (beta times the
        log-ratio to the reference; SimPO: beta times the mean log-probability), of how often
        the chosen reward is the higher (accuracy) and of the margin, as TRL logs them."""
        cfg = self.cfg
        logps = sequence_sums(_token_logps(logits, batch), batch)  # (B, S)
        lengths = sequence_sums(torch.ones_like(batch.labels, dtype=logps.dtype), batch)
        if cfg.loss == "simpo":
            scores = logps / lengths.clamp_min(1.0)
        else:
            scores = logps - batch.extras["ref_logps"]
            if cfg.loss == "ipo":  # TRL averages IPO's log-ratios over the completion tokens
                scores = scores / lengths.clamp_min(1.0)
        chosen, rejected = scores[:, 0::2], scores[:, 1::2]  # (B, S / 2)
        delta = chosen - rejected
        if cfg.loss == "sigmoid":
            losses = -F.logsigmoid(cfg.beta * delta)
        elif cfg.loss == "ipo":
            losses = (delta - 1 / (2 * cfg.beta)) ** 2
        else:
            losses = -F.logsigmoid(cfg.beta * (delta - cfg.simpo_gamma / cfg.beta))
        pairs = batch.extras["pairs"]
        valid = torch.arange(chosen.shape[1], device=pairs.device) < pairs[:, None]
        with torch.no_grad():
            if cfg.loss == "ipo":  # rewards are beta * log-ratio, not its per-token mean
                ratios = logps - batch.extras["ref_logps"]
                chosen, rejected = ratios[:, 0::2], ratios[:, 1::2]
            reward_c, reward_r = cfg.beta * chosen, cfg.beta * rejected
            metrics = {
                "rewards/chosen": reward_c[valid].sum(),
                "rewards/rejected": reward_r[valid].sum(),
                "rewards/accuracies": (reward_c > reward_r)[valid].sum().float(),
                "rewards/margins": (reward_c - reward_r)[valid].sum(),
            }
        return losses[valid].sum(), metrics


def _token_logps(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, T) log-probability of each label (0 where not counted), float32; vocabulary-sharded
    logits work under `loss_parallel`."""
    nll = F.cross_entropy(
        logits.float().flatten(0, 1),
        batch.labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    if isinstance(nll, DTensor):
        nll = nll.full_tensor()
    return -nll.view_as(batch.labels)
