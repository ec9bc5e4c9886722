"""Runs the model on one scheduled step over the paged KV cache and returns next-token logits.

The step's tokens (prompt chunks and single decode tokens of every scheduled sequence) are one
flat (1, N) batch; only sequences whose last token is in this step get a logits row.
"""

from __future__ import annotations

import torch

from parallm.inference.paged_attention import KVPool, PagedAttention, StepMetadata
from parallm.inference.sequence import Sequence
from parallm.models.llama.model import Transformer

GiB = 2**30


def local_kv_heads(model: Transformer) -> int:
    """KV heads this process holds (all of them, or its tensor-parallel share)."""
    attn = next(iter(model.layers.values())).self_attn
    weight = attn.k_proj.weight
    rows = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
    return rows // model.args.head_dim


def blocks_for_budget(model: Transformer, budget_bytes: int, block_size: int, dtype) -> int:
    """How many KV blocks `budget_bytes` holds for this model."""
    per_block = KVPool.bytes_per_block(model.args, block_size, local_kv_heads(model), dtype)
    return int(budget_bytes // per_block)


class ModelRunner:
    """Owns the KV pool and the paged backend; `execute` runs one step."""

    def __init__(self, model: Transformer, *, num_blocks: int, block_size: int) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.pool = KVPool(
            model.args,
            num_blocks=num_blocks,
            block_size=block_size,
            n_kv_heads=local_kv_heads(model),
            dtype=self.dtype,
            device=self.device,
        )
        self.backend = PagedAttention(self.pool)

    @torch.inference_mode()
    def execute(
        self, seqs: list[Sequence], num_new_tokens: list[int]
    ) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Compute the step; returns float32 logits (R, vocab) for the R sequences that reach
        their last token this step (to be sampled), in order, and those sequences."""
        starts = [s.num_computed_tokens for s in seqs]
        ids, positions, rows, sampled = [], [], [], []
        offset = 0
        for seq, start, n in zip(seqs, starts, num_new_tokens, strict=True):
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            offset += n
            if start + n == seq.num_tokens:  # the step ends at the sequence's last token
                rows.append(offset - 1)
                sampled.append(seq)
        self.backend.metadata = StepMetadata.build(
            starts, num_new_tokens, [s.block_table for s in seqs], self.block_size, self.device
        )
        input_ids = torch.tensor([ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        if not rows:  # only prompt chunks that do not finish their prompt: fill the cache
            self.model(input_ids, pos, backend=self.backend, logit_rows=pos.new_zeros(0))
            return None, []
        logit_rows = torch.tensor(rows, device=self.device)
        logits = self.model(input_ids, pos, backend=self.backend, logit_rows=logit_rows)[0]
        return logits.float(), sampled
