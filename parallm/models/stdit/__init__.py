"""The STDiT3 family: Open-Sora v1.2's spatial-temporal diffusion transformer for video."""

from typing import Any

from parallm.models.registry import FamilySpec, ModelFacts, register
from parallm.models.stdit import hf_adapter
from parallm.models.stdit.model import STDiT3, STDiTArgs, initial_value
from parallm.models.stdit.plan import PLAN


def _facts(args: STDiTArgs) -> ModelFacts:
    return ModelFacts(
        n_layers=args.depth,
        dim=args.hidden_size,
        n_heads=args.num_heads,
        n_kv_heads=args.num_heads,
        head_dim=args.head_dim,
        ffn_dim=args.mlp_hidden,
        vocab_size=args.caption_vocab_size,
        max_seq_len=args.model_max_length,
        tie_embeddings=False,
        num_params=args.num_params(),
        num_params_no_embed=args.num_params(embeddings=False),
    )


def _flops_per_token(args: STDiTArgs, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per patch token, where `seq_len` is S,
    the patch tokens per frame (the spatial attention's length).

    Counts the matmuls a patch token goes through (patch embedding, per spatial and temporal
    block its qkv, attention and cross-attention query / output projections and MLP, the final
    linear) and the attention scores and values over S spatial keys and the L caption keys.
    Left out as small: the temporal attention's T' keys, and per-sample work (timestep and
    caption embedding, cross-attention keys and values of the caption)."""
    h, f, p = args.hidden_size, args.mlp_hidden, args.patch_volume
    block = 4 * h * h + 2 * h * h + 2 * h * f  # qkv + proj, cross q + proj, fc1 + fc2
    matmul = 2 * args.depth * block + h * args.in_channels * p + h * p * args.out_channels
    attention = 4 * h * (args.depth * seq_len + 2 * args.depth * args.model_max_length)
    return float(6 * matmul + 3 * attention)


def _args_from_config(cfg: Any, vocab_size: int) -> STDiTArgs:
    """A fresh model from the job config: `[model]` (dim -> hidden_size, n_layers -> depth,
    n_heads) and `[video]` (patch, channels, caption_length, caption_channels,
    temporal_pos_embed, text_encoder: "trainable" gives the model its own caption encoder over
    `vocab_size` tokens). Also takes the `[model]` section alone (then the `[video]` defaults
    below apply)."""
    model = getattr(cfg, "model", cfg)
    video = getattr(cfg, "video", None)
    trainable = getattr(video, "text_encoder", "trainable") == "trainable"
    return STDiTArgs(
        depth=model.n_layers,
        hidden_size=model.dim,
        num_heads=model.n_heads,
        in_channels=getattr(video, "channels", 3),
        patch_size=tuple(getattr(video, "patch", (1, 2, 2))),
        caption_channels=getattr(video, "caption_channels", 4096),
        model_max_length=getattr(video, "caption_length", 300),
        caption_vocab_size=vocab_size if trainable else 0,
        temporal_pos_embed=getattr(video, "temporal_pos_embed", False),
    )


SPEC = register(
    FamilySpec(
        name="stdit",
        model_types=hf_adapter.MODEL_TYPES,
        architectures=hf_adapter.ARCHITECTURES,
        args_cls=STDiTArgs,
        model_cls=STDiT3,
        hf=hf_adapter,
        plan=PLAN,
        facts=_facts,
        flops_per_token=_flops_per_token,
        initial_value=initial_value,
        tied=lambda args: {},
        args_from_config=_args_from_config,
        modality="video",
    )
)

__all__ = ["SPEC", "STDiT3", "STDiTArgs"]
