"""Causal language-model pre-training: predict every next token of packed text rows.

Rows are `seq_len + 1` tokens cut from one stream of documents, each closed by EOS. With
`task.attention = "document"` a row's documents do not see each other and their positions
restart at 0 (a document starts after each EOS), as if each were its own sequence.
"""

from __future__ import annotations

import torch

from parallm.models.attention import AttentionSpec
from parallm.train.tasks import Batch, Task, next_token_loss_sum, register_task


def document_layout(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids and positions (B, T) of packed rows: a new document starts after each EOS."""
    ends = (input_ids == eos_id).long()
    doc = torch.cumsum(ends, dim=1) - ends  # the EOS closes its own document
    t = input_ids.shape[1]
    idx = torch.arange(t, device=input_ids.device).expand_as(input_ids)
    # Position = index - index of the document's first token (a running max of starts).
    starts = torch.where(torch.diff(doc, dim=1, prepend=doc[:, :1] - 1) != 0, idx, 0)
    first = torch.cummax(starts, dim=1).values
    return doc, idx - first


@register_task
class Pretrain(Task):
    name = "pretrain"

    def batch(self, rows: torch.Tensor) -> Batch:
        inputs, labels = rows[:, :-1], rows[:, 1:]
        if self.cfg.attention != "document":
            return Batch(inputs, labels)
        docs, positions = document_layout(inputs, self.tokenizer.eos_token_id)
        return Batch(inputs, labels, positions, docs, AttentionSpec.of_kind("document"))

    def loss_sum(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return next_token_loss_sum(logits, batch)
