"""STDiT3: Open-Sora v1.2's spatial-temporal diffusion transformer for video.

A plain `nn.Module` with no distributed code, computing Open-Sora v1.2's `STDiT3.forward` (eval
mode) on its parameter names, so `model.safetensors` files of either load into the other
unchanged. Each of the `depth` steps is a spatial block (attention within a frame over its `S`
patch tokens) then a temporal block (attention across the `T` frames at one patch position, with
rotary positions); every block then cross-attends to the caption and runs a gated MLP, all
modulated by the timestep (adaLN-single: one `t_block` shared by every block plus a per-block
`scale_shift_table`).

Sequence parallelism is applied from outside: `spatial_shard` keeps one rank's slice of the
spatial tokens and `default_backend` (a context-parallel attention backend) makes the spatial
attention see every rank's keys; temporal attention and cross-attention need no communication.

`temporal_pos_embed` (off for Open-Sora v1.2 checkpoints, which have none) adds a fixed
sine-cosine embedding of the frame index to the patch tokens, as Open-Sora v1.0's STDiT did.

Activations are kept as (B, T, S, C) between blocks (Open-Sora flattens them to (B, T*S, C); the
token order is the same).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallm.models.attention import AttentionBackend, AttentionInputs, AttentionSpec

FREQ_DIM = 256  # sinusoid size of the timestep and fps embedders
DEFAULT_FPS = 24.0  # Open-Sora v1.2's inference default, used when `fps` is not given
NORM_EPS = 1e-6


@dataclass(kw_only=True)
class STDiTArgs:
    """Shape of one STDiT3; the names are Open-Sora's `STDiT3Config` fields (`config.json`)."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    caption_channels: int = 4096
    model_max_length: int = 300
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    pred_sigma: bool = False
    input_sq_size: int = 512
    class_dropout_prob: float = 0.1  # carried in config.json; parallm drops captions in the task
    # parallm extension (0 in Open-Sora checkpoints): a small trainable caption encoder inside
    # the model; `y` is then token ids (B, L) instead of embeddings.
    caption_vocab_size: int = 0
    caption_encoder_layers: int = 2
    # parallm extension (off in Open-Sora v1.2 checkpoints): a fixed 1-D sine-cosine embedding of
    # the frame index added to every patch token with the 2-D one (Open-Sora v1.0's STDiT had
    # this `pos_embed_temporal`, added to its first temporal attention's input). Rotary temporal
    # attention only sees frame offsets, so without it nothing tells frame 0 from frame T-1
    # where the input does not (pure noise).
    temporal_pos_embed: bool = False

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        assert len(self.patch_size) == 3, "patch_size is (pt, ph, pw)"
        assert self.hidden_size % self.num_heads == 0, "hidden_size must divide into heads"
        assert self.hidden_size % 4 == 0, "the 2-D position embedding needs hidden_size % 4 == 0"
        assert self.head_dim % 2 == 0, "rotary embedding needs an even head_dim"

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @property
    def caption_heads(self) -> int:
        """Heads of the trainable caption encoder: the most of 8, 4, 2, 1 that divide Cy."""
        return next(h for h in (8, 4, 2, 1) if self.caption_channels % h == 0)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count without building the model; `embeddings=False` leaves out the null
        caption and the caption encoder's token and position tables."""
        h, c, f = self.hidden_size, self.caption_channels, self.mlp_hidden
        attn = 3 * h * h + 3 * h + h * h + h + (2 * self.head_dim if self.qk_norm else 0)
        cross = 4 * h * h + 4 * h
        block = 6 * h + attn + cross + h * f + f + f * h + h
        embedder = FREQ_DIM * h + h + h * h + h
        total = 2 * self.depth * block + 2 * embedder + 6 * h * h + 6 * h
        total += h * self.in_channels * self.patch_volume + h  # x_embedder
        total += c * h + h + h * h + h  # y_proj
        total += (
            2 * h
            + h * self.patch_volume * self.out_channels
            + self.patch_volume * self.out_channels
        )
        total += self.head_dim // 2  # rope.freqs
        if self.caption_vocab_size:
            layer = 4 * c + 3 * c * c + 3 * c + c * c + c + 8 * c * c + 4 * c + c
            total += self.caption_encoder_layers * layer + 2 * c
        if embeddings:
            total += self.model_max_length * c  # y_embedding
            if self.caption_vocab_size:
                total += (self.caption_vocab_size + self.model_max_length) * c
        return total


def initial_value(name: str, shape: tuple[int, ...], args: STDiTArgs, seed: int) -> torch.Tensor:
    """The initial value of parameter `name` (float32, CPU), a function of (seed, name) only.

    Follows Open-Sora's `initialize_weights`: Xavier-uniform linear weights and zero biases;
    adaLN tables and the null caption randn / sqrt(width); the fps embedder's first layer
    N(0, 0.02) and its last zero; the temporal blocks' attention, cross-attention and MLP output
    projections zero (each starts as the identity); `rope.freqs` exact; norms ones. The patch
    convolution keeps PyTorch's default weight range (uniform +-1/sqrt(fan_in)), bias zero.
    """
    if name == "rope.freqs":
        return rope_freqs(args.head_dim)
    if re.search(r"norm\d?\.weight$", name):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    zero = ("attn.proj.weight", "cross_attn.proj.weight", "mlp.fc2.weight")
    if name == "fps_embedder.mlp.2.weight" or (
        name.startswith("temporal_blocks.") and name.endswith(zero)
    ):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("scale_shift_table") or name == "y_embedder.y_embedding":
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    if name in ("fps_embedder.mlp.0.weight", "caption_encoder.embed.weight", "caption_encoder.pos"):
        return torch.empty(shape).normal_(0.0, 0.02, generator=gen)
    if name == "x_embedder.proj.weight":
        bound = 1.0 / math.prod(shape[1:]) ** 0.5
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    bound = (6.0 / (shape[0] + shape[1])) ** 0.5  # Xavier uniform of a (out, in) weight
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def rope_freqs(head_dim: int) -> torch.Tensor:
    """rotary-embedding-torch's frequencies: 1 / 10000^(2i / head_dim), i < head_dim / 2."""
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))


# ---------------------------------------------------------------------------------------------
# Embeddings


def sinusoid(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim) float32 [cos, sin] embedding (GLIDE / DiT's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """A scalar per sample (timestep, fps) -> sinusoid -> Linear -> SiLU -> Linear: (B, H)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(t).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, as timm's `Mlp` (Open-Sora's `approx_gelu`)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption embeddings (B, 1, L, Cy) -> (B, 1, L, H); `y_embedding` is the null caption.

    The null caption is a frozen parameter (Open-Sora's buffer) so that checkpoints carry it
    and every loader and sharder handles it like the other weights."""

    def __init__(self, args: STDiTArgs) -> None:
        super().__init__()
        h = args.hidden_size
        self.y_proj = Mlp(args.caption_channels, h, h)
        y_null = torch.empty(args.model_max_length, args.caption_channels)
        self.y_embedding = nn.Parameter(y_null, requires_grad=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


def position_embedding_2d(
    hidden: int, h: int, w: int, scale: float, base_size: int, device, dtype
) -> torch.Tensor:
    """Open-Sora's `PositionEmbedding2D`: (h*w, hidden) for patch (i, j) at token i*w + j.

    Coordinates are arange / scale * base_size / size; the first half of the channels encodes
    the column j, the second the row i, each as [sin, cos] over hidden/4 frequencies."""
    half = hidden // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))
    rows = torch.arange(h, device=device) / scale * (base_size / h)
    cols = torch.arange(w, device=device) / scale * (base_size / w)
    col = cols[None, :].expand(h, w).reshape(-1)
    row = rows[:, None].expand(h, w).reshape(-1)

    def sin_cos(v: torch.Tensor) -> torch.Tensor:
        out = v[:, None] * inv_freq[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

    return torch.cat([sin_cos(col), sin_cos(row)], dim=-1).to(dtype)


def position_embedding_1d(hidden: int, length: int, device, dtype) -> torch.Tensor:
    """Open-Sora v1.0's `get_1d_sincos_pos_embed(hidden, length)`: (length, hidden), position p
    as [sin(p w), cos(p w)] over the hidden/2 frequencies w = 1 / 10000^(i / (hidden/2))."""
    half = hidden // 2
    omega = 1.0 / 10000 ** (torch.arange(half, device=device, dtype=torch.float64) / half)
    out = torch.arange(length, device=device, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=-1).to(dtype)


class Rotary(nn.Module):
    """rotary-embedding-torch's `RotaryEmbedding(dim=head_dim)` as the temporal blocks use it:
    interleaved pairs (channels 2i, 2i+1 rotate together), positions 0..T-1."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.empty(head_dim // 2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, T, heads, D) -> the same, rotated by its position along T."""
        t = x.shape[1]
        # Positions in x's dtype, then the frequencies' (as the library does).
        pos = torch.arange(t, device=x.device, dtype=x.dtype).to(self.freqs.dtype)
        angles = (pos[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)  # (T, D)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, D)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x * cos + rotated * sin).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm (eps 1e-6): variance in float32, the weight times the normed x cast back."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    return weight * normed.to(x.dtype)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


# ---------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    """Self-attention with QK RMSNorm; rotary positions when `rope` is given (temporal)."""

    def __init__(self, args: STDiTArgs) -> None:
        super().__init__()
        h = args.hidden_size
        self.heads, self.head_dim = args.num_heads, args.head_dim
        self.qkv = nn.Linear(h, 3 * h)
        if args.qk_norm:
            self.q_norm = _NormWeight(args.head_dim)
            self.k_norm = _NormWeight(args.head_dim)
        self.proj = nn.Linear(h, h)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: Rotary | None = None,
        backend: AttentionBackend | None = None,
        layer_idx: int = 0,
        attn: AttentionInputs | None = None,
    ) -> torch.Tensor:
        """x (N, T, C) -> (N, T, C); `backend(q, k, v, layer_idx, attn)` replaces plain SDPA."""
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).unbind(2)  # (N, T, h, D)
        if hasattr(self, "q_norm"):
            q, k = rms_norm(q, self.q_norm.weight), rms_norm(k, self.k_norm.weight)
        if rope is not None:
            q, k = rope(q), rope(k)
        if backend is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        else:
            out = backend(q, k, v, layer_idx=layer_idx, attn=attn)
        return self.proj(out.reshape(n, t, c))


class _NormWeight(nn.Module):
    """Holds an RMSNorm's weight under Open-Sora's name (`attn.q_norm.weight`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))


class CrossAttention(nn.Module):
    """Every patch token of a sample attends to that sample's caption tokens where the caption
    mask is non-zero (Open-Sora's block-diagonal attention over the selected tokens)."""

    def __init__(self, args: STDiTArgs) -> None:
        super().__init__()
        h = args.hidden_size
        self.heads, self.head_dim = args.num_heads, args.head_dim
        self.q_linear = nn.Linear(h, h)
        self.kv_linear = nn.Linear(h, 2 * h)
        self.proj = nn.Linear(h, h)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, T, S, C); y (B, L, C); y_mask (B, L) bool or None (all tokens)."""
        b, t, s, c = x.shape
        q = self.q_linear(x).view(b, t * s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(y).view(b, -1, 2, self.heads, self.head_dim).unbind(2)
        mask, empty = None, None
        if y_mask is not None:
            empty = ~y_mask.any(dim=1)  # a caption without tokens: attention contributes 0
            mask = (y_mask | empty[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), mask)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, s, c))


def _modulation(table: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """adaLN-single: table (k, H) + t (B, k*H) -> k tensors (B, 1, 1, H)."""
    mods = table[None] + t.reshape(t.shape[0], table.shape[0], -1)
    return [m[:, None, None] for m in mods.unbind(1)]


def _per_frame(x_mask: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor | None):
    """Where x_mask (B, T) is True `a`, else `b` (both (B, T, S, C)): Open-Sora's t_mask_select."""
    return a if x_mask is None else torch.where(x_mask[:, :, None, None], a, b)


class STDiT3Block(nn.Module):
    """One spatial or temporal block (the two differ only in what the attention runs over)."""

    def __init__(self, args: STDiTArgs, *, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.attn = Attention(args)
        self.cross_attn = CrossAttention(args)
        self.mlp = Mlp(args.hidden_size, args.mlp_hidden)
        self.scale_shift_table = nn.Parameter(torch.empty(6, args.hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor | None,
        t_mlp: torch.Tensor,
        t0_mlp: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        *,
        rope: Rotary | None = None,
        backend: AttentionBackend | None = None,
        layer_idx: int = 0,
        attn: AttentionInputs | None = None,
    ) -> torch.Tensor:
        """x (B, T, S, C); t_mlp, t0_mlp (B, 6C): the modulation of timestep t and of 0 (frames
        where x_mask (B, T) is False take the latter)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = _modulation(
            self.scale_shift_table, t_mlp
        )
        zero = [None] * 6 if x_mask is None else _modulation(self.scale_shift_table, t0_mlp)
        shift_a0, scale_a0, gate_a0, shift_m0, scale_m0, gate_m0 = zero

        normed = layer_norm(x)
        h = _per_frame(
            x_mask,
            normed * (1 + scale_a) + shift_a,
            None if x_mask is None else normed * (1 + scale_a0) + shift_a0,
        )
        b, t, s, c = h.shape
        if self.temporal:
            h = h.transpose(1, 2).reshape(b * s, t, c)
            h = self.attn(h, rope=rope).view(b, s, t, c).transpose(1, 2)
        else:
            h = self.attn(h.reshape(b * t, s, c), backend=backend, layer_idx=layer_idx, attn=attn)
            h = h.view(b, t, s, c)
        x = x + _per_frame(x_mask, gate_a * h, None if x_mask is None else gate_a0 * h)

        x = x + self.cross_attn(x, y, y_mask)

        normed = layer_norm(x)
        h = _per_frame(
            x_mask,
            normed * (1 + scale_m) + shift_m,
            None if x_mask is None else normed * (1 + scale_m0) + shift_m0,
        )
        h = self.mlp(h)
        return x + _per_frame(x_mask, gate_m * h, None if x_mask is None else gate_m0 * h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale from the timestep embedding itself) -> linear to patch values."""

    def __init__(self, args: STDiTArgs) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(2, args.hidden_size))
        self.linear = nn.Linear(args.hidden_size, args.patch_volume * args.out_channels)

    def forward(self, x, t, x_mask=None, t0=None) -> torch.Tensor:
        shift, scale = _modulation(self.scale_shift_table, t.repeat(1, 2))
        x = layer_norm(x) * (1 + scale) + shift
        if x_mask is not None:
            shift0, scale0 = _modulation(self.scale_shift_table, t0.repeat(1, 2))
            # Open-Sora normalises the already-modulated x for the t0 frames; kept for parity.
            x = _per_frame(x_mask, x, layer_norm(x) * (1 + scale0) + shift0)
        return self.linear(x)


class CaptionEncoder(nn.Module):
    """parallm's trainable caption encoder (`caption_vocab_size > 0`): token ids (B, L) ->
    (B, 1, L, Cy) through token + learned position embeddings and bidirectional pre-norm
    transformer layers that attend only to the caption's real tokens."""

    def __init__(self, args: STDiTArgs) -> None:
        super().__init__()
        c = args.caption_channels
        self.heads = args.caption_heads
        self.embed = nn.Embedding(args.caption_vocab_size, c)
        self.pos = nn.Parameter(torch.empty(args.model_max_length, c))
        self.layers = nn.ModuleList(
            _EncoderLayer(c, self.heads) for _ in range(args.caption_encoder_layers)
        )
        self.norm = nn.LayerNorm(c)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n = ids.shape
        x = self.embed(ids) + self.pos[:n]
        key_mask = None
        if mask is not None:
            real = mask != 0
            key_mask = (real | ~real.any(dim=1, keepdim=True))[:, None, None, :]  # (B, 1, 1, L)
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.norm(x)[:, None]


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, key_mask).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# The model


class STDiT3(nn.Module):
    """Open-Sora v1.2's STDiT3 (parameter names unchanged). See the module docstring."""

    def __init__(self, args: STDiTArgs) -> None:
        super().__init__()
        self.args = args
        h = args.hidden_size
        self.default_backend: AttentionBackend | None = None
        self.spatial_shard: tuple[int, int] | None = None
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(
            args.in_channels, h, kernel_size=args.patch_size, stride=args.patch_size
        )
        self.t_embedder = ScalarEmbedder(h)
        self.fps_embedder = ScalarEmbedder(h)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
        self.y_embedder = CaptionEmbedder(args)
        if args.caption_vocab_size:
            self.caption_encoder = CaptionEncoder(args)
        self.rope = Rotary(args.head_dim)
        self.spatial_blocks = nn.ModuleDict(
            {str(i): STDiT3Block(args, temporal=False) for i in range(args.depth)}
        )
        self.temporal_blocks = nn.ModuleDict(
            {str(i): STDiT3Block(args, temporal=True) for i in range(args.depth)}
        )
        self.final_layer = FinalLayer(args)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Nothing to recompute: the model has no non-persistent buffers."""

    def null_caption(self, batch: int) -> torch.Tensor:
        """The null caption (batch, 1, L, Cy) for classifier-free guidance."""
        y = self.y_embedder.y_embedding
        return y[None, None].expand(batch, 1, *y.shape)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        drop_caption: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Open-Sora v1.2's STDiT3.forward (eval mode).

        x (B, C, T, H, W); timestep (B,) in [0, 1000]; y (B, 1, L, Cy) caption embeddings, or
        (B, L) token ids with `caption_vocab_size > 0`; mask (B, L) caption mask (non-zero = a
        real token; None = all); x_mask (B, T') bool over patch frames (T' = T / pt, T when
        pt = 1), False = a conditioning frame that gets timestep 0; fps (B,) (None = 24); height, width (B,) pixel size of the video for the
        position-embedding scale (None = x's own size); drop_caption (B,) bool: those samples'
        captions are replaced by the null caption (their mask is kept, as Open-Sora's
        token_drop does). Returns (B, Co, T, H, W) float32, cropped to the input size.
        """
        assert self.spatial_shard is None, "forward() needs every spatial token; use forward_tokens"
        out = self.forward_tokens(x, timestep, y, mask, x_mask, fps, height, width, drop_caption)
        return self.unpatchify(out, tuple(x.shape[2:]))

    def forward_tokens(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        drop_caption: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` before unpatchify: (B, T', S_local, pt*ph*pw*Co) float32 for this rank's
        spatial tokens (all of them when `spatial_shard` is None)."""
        dtype = self.x_embedder.proj.weight.dtype
        b = x.shape[0]
        x, timestep = x.to(dtype), timestep.to(dtype)
        tx, hx, wx = x.shape[2:]
        _, hp, wp = self.grid((tx, hx, wx))
        s = hp * wp

        # Timestep (+ fps) embedding and the blocks' shared modulation.
        fps = torch.full((b,), DEFAULT_FPS, device=x.device) if fps is None else fps
        fps = torch.as_tensor(fps, device=x.device).reshape(-1).expand(b)
        fps_emb = self.fps_embedder(fps)
        t = self.t_embedder(timestep) + fps_emb  # (B, H)
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = x_mask.to(device=x.device, dtype=torch.bool)
            t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
            t0_mlp = self.t_block(t0)

        y, y_mask = self._caption(y, mask, b, drop_caption, dtype)

        # Patches + 2-D position embedding, then this rank's spatial tokens.
        h = self.x_embedder.proj(_pad_to(x, self.args.patch_size))  # (B, H, T', hp, wp)
        h = h.flatten(3).permute(0, 2, 3, 1)  # (B, T', S, H)
        ph = hx if height is None else float(torch.as_tensor(height).reshape(-1)[0])
        pw = wx if width is None else float(torch.as_tensor(width).reshape(-1)[0])
        scale = (ph * pw) ** 0.5 / self.args.input_sq_size
        h = h + position_embedding_2d(
            self.args.hidden_size, hp, wp, scale, round(s**0.5), x.device, h.dtype
        )
        if self.args.temporal_pos_embed:
            frames = position_embedding_1d(self.args.hidden_size, h.shape[1], x.device, h.dtype)
            h = h + frames[:, None]  # (T', 1, H): the same for every patch of a frame
        lo, hi = self.shard_range(s)
        h = h[:, :, lo:hi]
        attn = None
        if self.default_backend is not None:
            positions = torch.arange(lo, hi, device=x.device).expand(b * h.shape[1], hi - lo)
            attn = AttentionInputs(positions, AttentionSpec(causal=False))

        for i in range(self.args.depth):
            h = self.spatial_blocks[str(i)](
                h, y, y_mask, t_mlp, t0_mlp, x_mask,
                backend=self.default_backend, layer_idx=i, attn=attn,
            )  # fmt: skip
            h = self.temporal_blocks[str(i)](h, y, y_mask, t_mlp, t0_mlp, x_mask, rope=self.rope)
        return self.final_layer(h, t, x_mask, t0).float()

    def _caption(self, y, mask, batch, drop, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption tokens (B, L, H) for cross-attention and their mask (B, L) bool (or None)."""
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
            if mask.shape[0] != batch:  # one mask for a batch repeated (guidance doubles it)
                mask = mask.repeat(batch // mask.shape[0], 1)
        if y.dim() == 2:
            assert self.args.caption_vocab_size, "token-id captions need caption_vocab_size > 0"
            y = self.caption_encoder(y, mask)
        y = y.to(dtype)
        if drop is not None:
            null = self.y_embedder.y_embedding.to(dtype)[None, None]
            y = torch.where(drop.to(y.device).reshape(-1, 1, 1, 1), null, y)
        y = self.y_embedder(y).squeeze(1)  # (B, L, H)
        return y, None if mask is None else mask != 0

    def grid(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Patch grid (T', H', W') of an input of size (T, H, W), padded up to the patch."""
        return tuple(-(-n // p) for n, p in zip(size, self.args.patch_size, strict=True))

    def shard_range(self, s: int) -> tuple[int, int]:
        """The spatial tokens [lo, hi) this rank keeps of S."""
        if self.spatial_shard is None:
            return 0, s
        rank, size = self.spatial_shard
        assert s % size == 0, f"{s} spatial tokens do not split over {size} ranks"
        return rank * s // size, (rank + 1) * s // size

    def unpatchify(self, tokens: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """(B, T', S, pt*ph*pw*Co) -> (B, Co, T, H, W), cropped to `size` (T, H, W)."""
        (pt, ph, pw), co = self.args.patch_size, self.args.out_channels
        nt, nh, nw = self.grid(size)
        b = tokens.shape[0]
        v = tokens.reshape(b, nt, nh, nw, pt, ph, pw, co)
        v = v.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, co, nt * pt, nh * ph, nw * pw)
        return v[:, :, : size[0], : size[1], : size[2]]

    def patchify(self, v: torch.Tensor) -> torch.Tensor:
        """(B, Co, T, H, W) -> (B, T', S, pt*ph*pw*Co), in forward_tokens' token and channel
        order (zero-padded up to the patch)."""
        (pt, ph, pw), co = self.args.patch_size, v.shape[1]
        v = _pad_to(v, self.args.patch_size)
        b, _, t, hh, ww = v.shape
        v = v.reshape(b, co, t // pt, pt, hh // ph, ph, ww // pw, pw)
        v = v.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', pt, ph, pw, Co)
        return v.reshape(b, t // pt, (hh // ph) * (ww // pw), pt * ph * pw * co)


def _pad_to(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) at the end of T, H and W up to multiples of the patch."""
    pads = []
    for n, p in zip(reversed(x.shape[2:]), reversed(patch), strict=True):
        pads += [0, -n % p]
    return F.pad(x, pads) if any(pads) else x
