"""Checks the xformers shim against an independent dense formulation (SDPA + boolean mask)."""

import torch
import torch.nn.functional as F
import xformers.ops

torch.manual_seed(0)
for dtype in (torch.float32, torch.float64):
    B, N, heads, D, lens = 3, 5, 4, 8, [4, 1, 7]
    q = torch.randn(1, B * N, heads, D, dtype=dtype)
    k = torch.randn(1, sum(lens), heads, D, dtype=dtype)
    v = torch.randn(1, sum(lens), heads, D, dtype=dtype)
    bias = xformers.ops.fmha.BlockDiagonalMask.from_seqlens([N] * B, lens)
    got = xformers.ops.memory_efficient_attention(q, k, v, p=0.0, attn_bias=bias)
    seg_q = torch.repeat_interleave(torch.arange(B), N)
    seg_k = torch.repeat_interleave(torch.arange(B), torch.tensor(lens))
    m = seg_q[:, None] == seg_k[None, :]
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m
    ).transpose(1, 2)
    full = xformers.ops.memory_efficient_attention(q, k, v)
    want_full = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    print(
        dtype,
        "block-diag max err",
        (got - want).abs().max().item(),
        "| no-bias max err",
        (full - want_full).abs().max().item(),
    )
