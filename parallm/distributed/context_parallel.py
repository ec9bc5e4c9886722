"""Context parallelism: attention over a sequence split across the ranks of a process group.

Each of the `cp` ranks holds T_local = T / cp tokens of every sequence in the batch; everything
but attention is per token and runs unchanged on the shard. Two `AttentionBackend`s make attention
see the whole sequence; both are built on plain `torch.distributed` collectives, so they run on
gloo with CPU tensors as well as on NCCL (PyTorch's own context parallelism needs CUDA kernels).

Ulysses (`UlyssesAttention`): an all-to-all over heads turns q (B, T_local, Hq, D) into
(B, T, Hq / cp, D): every rank gets all tokens of its share of the heads, runs ordinary SDPA over
the full sequence, and a second all-to-all turns the output back into (B, T_local, Hq, D).
Needs Hq and Hkv divisible by cp. Per layer and rank the forward sends (cp - 1) / cp of
q, k, v and the output, about 2 * B * T_local * D * (Hq + Hkv) elements, and the backward the
same again; this shrinks as cp grows, but the collectives are blocking.

Ring (`RingAttention`): every rank keeps its queries; the K/V blocks travel round the ring in
cp - 1 send/recv hops, the next hop overlapping the current block's compute. Partial outputs are
merged with their log-sum-exp (as flash attention merges tiles). The backward passes K/V round
the ring again, carrying each block's dK/dV accumulator with it, one hop more to bring it home.
Per layer and rank the forward sends (cp - 1) * 2 * B * T_local * Hkv * D elements (the whole
sequence's K and V but its own, whatever cp is); the backward sends K/V the same way and the
dK/dV accumulators (float32) cp times. Scores are materialised per block,
(B, Hq, T_local, T_local) in float32, not tiled as in flash attention. Blocks that no query may
see are skipped (deciding costs a host sync per block on GPU). No constraint on head counts.

Masks come from the global positions of the tokens and, for packed documents, their document
ids (`AttentionSpec` semantics: causal or full, a sliding window W lets a query at p see keys
p - W < j <= p, documents never see each other), so any token layout is correct.
For causal masks the layout decides the balance: with contiguous chunks rank r attends to r + 1
blocks under ring attention, so the last rank works far longer than the first. `shard_sequence(..., load_balance=True)` splits the sequence into
2 * cp chunks and gives rank r chunks r and 2 * cp - 1 - r, so every rank does equal work. The
trainer uses the balanced layout with ring attention and contiguous chunks with Ulysses (which
sees the whole sequence anyway, and then gets positions 0..T-1 in order: the fused causal kernel).

On a group of one rank all communication is skipped, so single-process runs use the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from parallm.errors import UserError
from parallm.models.attention import AttentionBackend, AttentionInputs, attention_mask, sdpa

CP_MODES = ("ulysses", "ring")


# ---------------------------------------------------------------------------------------------
# Sequence layout


def shard_sequence(
    x: torch.Tensor, cp_rank: int, cp_size: int, *, load_balance: bool, dim: int = 1
) -> torch.Tensor:
    """This rank's part of a full-sequence tensor along `dim`.

    Contiguous: chunk `cp_rank` of `cp_size`. Load balanced: chunks `cp_rank` and
    `2 * cp_size - 1 - cp_rank` of `2 * cp_size`, concatenated, so that under a causal mask
    every rank has the same amount of attention work.
    """
    if not 0 <= cp_rank < cp_size:
        raise UserError(f"cp_rank {cp_rank} is outside 0..{cp_size - 1} (cp_size {cp_size})")
    n_chunks = 2 * cp_size if load_balance else cp_size
    length = x.shape[dim]
    if length % n_chunks:
        layout = f"2 * cp_size = {n_chunks} (load balanced)" if load_balance else n_chunks
        raise UserError(f"sequence length {length} is not divisible by {layout}")
    chunks = x.chunk(n_chunks, dim=dim)
    if not load_balance:
        return chunks[cp_rank]
    return torch.cat((chunks[cp_rank], chunks[n_chunks - 1 - cp_rank]), dim=dim)


def unshard_sequence(
    local_parts: list[torch.Tensor], cp_size: int, *, load_balance: bool, dim: int = 1
) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full sequence from every rank's part, in rank order."""
    if len(local_parts) != cp_size:
        raise UserError(f"got {len(local_parts)} parts for cp_size {cp_size}")
    if not load_balance:
        return torch.cat(local_parts, dim=dim)
    halves = [part.chunk(2, dim=dim) for part in local_parts]
    ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(ordered, dim=dim)


def cp_positions(
    seq_len: int,
    cp_rank: int,
    cp_size: int,
    *,
    load_balance: bool,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global positions (T_local,) of this rank's tokens under `shard_sequence`'s layout."""
    positions = torch.arange(seq_len, device=device)
    return shard_sequence(positions, cp_rank, cp_size, load_balance=load_balance, dim=0)


# ---------------------------------------------------------------------------------------------
# Communication helpers


def _rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    # Without an initialised process group there is one rank and nothing to communicate.
    if group is None and not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_tokens(x: torch.Tensor | None, group, cp: int) -> torch.Tensor | None:
    """Every rank's (B, T_local) token tensor (positions, document ids), stacked in rank order:
    (cp, B, T_local); None stays None."""
    if x is None or cp == 1:
        return None if x is None else x[None]
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all along dim 0; its backward is the same all-to-all of the gradient."""
    return funcol.all_to_all_single_autograd(x.contiguous(), None, None, group)


def _seq_to_heads(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """(B, T_local, H, D) -> (B, cp * T_local, H / cp, D): all tokens, this rank's head group."""
    b, t, h, d = x.shape
    x = x.reshape(b, t, cp, h // cp, d).permute(2, 0, 1, 3, 4)  # (cp, B, T_local, H/cp, D)
    x = _all_to_all(x, group)  # chunk i: rank i's tokens, our heads
    return x.permute(1, 0, 2, 3, 4).reshape(b, cp * t, h // cp, d)


def _heads_to_seq(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """(B, cp * T_local, H / cp, D) -> (B, T_local, H, D), the inverse of `_seq_to_heads`."""
    b, tt, h, d = x.shape
    x = x.reshape(b, cp, tt // cp, h, d).permute(1, 0, 2, 3, 4)  # (cp, B, T_local, H/cp, D)
    x = _all_to_all(x, group)  # chunk i: our tokens, rank i's heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, tt // cp, cp * h, d)


def _ring_shift(send: torch.Tensor, group, rank: int, cp: int) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next rank and receiving the previous rank's tensor."""
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % cp),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % cp),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _is_full(spec, length: int) -> bool:
    """Every query sees every key (bidirectional, one document, no window that bites): no
    positions or mask are needed."""
    return not spec.causal and not spec.documents and (spec.window is None or spec.window >= length)


# ---------------------------------------------------------------------------------------------
# Ulysses


class UlyssesAttention:
    """Context-parallel attention by all-to-all over heads (DeepSpeed-Ulysses).

    q (B, T_local, Hq, D), k and v (B, T_local, Hkv, D), positions (B, T_local) global
    positions of the local tokens; every rank must hold the same T_local. Returns
    (B, T_local, Hq, D). Hq and Hkv must be divisible by the group size.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.size = _rank_and_size(group)
        # Functional collectives take a group object, not None.
        self.group = group if group is not None or self.size == 1 else dist.group.WORLD

    def __call__(self, q, k, v, *, layer_idx, attn: AttentionInputs):
        cp, hq, hkv = self.size, q.shape[2], k.shape[2]
        if hq % cp or hkv % cp:
            raise UserError(
                f"Ulysses attention splits heads over {cp} context-parallel ranks: query heads "
                f"({hq}) and kv heads ({hkv}) must both be divisible by {cp}; use ring attention"
            )
        if cp > 1:
            q, k, v = (_seq_to_heads(x, self.group, cp) for x in (q, k, v))  # (B, T, H/cp, D)
        b = q.shape[0]
        if _is_full(attn.spec, q.shape[1]):  # q holds all T tokens now
            out = sdpa(q, k, v, None, causal=False)  # every key: no positions, no mask
            return _heads_to_seq(out, self.group, cp) if cp > 1 else out
        # (cp, B, T_local) -> (B, T), in all-to-all order
        pos, docs = (
            None if x is None else x.permute(1, 0, 2).reshape(b, -1)
            for x in (
                _gather_tokens(attn.positions, self.group, cp),
                _gather_tokens(attn.document_ids, self.group, cp),
            )
        )
        whole = AttentionInputs(pos, attn.spec, docs)
        t = pos.shape[1]
        if torch.equal(pos, torch.arange(t, device=pos.device).expand_as(pos)) and (
            whole.is_causal_in_order(t)
        ):
            out = sdpa(q, k, v, None)  # the fused causal kernel
        else:
            out = sdpa(q, k, v, whole.mask())
        return _heads_to_seq(out, self.group, cp) if cp > 1 else out


# ---------------------------------------------------------------------------------------------
# Ring


def _finite(lse: torch.Tensor) -> torch.Tensor:
    # A row with no visible key has lse = -inf; subtracting 0 instead keeps exp(-inf) = 0, not NaN.
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _block_scores(q, k, mask, scale) -> torch.Tensor:
    """Masked scores (B, H, Tq, Tk) from q (B, H, Tq, D) and k (B, H, Tk, D); mask None: all
    visible."""
    scores = q @ k.transpose(-1, -2) * scale
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def _kv_block(kv: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, B, Tk, Hkv, D) in the input dtype -> k, v (B, Hq, Tk, D) in float32."""
    k, v = kv.transpose(2, 3).float()
    # Query head h reads kv head h // groups, as SDPA's enable_gqa does.
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _sum_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hq, T, D) -> (B, Hkv, T, D): the gradient of `repeat_interleave` over heads."""
    b, h, t, d = x.shape
    return x.view(b, h // groups, groups, t, d).sum(2)


def _block_mask(q_pos, kv_pos, q_doc, kv_doc, spec, j: int) -> torch.Tensor | None:
    """The mask (B, 1, Tq, Tk) of the local queries against rank j's key block; None when every
    query sees every key (bidirectional attention: no mask is built)."""
    if _is_full(spec, q_pos.shape[1] * kv_pos.shape[0]):
        return None
    return attention_mask(q_pos, kv_pos[j], spec, q_doc, None if kv_doc is None else kv_doc[j])


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, kv_pos, q_doc, kv_doc, spec, group, rank, cp):
        # q (B, Tq, Hq, D); k, v (B, Tk, Hkv, D); q_pos (B, Tq); kv_pos (cp, B, Tk); q_doc,
        # kv_doc: the same shapes, or None without documents
        scale, groups = q.shape[-1] ** -0.5, q.shape[2] // k.shape[2]
        qf = q.transpose(1, 2).float()  # (B, Hq, Tq, D)
        out = torch.zeros_like(qf)  # (B, Hq, Tq, D), normalised over the blocks seen so far
        lse = torch.full(qf.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack((k, v))  # (2, B, Tk, Hkv, D): one message per hop
        for step in range(cp):
            if step < cp - 1:  # fetch the next block while this one is computed
                next_kv, works = _ring_shift(kv, group, rank, cp)
            mask = _block_mask(q_pos, kv_pos, q_doc, kv_doc, spec, (rank - step) % cp)
            if (
                mask is None or mask.any()
            ):  # blocks entirely in the future of every query cost nothing
                kb, vb = _kv_block(kv, groups)
                s = _block_scores(qf, kb, mask, scale)
                blk_lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Tq)
                blk_out = torch.exp(s - _finite(blk_lse)[..., None]) @ vb
                new_lse = torch.logaddexp(lse, blk_lse)  # -inf only where both are
                keep, add = (torch.exp(x - _finite(new_lse))[..., None] for x in (lse, blk_lse))
                out, lse = out * keep + blk_out * add, new_lse
            if step < cp - 1:
                _wait(works)
                kv = next_kv
        # The float32 output keeps rowsum(dO * O) in the backward as exact as the forward.
        ctx.save_for_backward(q, k, v, q_pos, kv_pos, out, lse)
        ctx.docs, ctx.spec, ctx.group, ctx.rank, ctx.cp = (q_doc, kv_doc), spec, group, rank, cp
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_pos, kv_pos, out, lse = ctx.saved_tensors
        group, rank, cp = ctx.group, ctx.rank, ctx.cp
        scale, groups = q.shape[-1] ** -0.5, q.shape[2] // k.shape[2]
        qf = q.transpose(1, 2).float()  # (B, Hq, Tq, D)
        do = grad_out.transpose(1, 2).float()  # (B, Hq, Tq, D)
        dsum = (do * out).sum(-1, keepdim=True)  # (B, Hq, Tq, 1)
        lse = _finite(lse)[..., None]
        dq = torch.zeros_like(qf)
        kv = torch.stack((k, v))  # (2, B, Tk, Hkv, D)
        # dK/dV of the block now held, travelling with it: (2, B, Hkv, Tk, D)
        dkv = torch.zeros(2, *k.transpose(1, 2).shape, dtype=torch.float32, device=k.device)
        for step in range(cp):
            if step < cp - 1:
                next_kv, works = _ring_shift(kv, group, rank, cp)
            mask = _block_mask(q_pos, kv_pos, *ctx.docs, ctx.spec, (rank - step) % cp)
            if mask is None or mask.any():  # the same blocks as the forward skipped
                kb, vb = _kv_block(kv, groups)
                p = torch.exp(_block_scores(qf, kb, mask, scale) - lse)  # (B, Hq, Tq, Tk)
                ds = p * (do @ vb.transpose(-1, -2) - dsum)
                dq += scale * ds @ kb
                dkv[0] += _sum_groups(scale * ds.transpose(-1, -2) @ qf, groups)
                dkv[1] += _sum_groups(p.transpose(-1, -2) @ do, groups)
            if step < cp - 1:
                _wait(works)
                kv = next_kv
            if cp > 1:  # after the last hop each rank holds the finished dK/dV of its own block
                dkv, dkv_works = _ring_shift(dkv, group, rank, cp)
                _wait(dkv_works)
        dk, dv = dkv.transpose(2, 3)  # (B, Tk, Hkv, D)
        return (
            dq.transpose(1, 2).to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            *(None,) * 9,
        )


class RingAttention:
    """Context-parallel ring attention: K/V blocks travel round the group, q stays put.

    q (B, T_local, Hq, D), k and v (B, T_local, Hkv, D) with Hq a multiple of Hkv, positions
    (B, T_local) global positions of the local tokens; every rank must hold the same T_local.
    Returns (B, T_local, Hq, D). Computes in float32 and casts back to the input dtype.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank, self.size = _rank_and_size(group)

    def __call__(self, q, k, v, *, layer_idx, attn: AttentionInputs):
        kv_pos = _gather_tokens(attn.positions, self.group, self.size)  # (cp, B, T_local)
        kv_doc = _gather_tokens(attn.document_ids, self.group, self.size)
        return _RingAttentionFn.apply(
            q,
            k,
            v,
            attn.positions,
            kv_pos,
            attn.document_ids,
            kv_doc,
            attn.spec,
            self.group,
            self.rank,
            self.size,
        )


def context_parallel_backend(mode: str, group: dist.ProcessGroup | None) -> AttentionBackend:
    """The attention backend for context-parallel `mode` ("ulysses" or "ring") over `group`."""
    if mode == "ulysses":
        return UlyssesAttention(group)
    if mode == "ring":
        return RingAttention(group)
    raise UserError(f"context-parallel mode {mode!r} is not one of {', '.join(CP_MODES)}")
