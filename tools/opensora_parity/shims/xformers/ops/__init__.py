# SHIM of xformers.ops.memory_efficient_attention + fmha.BlockDiagonalMask.from_seqlens, in plain
# torch, exact semantics for the way Open-Sora v1.2 calls them:
#   q (1, sum(q_seqlen), H, D), k/v (1, sum(kv_seqlen), H, D); block i of queries attends only to
#   block i of keys; softmax scale = D**-0.5 (xformers' default); p = dropout prob (0 in eval: the
#   model has attn_drop 0.0, so p is always 0 here; a nonzero p is refused rather than imitated).
#   attn_bias None = every query attends to every key (xformers semantics).
# Computation is done in the input dtype with torch's math path (matmul + softmax), per block.
import torch

from . import fmha


def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None, scale=None):
    assert p == 0.0, "shim supports p=0 only"
    assert q.shape[0] == 1 and k.shape[0] == 1 and v.shape[0] == 1
    d = q.shape[-1]
    sc = d**-0.5 if scale is None else scale
    if attn_bias is None:
        qb = [(0, q.shape[1])]
        kb = [(0, k.shape[1])]
    else:
        assert isinstance(attn_bias, fmha.BlockDiagonalMask)
        qb, kb = attn_bias.q_blocks, attn_bias.kv_blocks
        assert qb[-1][1] == q.shape[1] and kb[-1][1] == k.shape[1], (qb, kb, q.shape, k.shape)
    outs = []
    for (qs, qe), (ks, ke) in zip(qb, kb, strict=False):
        qq = q[0, qs:qe].transpose(0, 1)  # (H, Nq, D)
        kk = k[0, ks:ke].transpose(0, 1)
        vv = v[0, ks:ke].transpose(0, 1)
        a = (qq @ kk.transpose(-1, -2)) * sc
        a = a.softmax(dim=-1)
        outs.append((a @ vv).transpose(0, 1))  # (Nq, H, D)
    return torch.cat(outs, dim=0)[None]
