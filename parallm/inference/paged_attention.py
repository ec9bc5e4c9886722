"""Paged KV cache and the portable paged-attention backend (plain torch: CPU and GPU).

The cache of each layer is a pool of fixed-size blocks, (num_blocks, block_size, Hkv, D) for K
and for V; a sequence owns a list of blocks (its block table), so memory is allocated a block at
a time and shared prefixes can share blocks. One engine step runs the model once on a flat
batch: the new tokens of every scheduled sequence (a chunk of a prompt, or one decode token)
concatenated into (1, N). `StepMetadata` describes that batch; `PagedAttention` is the model's
attention backend for it:

  1. write the step's k, v (1, N, Hkv, D) into their cache slots (`slot_mapping`);
  2. per group of similar sequences (`group_rows`): gather each one's whole context from its
     blocks into a padded (G, max_ctx, Hkv, D);
  3. one SDPA call per group over padded queries (G, max_q, Hq, D) with a mask built from
     positions by the step's `AttentionSpec` (causal, and the layer's sliding window; the cache
     serves only causal attention; a group of whole prompts without a window uses SDPA's own
     causal rule instead), then scatter the rows back to (1, N, Hq, D).

On a CPU in float32, the decode rows of a step (one new token per sequence) skip steps 2-3:
`cpu_decode.paged_decode` reads their context straight from the pool, all of them in one call
per layer (no gather, no padding); prompt chunks still go by groups.

Groups keep the padding small: padding every sequence of a step to its longest query and longest
context would make 32 decodes next to one 256-token prompt chunk cost 32 x 256 query rows.
Everything per step but the K/V gather (index tensors, masks per window size) is computed once
and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from parallm.errors import UserError
from parallm.inference import cpu_decode
from parallm.models.attention import AttentionInputs, AttentionSpec, attention_mask, sdpa
from parallm.models.registry import ModelFacts


class KVPool:
    """The paged K/V tensors of every layer; `num_blocks` blocks of `block_size` tokens."""

    def __init__(
        self, facts: ModelFacts, *, num_blocks: int, block_size: int, n_kv_heads: int, dtype, device
    ) -> None:
        # n_kv_heads is the local count: a tensor-parallel rank caches only its own heads.
        shape = (num_blocks * block_size, n_kv_heads, facts.head_dim)  # flat slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(facts.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(facts.n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(facts: ModelFacts, block_size: int, n_kv_heads: int, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * facts.n_layers * block_size * n_kv_heads * facts.head_dim * elem


def check_paged(spec: AttentionSpec) -> None:
    """The paged cache serves causal attention (with or without a window): a sequence's new
    tokens see its cached ones. Anything else is a clear error, not a wrong answer."""
    if not spec.causal or spec.documents:
        raise UserError(
            f"attention: the paged KV cache serves causal attention; this step asks for {spec}"
        )


PAD_POS = 2**40  # the position of padding context entries: past any query, so always masked

# A group's padded attention (sequences x longest query x longest context) may cost at most this
# many times its sequences' own query x context products before the group is split.
MAX_PADDING_COST = 1.25
# ... and may gather at most this many context rows (sequences x longest context) at once: a
# gather that outgrows the CPU's caches is then read back from memory by SDPA (64 decodes of
# ~370 context positions: ~21 ms in one call, ~8 ms in groups of 4-16), while groups of a
# sequence or two multiply the calls. 20m shape, 2 threads, output tok/s: 48 requests of
# 100-1024 / 100-512 tokens (single runs) 342 (1024 rows), 321 (2048), 444 and 387 (4096), 369
# (8192), 308 (16384), 287 (no bound); 64 of 16-256 / 16-256 (medians of 3) 639, 634, 617.
MAX_GROUP_CONTEXT = 4096


def group_rows(lengths: list[int], contexts: list[int]) -> list[list[int]]:
    """Sequences (by index) grouped for padded attention: sorted by query length, then context
    length, a group grows while padding all its members to its longest query and context costs
    at most MAX_PADDING_COST times their own work and it gathers at most MAX_GROUP_CONTEXT
    context rows. So a step's decodes (query length 1) share a few calls, and a long prompt
    chunk gets its own."""
    order = sorted(range(len(lengths)), key=lambda b: (lengths[b], contexts[b]))
    groups: list[list[int]] = []
    work = max_q = max_ctx = 0
    for b in order:
        q, c = lengths[b], contexts[b]
        padded = (len(groups[-1]) + 1) * max(max_q, q) * max(max_ctx, c) if groups else 0
        gathered = (len(groups[-1]) + 1) * max(max_ctx, c) if groups else 0
        if groups and padded <= MAX_PADDING_COST * (work + q * c) and gathered <= MAX_GROUP_CONTEXT:
            groups[-1].append(b)
            work, max_q, max_ctx = work + q * c, max(max_q, q), max(max_ctx, c)
        else:
            groups.append([b])
            work, max_q, max_ctx = q * c, q, c
    return groups


@dataclass(kw_only=True)
class PaddedBatch:
    """Sequences padded to one query length and one context length.

    q_index (B, max_q): flat token index of each sequence's i-th new token (padding: 0);
    q_valid (B, max_q); q_pos (B, max_q) absolute positions; kv_slots (B, max_ctx): cache slot of
    each context position (padding: 0); kv_pos (B, max_ctx) (padding: a large position, masked).
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor
    q_pos: torch.Tensor
    kv_slots: torch.Tensor
    kv_pos: torch.Tensor
    # (R,) indices into the flattened (B * max_q) queries of the valid ones, and the flat token
    # index of each: set by `select`.
    out_rows: torch.Tensor | None = None
    out_tokens: torch.Tensor | None = None
    # Set by `select`: every sequence starts at position 0 (whole prompts, nothing cached), so
    # its context is its queries and the plain causal rule holds, padding (at the end) included.
    fresh: bool = False
    _masks: dict[AttentionSpec, torch.Tensor] = field(default_factory=dict)

    def select(self, rows: list[int], max_q: int, max_ctx: int, device) -> PaddedBatch:
        """Rows `rows`, trimmed to `max_q` queries and `max_ctx` context positions, on `device`."""
        index = torch.tensor(rows)
        q_index, q_valid = self.q_index[index, :max_q], self.q_valid[index, :max_q]
        out_rows = q_valid.flatten().nonzero()[:, 0]
        return PaddedBatch(
            q_index=q_index.to(device),
            q_valid=q_valid.to(device),
            q_pos=self.q_pos[index, :max_q].to(device),
            kv_slots=self.kv_slots[index, :max_ctx].to(device),
            kv_pos=self.kv_pos[index, :max_ctx].to(device),
            out_rows=out_rows.to(device),
            out_tokens=q_index.flatten()[out_rows].to(device),
            fresh=max_q == max_ctx and not bool(self.q_pos[index, 0].any()),
        )

    def mask(self, spec: AttentionSpec) -> torch.Tensor:
        """(B, 1, max_q, max_ctx) True where query i may attend context position j (causal
        `spec`: padding context positions lie past every query)."""
        if spec not in self._masks:
            allowed = attention_mask(self.q_pos, self.kv_pos, spec)
            # Padding query rows attend to slot 0 so SDPA never sees an all-masked row (NaN).
            allowed[:, 0, :, 0] |= ~self.q_valid
            self._masks[spec] = allowed
        return self._masks[spec]


PADDED_GRIDS = ("q_index", "q_valid", "q_pos", "kv_slots", "kv_pos")  # a PaddedBatch's own


@dataclass(kw_only=True)
class DecodeRows:
    """Sequences with one new token: its flat index `tokens` (G,), context `lengths` (G,), and
    the cache slot of each context position `slots` (G, longest context; padding 0)."""

    tokens: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor


@dataclass(kw_only=True)
class StepMetadata(PaddedBatch):
    """Where the N flat tokens of one step come from and what they may attend to: every
    sequence of the step padded together (the flex backend's view; `out_rows`, `out_tokens`
    and `fresh` are its groups' only), `groups` of them padded apart (the portable backend's,
    made on first use), and `slot_mapping` (N,), the cache slot of each new token."""

    slot_mapping: torch.Tensor
    host: PaddedBatch  # the same grids on the CPU, which the groups are cut from
    lengths: list[int]  # (B,) each sequence's new tokens
    contexts: list[int]  # (B,) and its context length

    def _grouped(self, rows: list[int]) -> list[PaddedBatch]:
        lengths, contexts = self.lengths, self.contexts
        device = self.slot_mapping.device
        return [
            self.host.select(
                group, max(lengths[b] for b in group), max(contexts[b] for b in group), device
            )
            for group in (
                [rows[i] for i in members]
                for members in group_rows([lengths[b] for b in rows], [contexts[b] for b in rows])
            )
        ]

    @cached_property
    def groups(self) -> list[PaddedBatch]:
        """Every sequence, in padded groups."""
        return self._grouped(list(range(len(self.lengths))))

    @cached_property
    def chunk_groups(self) -> list[PaddedBatch]:
        """The sequences with more than one new token (prompt chunks), in padded groups."""
        return self._grouped([b for b, n in enumerate(self.lengths) if n > 1])

    @cached_property
    def decodes(self) -> DecodeRows:
        """The sequences with one new token, unpadded (host tensors, for the CPU kernel)."""
        rows = np.flatnonzero(np.asarray(self.lengths) == 1)
        contexts = np.asarray(self.contexts, dtype=np.int64)[rows]
        # numpy views of the host grids: its indexing costs less than torch's, and gives fresh
        # contiguous arrays.
        q_index, kv_slots = self.host.q_index.numpy(), self.host.kv_slots.numpy()
        return DecodeRows(
            tokens=torch.from_numpy(q_index[rows, 0]),
            slots=torch.from_numpy(kv_slots[rows, : contexts.max(initial=0)]),
            lengths=torch.from_numpy(contexts),
        )

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
        # Whole (B, max_q) and (B, max_ctx) grids in numpy at once: a Python loop of small torch
        # ops per sequence cost milliseconds a step.
        n_seq = len(starts)
        first, count = np.asarray(starts), np.asarray(lengths)
        ctx = first + count
        max_q, max_ctx = int(count.max()), int(ctx.max())
        width = max(-(-max_ctx // block_size), max(map(len, block_tables)))  # may hold spares
        tables = np.zeros((n_seq, width), dtype=np.int64)
        for b, table in enumerate(block_tables):
            tables[b, : len(table)] = table
        pos = np.arange(max_ctx)
        kv_valid = pos < ctx[:, None]  # (B, max_ctx)
        slots = tables[:, pos // block_size] * block_size + pos % block_size
        i = np.arange(max_q)
        q_valid = i < count[:, None]  # (B, max_q)
        q_pos = np.where(q_valid, first[:, None] + i, 0)
        offsets = np.cumsum(count) - count
        full = PaddedBatch(
            q_index=torch.from_numpy(np.where(q_valid, offsets[:, None] + i, 0)),
            q_valid=torch.from_numpy(q_valid),
            q_pos=torch.from_numpy(q_pos),
            kv_slots=torch.from_numpy(np.where(kv_valid, slots, 0)),
            kv_pos=torch.from_numpy(np.where(kv_valid, pos, PAD_POS)),
        )
        # The new tokens' slots, sequence after sequence: row-major order of the valid grid cells.
        rows, cols = q_valid.nonzero()
        slot_mapping = torch.from_numpy(slots[rows, q_pos[rows, cols]])
        return cls(
            **{name: getattr(full, name).to(device) for name in PADDED_GRIDS},  # no copy on a CPU
            slot_mapping=slot_mapping.to(device),
            host=full,
            lengths=list(lengths),
            contexts=ctx.tolist(),
        )


class PagedAttention:
    """AttentionBackend over a `KVPool`; set `metadata` before each model call.
    `decode_kernel`: decode rows through `cpu_decode` where it serves the pool (float32 on a
    CPU, a C compiler at hand)."""

    def __init__(self, pool: KVPool, *, decode_kernel: bool = True) -> None:
        self.pool = pool
        self.metadata: StepMetadata | None = None
        self.decode_kernel = decode_kernel and cpu_decode.usable(pool.k[0])

    def __call__(self, q, k, v, *, layer_idx, attn: AttentionInputs):
        check_paged(attn.spec)
        md = self.metadata
        assert md is not None, "set PagedAttention.metadata before the forward"
        k_cache, v_cache = self.pool.k[layer_idx], self.pool.v[layer_idx]
        # index_select / index_copy_ rather than tensor[index]: on a CPU they copy whole rows and
        # are several times faster (a 64-sequence decode step's gather: 1.3 ms against 3.8 ms).
        k_cache.index_copy_(0, md.slot_mapping, k[0].to(k_cache.dtype))  # (N, Hkv, D) to slots
        v_cache.index_copy_(0, md.slot_mapping, v[0].to(v_cache.dtype))
        flat = torch.empty(q.shape[1:], dtype=q.dtype, device=q.device)  # (N, Hq, D)
        if not (self.decode_kernel and q.dtype == torch.float32):
            groups = md.groups
        else:
            groups, dec = md.chunk_groups, md.decodes
            if len(dec.tokens):
                q_rows = q[0].contiguous()
                window = attn.spec.window
                cpu_decode.paged_decode(
                    q_rows, flat, k_cache, v_cache, dec.tokens, dec.slots, dec.lengths, window
                )
        for g in groups:
            (n_seq, max_q), max_ctx = g.q_index.shape, g.kv_slots.shape[1]
            keys = k_cache.index_select(0, g.kv_slots.flatten()).unflatten(0, (n_seq, max_ctx))
            values = v_cache.index_select(0, g.kv_slots.flatten()).unflatten(0, (n_seq, max_ctx))
            queries = q[0].index_select(0, g.q_index.flatten()).unflatten(0, (n_seq, max_q))
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            if g.fresh and attn.spec.window is None:
                # Whole prompts: SDPA's own causal rule, which skips the blocks above the
                # diagonal that a mask would only hide (prefill attention ~2x faster on a CPU).
                out = sdpa(queries, keys, values, None, causal=True)
            elif max_q == 1:
                out = _decode_sdpa(queries, keys, values, g.mask(attn.spec))
            else:
                out = sdpa(queries, keys, values, g.mask(attn.spec))  # (G, max_q, Hq, D)
            rows = out.flatten(0, 1).index_select(0, g.out_rows)  # the valid (non-padding) rows
            flat.index_copy_(0, g.out_tokens, rows)
        return flat[None]


def _decode_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`sdpa` for one query per sequence, q (G, 1, Hq, D), k and v (G, ctx, Hkv, D), mask
    (G, 1, 1, ctx): the Hq / Hkv query heads that share a KV head become that head's query rows,
    so one SDPA runs without expanding K and V for grouped-query attention (on a CPU, 64
    sequences: 1.6x faster)."""
    g, _, hq, d = q.shape
    hkv = k.shape[2]
    rows = q.view(g, hkv, hq // hkv, d)  # query head h uses KV head h // (hq // hkv)
    out = F.scaled_dot_product_attention(rows, k.transpose(1, 2), v.transpose(1, 2), mask)
    return out.reshape(g, 1, hq, d)
