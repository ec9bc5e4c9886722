"""The Llama-family decoder: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3.

A plain `nn.Module` with no distributed code. Parallelism is applied afterwards by functions that
shard or cut it; attention goes through an `AttentionBackend` so training (SDPA), the KV-cache
generation path, the serving engine and context-parallel attention all share this file.

Parameter names mirror the Hugging Face layout (`layers.0.self_attn.q_proj.weight`), so the state
dict adapter only adds or removes the `model.` prefix.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from parallm.models.attention import AttentionBackend, AttentionInputs, AttentionSpec, SDPAAttention


@dataclass(kw_only=True)
class ModelArgs:
    """Shape and numerics of one decoder; `hf_adapter` maps it to and from `config.json`."""

    architecture: str = "llama"  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling / rope_parameters minus rope_theta
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: None for full attention, else the window size (Mistral, Qwen sliding layers).
    sliding_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.n_layers
        assert len(self.sliding_windows) == self.n_layers, "one sliding window entry per layer"
        assert self.n_heads % self.n_kv_heads == 0, "query heads must be a multiple of kv heads"

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count without building the model (tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        attn += self.n_heads * self.head_dim * self.dim
        attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        attn += self.dim if self.o_bias else 0
        attn += 2 * self.head_dim if self.qk_norm else 0
        mlp = 3 * self.dim * self.ffn_dim + ((2 * self.ffn_dim + self.dim) if self.mlp_bias else 0)
        total = self.n_layers * (attn + mlp + 2 * self.dim) + self.dim
        if embeddings:
            total += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return total


def initial_value(name: str, shape: tuple[int, ...], args: ModelArgs, seed: int) -> torch.Tensor:
    """The initial value of parameter `name` (float32, CPU), a function of (seed, name) only."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, args.initializer_range, generator=gen)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama 3 / linear scaling applied as `transformers` does."""
    d = args.head_dim
    inv_freq = 1.0 / (
        args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    )
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    else:
        assert kind == "default", f"rope type {kind!r} reached the model unchecked"
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, 1, D) for the rotate-half convention, computed in float32, with the
    first half of sin negated: `apply_rope`'s rotation is then one roll. (B, T, 1, D) broadcasts
    over the heads without a new view per layer."""
    freqs = positions[..., None, None].float() * inv_freq.float()  # (B, T, 1, D/2)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (B, T, 1, D) from `rope_cos_sin`. The rotate-half form
    x * cos + [-x2, x1] * sin, as [x2, x1] * [-sin, sin]: the same products (negation is
    exact), in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# ---------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype == weight.dtype == torch.float32:
            # Torch's own op: the same float32 ops and result (and gradients), in one call.
            return F.rms_norm(x, weight.shape, weight, self.eps)
        # Normalise in float32 and cast back before the weight, as the HF reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)


class Attention(nn.Module):
    # Projections of one input: the engine may run them as one GEMM (inference/packed_linear.py).
    FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"),)

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.sliding_window = args.sliding_windows[layer_idx]
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x, cos, sin, attn: AttentionInputs, backend: AttentionBackend):
        b, t, _ = x.shape
        # Head counts come from the projections so a tensor-parallel shard sees its local heads.
        q = self.q_proj(x).view(b, t, -1, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend(q, k, v, layer_idx=self.layer_idx, attn=attn.for_layer(self.sliding_window))
        return self.o_proj(out.reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    FUSED_LINEARS = (("gate_proj", "up_proj"),)  # as Attention's

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, attn: AttentionInputs, backend: AttentionBackend):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Decoder-only transformer. `model(input_ids)` returns logits (B, T, vocab).

    `embed_tokens`, `norm` and `lm_head` may be set to None by pipeline cutting: a stage without
    `embed_tokens` takes hidden states (B, T, dim) as input, one without `lm_head` returns them.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(args, i) for i in range(args.n_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not persistent: recomputed from args, never part of a checkpoint.
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # The backend a forward without `backend=` uses; context parallelism sets its own.
        self.default_backend: AttentionBackend = SDPAAttention()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers, e.g. after building on `meta` and `to_empty`."""
        device = device if device is not None else self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.args, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        *,
        attention: AttentionSpec | None = None,
        backend: AttentionBackend | None = None,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) token ids, or hidden states (B, T, dim) on a stage without embeddings.

        positions (B, T) default to 0..T-1; document_ids (B, T) mark packed documents for
        `attention` (default: causal) with `documents=True`. Returns logits (B, T, vocab), or
        hidden states on a stage without `lm_head`. `logit_rows` (R,) keeps only those token
        indices before the output head, (B, R, vocab): the serving engine needs the logits of
        one token per sequence, not of every prompt token. A boolean (B, T) `logit_rows` keeps
        the positions it marks, (1, N, vocab) in row-major order (a loss over labelled tokens).
        """
        h = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids
        b, t = h.shape[:2]
        if positions is None:
            positions = torch.arange(t, device=h.device).expand(b, t)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        attn = AttentionInputs(positions, attention or AttentionSpec(), document_ids)
        backend = backend if backend is not None else self.default_backend
        for layer in self.layers.values():
            h = layer(h, cos, sin, attn, backend)
        if logit_rows is not None:
            h = h[logit_rows][None] if logit_rows.dtype == torch.bool else h[:, logit_rows]
        if self.norm is not None:
            h = self.norm(h)
        return self.lm_head(h) if self.lm_head is not None else h
