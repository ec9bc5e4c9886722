"""Paged attention with `torch.nn.attention.flex_attention`: no padded gather, no dense mask.

Same contract as `PagedAttention` (set `metadata`, then call it as the model's backend), but
instead of gathering each sequence's context into a padded batch, one flex attention call runs
over the flat cache itself: the step's N tokens are one query sequence (1, Hq, N, D) and the whole
slot pool is one key sequence (1, Hkv, S, D), a view of the cache (no copy). A `mask_mod` lets
query token i see key slot j iff

    owns[seq(i), j // block_size] and slot_pos[j] <= pos(i) and pos(i) - slot_pos[j] < window

Ownership is per *block* and per sequence, not one owner id per slot, because sequences that
share a prefix share its blocks; a slot's position is still unique (a shared block sits at the
same logical index in every table that holds it), and a slot at a position <= pos(i) in one of
seq(i)'s blocks is in seq(i)'s context.

The `BlockMask` is built once per step per distinct window from 128 x 128 tiles only: a tile is
visited iff some query of the q tile belongs to a sequence owning a block in the kv tile, cost
O(N/128 * B * S/128); `mask_mod` then masks exactly inside the visited tiles. So neither the
(N, S) mask nor the padded K/V batch is ever materialised, and tiles of the pool no sequence of
the step owns are skipped by the kernel.

Compilation: the kernel is `torch.compile(flex_attention)`, compiled lazily on the first call
and shared by all layers and windows (the window is a tensor in the mask, not a constant). The
first step compiles for its exact N; the first step of another size recompiles once with N, the
tile counts and B dynamic, and later sizes reuse that graph. Sizes of 1 are specialised, so a
step of a single token (N == 1) costs one more compile. On a 2-core CPU the first compile takes
about 18 s, the later ones 6-8 s. (`dynamic=True` from the start fails on CPU: inductor's flex
template emits C++ that does not compile, torch 2.13.) A new dtype, head count or device
recompiles.
"""

from __future__ import annotations

from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from parallm.errors import UserError
from parallm.inference.paged_attention import (
    PAD_POS,
    KVPool,
    PagedAttention,
    StepMetadata,
    check_paged,
)
from parallm.models.attention import AttentionBackend, AttentionInputs

TILE = 128  # flex attention's default block size, for queries and keys


@cache
def compiled_flex_attention(device_type: str = "cuda"):
    """`flex_attention` compiled once per process and device type (uncompiled it materialises
    the scores). On CPU shapes stay static: inductor's CPU flex kernel fails to compile once
    dynamic shapes kick in (torch 2.13: `cur_kvSplitSize9 was not declared`), so each new step
    shape recompiles there; on CUDA the automatic-dynamic default serves every shape."""
    if device_type == "cpu":
        return torch.compile(flex_attention, dynamic=False)
    return torch.compile(flex_attention)


class FlexStep:
    """Per-step tensors for the flex backend, shared by all layers; block masks per window."""

    def __init__(self, md: StepMetadata, pool: KVPool) -> None:
        device = md.q_pos.device
        n_seq, _ = md.q_pos.shape
        num_slots = pool.num_blocks * pool.block_size
        n = md.slot_mapping.numel()
        self.n_tokens, self.n_slots = n, num_slots

        # Flat per-token sequence id and position, (N,).
        seq_ids = torch.arange(n_seq, device=device)[:, None].expand_as(md.q_pos)
        self.q_seq = torch.empty(n, dtype=torch.long, device=device)
        self.q_pos = torch.empty(n, dtype=torch.long, device=device)
        self.q_seq[md.q_index[md.q_valid]] = seq_ids[md.q_valid]
        self.q_pos[md.q_index[md.q_valid]] = md.q_pos[md.q_valid]

        # Context entries of row b are positions 0..last query position (padding lies beyond).
        last_pos = md.q_pos.masked_fill(~md.q_valid, -1).amax(dim=1)  # (B,)
        ctx = md.kv_pos <= last_pos[:, None]  # (B, max_ctx)
        slots = md.kv_slots[ctx]
        # Unused slots get a position past any query, so `slot_pos <= q_pos` rejects them.
        self.slot_pos = torch.full((num_slots,), PAD_POS, dtype=torch.long, device=device)
        self.slot_pos[slots] = md.kv_pos[ctx]  # shared slots get the same position from all
        # (B', num_blocks) with B' >= 2 (a spare empty row): a one-sequence step would otherwise
        # specialise the compiled kernel on B == 1 and cost a recompile.
        rows = max(n_seq, 2)
        self.owns = torch.zeros(rows, pool.num_blocks, dtype=torch.bool, device=device)
        ctx_seq = torch.arange(n_seq, device=device)[:, None].expand_as(ctx)[ctx]
        self.owns[ctx_seq, slots // pool.block_size] = True
        # (B', ceil(S / TILE)): which kv tiles hold some of each sequence's context.
        self.tile_owned = torch.zeros(rows, -(-num_slots // TILE), device=device)
        self.tile_owned[ctx_seq, slots // TILE] = 1.0
        self.block_size = pool.block_size
        self._masks: dict[int | None, BlockMask] = {}

    def block_mask(self, window: int | None) -> BlockMask:
        if window not in self._masks:
            self._masks[window] = self._build(window)
        return self._masks[window]

    def _build(self, window: int | None) -> BlockMask:
        q_seq, q_pos, slot_pos, owns, bs = (
            self.q_seq,
            self.q_pos,
            self.slot_pos,
            self.owns,
            self.block_size,
        )

        # A tensor, not a Python int, so every window shares one compiled kernel.
        w = torch.tensor(2**40 if window is None else window, device=owns.device)

        def mask_mod(b, h, q_idx, kv_idx):
            seq, pos, kv_pos = q_seq[q_idx], q_pos[q_idx], slot_pos[kv_idx]
            return owns[seq, kv_idx // bs] & (kv_pos <= pos) & (pos - kv_pos < w)

        n, s = self.n_tokens, self.n_slots
        # (n_q_tiles, B'): which sequences have a query in each q tile.
        q_tile_seq = torch.zeros(-(-n // TILE), owns.shape[0], device=owns.device)
        q_tile_seq[torch.arange(n, device=owns.device) // TILE, q_seq] = 1.0
        # (n_q_tiles, n_kv_tiles): tiles that may hold an allowed pair; mask_mod masks inside.
        tiles = (q_tile_seq @ self.tile_owned) > 0
        num = tiles.sum(-1, dtype=torch.int32)
        idx = torch.sort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).indices
        return BlockMask.from_kv_blocks(
            num[None, None],
            idx.to(torch.int32)[None, None],
            BLOCK_SIZE=TILE,
            mask_mod=mask_mod,
            seq_lengths=(n, s),
        )


class FlexPagedAttention:
    """AttentionBackend over a `KVPool` computed by flex attention; set `metadata` each step."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._metadata: StepMetadata | None = None
        self._step: FlexStep | None = None

    @property
    def metadata(self) -> StepMetadata | None:
        return self._metadata

    @metadata.setter
    def metadata(self, md: StepMetadata | None) -> None:
        self._metadata, self._step = md, None

    def __call__(self, q, k, v, *, layer_idx, attn: AttentionInputs):
        check_paged(attn.spec)
        md = self._metadata
        assert md is not None, "set FlexPagedAttention.metadata before the forward"
        if self._step is None:
            self._step = FlexStep(md, self.pool)
        k_cache, v_cache = self.pool.k[layer_idx], self.pool.v[layer_idx]
        k_cache[md.slot_mapping] = k[0].to(k_cache.dtype)  # (N, Hkv, D) into their slots
        v_cache[md.slot_mapping] = v[0].to(v_cache.dtype)
        # (1, H, L, D) views; a cache dtype other than q's costs a full copy of the pool.
        query = q[0].transpose(0, 1)[None]
        key = k_cache.to(q.dtype).transpose(0, 1)[None]
        value = v_cache.to(q.dtype).transpose(0, 1)[None]
        out = compiled_flex_attention(query.device.type)(
            query,
            key,
            value,
            block_mask=self._step.block_mask(attn.spec.window),
            enable_gqa=query.shape[1] != key.shape[1],
        )  # (1, Hq, N, D)
        return out[0].transpose(0, 1)[None]


BACKENDS = ("portable", "flex", "auto")


def make_backend(name: str, pool: KVPool, *, decode_kernel: bool = True) -> AttentionBackend:
    """The paged attention backend called `name`: "portable" (`PagedAttention`, plain torch;
    with `decode_kernel`, its CPU decode kernel where it serves), "flex" (`FlexPagedAttention`)
    or "auto" (flex when the pool is on CUDA, else portable)."""
    if name == "auto":
        name = "flex" if pool.k[0].device.type == "cuda" else "portable"
    if name == "portable":
        return PagedAttention(pool, decode_kernel=decode_kernel)
    if name == "flex":
        return FlexPagedAttention(pool)
    raise UserError(f"attention_backend={name!r}: valid backends are {', '.join(BACKENDS)}")
