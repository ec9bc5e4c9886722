"""Paged KV cache and the portable paged-attention backend (plain torch: CPU and GPU).

The cache of each layer is a pool of fixed-size blocks, (num_blocks, block_size, Hkv, D) for K
and for V; a sequence owns a list of blocks (its block table), so memory is allocated a block at
a time and shared prefixes can share blocks. One engine step runs the model once on a flat
batch: the new tokens of every scheduled sequence (a chunk of a prompt, or one decode token)
concatenated into (1, N). `StepMetadata` describes that batch; `PagedAttention` is the model's
attention backend for it:

  1. write the step's k, v (1, N, Hkv, D) into their cache slots (`slot_mapping`);
  2. gather each sequence's whole context from its blocks into a padded (B, max_ctx, Hkv, D);
  3. one SDPA call over padded queries (B, max_q, Hq, D) with a mask built from positions
     (causal, and the layer's sliding window), then scatter the rows back to (1, N, Hq, D).

Everything per step but the K/V gather (index tensors, masks per window size) is computed once
and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parallm.models.llama.model import ModelArgs, sdpa


class KVPool:
    """The paged K/V tensors of every layer; `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self, args: ModelArgs, *, num_blocks: int, block_size: int, n_kv_heads: int, dtype, device
    ) -> None:
        # n_kv_heads is the local count: a tensor-parallel rank caches only its own heads.
        shape = (num_blocks * block_size, n_kv_heads, args.head_dim)  # flat slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, n_kv_heads: int, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * args.n_layers * block_size * n_kv_heads * args.head_dim * elem


@dataclass
class StepMetadata:
    """Where the N flat tokens of one step come from and what they may attend to.

    q_index (B, max_q): flat token index of each sequence's i-th new token (padding: 0);
    q_valid (B, max_q); q_pos (B, max_q) absolute positions; kv_slots (B, max_ctx): cache slot of
    each context position (padding: 0); kv_pos (B, max_ctx) (padding: a large position, masked).
    """

    slot_mapping: torch.Tensor  # (N,)
    q_index: torch.Tensor
    q_valid: torch.Tensor
    q_pos: torch.Tensor
    kv_slots: torch.Tensor
    kv_pos: torch.Tensor
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        starts: list[int],
        lengths: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> StepMetadata:
        """Sequence b computes positions [starts[b], starts[b] + lengths[b]) this step; its
        context is positions [0, starts[b] + lengths[b]) stored in `block_tables[b]`."""
        n_seq = len(starts)
        max_q = max(lengths)
        ctx = [s + n for s, n in zip(starts, lengths, strict=True)]
        max_ctx = max(ctx)
        q_index = torch.zeros(n_seq, max_q, dtype=torch.long)
        q_valid = torch.zeros(n_seq, max_q, dtype=torch.bool)
        q_pos = torch.zeros(n_seq, max_q, dtype=torch.long)
        kv_slots = torch.zeros(n_seq, max_ctx, dtype=torch.long)
        kv_pos = torch.full((n_seq, max_ctx), 2**40, dtype=torch.long)
        slot_mapping = []
        offset = 0
        for b, (start, n, table) in enumerate(zip(starts, lengths, block_tables, strict=True)):
            pos = torch.arange(ctx[b])
            blocks = torch.tensor(table, dtype=torch.long)[pos // block_size]
            slots = blocks * block_size + pos % block_size
            kv_slots[b, : ctx[b]] = slots
            kv_pos[b, : ctx[b]] = pos
            q_index[b, :n] = torch.arange(offset, offset + n)
            q_valid[b, :n] = True
            q_pos[b, :n] = pos[start:]
            slot_mapping.append(slots[start:])
            offset += n
        return cls(
            slot_mapping=torch.cat(slot_mapping).to(device),
            q_index=q_index.to(device),
            q_valid=q_valid.to(device),
            q_pos=q_pos.to(device),
            kv_slots=kv_slots.to(device),
            kv_pos=kv_pos.to(device),
        )

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, max_q, max_ctx) True where query i may attend context position j."""
        if window not in self._masks:
            diff = self.q_pos[:, :, None] - self.kv_pos[:, None, :]
            allowed = diff >= 0
            if window is not None:
                allowed &= diff < window
            # Padding query rows attend to slot 0 so SDPA never sees an all-masked row (NaN).
            allowed[:, :, 0] |= ~self.q_valid
            self._masks[window] = allowed[:, None]
        return self._masks[window]


class PagedAttention:
    """AttentionBackend over a `KVPool`; set `metadata` before each model call."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.metadata: StepMetadata | None = None

    def __call__(self, q, k, v, *, layer_idx, positions, sliding_window):
        md = self.metadata
        assert md is not None, "set PagedAttention.metadata before the forward"
        k_cache, v_cache = self.pool.k[layer_idx], self.pool.v[layer_idx]
        k_cache[md.slot_mapping] = k[0].to(k_cache.dtype)  # (N, Hkv, D) into their slots
        v_cache[md.slot_mapping] = v[0].to(v_cache.dtype)
        keys = k_cache[md.kv_slots]  # (B, max_ctx, Hkv, D)
        values = v_cache[md.kv_slots]
        queries = q[0][md.q_index]  # (B, max_q, Hq, D)
        out = sdpa(queries, keys.to(q.dtype), values.to(q.dtype), md.mask(sliding_window))
        flat = torch.empty_like(q[0])  # (N, Hq, D)
        flat[md.q_index[md.q_valid]] = out[md.q_valid]
        return flat[None]
