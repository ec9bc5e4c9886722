"""Open-Sora's STDiT3 `config.json` (its `STDiT3Config` fields) <-> `STDiTArgs`; checkpoint names
are Open-Sora's own, so `hf_key` / `parallm_key` are the identity.

Fields that only steer Open-Sora's runtime or training (flash attention, fused layer norm,
sequence parallelism, drop path, freezing) are ignored; a field that changes what the weights
compute is refused with the field named.
"""

from __future__ import annotations

from typing import Any

from parallm.errors import UserError
from parallm.models.registry import model_type_of
from parallm.models.stdit.model import STDiTArgs

ARCHITECTURES = {"STDiT3": "STDiT3"}
MODEL_TYPES = ("STDiT3",)

# STDiT3Config's defaults for fields a config.json may leave out (the shape fields are required).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "patch_size": [1, 2, 2],
    "caption_channels": 4096,
    "model_max_length": 300,
    "mlp_ratio": 4.0,
    "qk_norm": True,
    "pred_sigma": True,
    "input_sq_size": 512,
    "class_dropout_prob": 0.1,
    "caption_vocab_size": 0,
    "caption_encoder_layers": 2,
    "temporal_pos_embed": False,
}
_REQUIRED = ("depth", "hidden_size", "num_heads")
# Open-Sora fields whose non-default value changes the computation parallm implements.
_UNSUPPORTED = {"skip_y_embedder": False}


def _field(cfg: dict, key: str, source: str) -> Any:
    if key in cfg:
        return cfg[key]
    if key in _REQUIRED:
        raise UserError(f"{source}: missing required field '{key}'")
    return _DEFAULTS[key]


def _int(cfg: dict, key: str, source: str, minimum: int = 1) -> int:
    value = _field(cfg, key, source)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{source}: {key}={value!r} is not valid; must be an integer >= {minimum}")
    return value


def args_from_hf(cfg: dict, source: str = "config.json") -> STDiTArgs:
    """`STDiTArgs` from an Open-Sora STDiT3 config dict; a UserError names any bad field."""
    model_type_of(cfg, source)  # an unregistered architecture is refused there
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key, default) != default:
            raise UserError(f"{source}: {key}={cfg[key]!r} is not supported; only {default!r}")
    hidden = _int(cfg, "hidden_size", source)
    heads = _int(cfg, "num_heads", source)
    if hidden % heads:
        raise UserError(f"{source}: hidden_size={hidden} must be divisible by num_heads={heads}")
    if (hidden // heads) % 2:
        raise UserError(
            f"{source}: hidden_size / num_heads = {hidden // heads} must be even (rotary pairs)"
        )
    if hidden % 4:
        raise UserError(
            f"{source}: hidden_size={hidden} must be a multiple of 4 (2-D position embedding)"
        )
    patch = _field(cfg, "patch_size", source)
    if (
        not isinstance(patch, list | tuple)
        or len(patch) != 3
        or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch)
    ):
        raise UserError(f"{source}: patch_size={patch!r} is not valid; must be 3 integers >= 1")
    mlp_ratio = _field(cfg, "mlp_ratio", source)
    if not isinstance(mlp_ratio, int | float) or int(hidden * mlp_ratio) < 1:
        raise UserError(f"{source}: mlp_ratio={mlp_ratio!r} is not valid; must be > 0")
    for key in ("qk_norm", "pred_sigma", "temporal_pos_embed"):
        if not isinstance(_field(cfg, key, source), bool):
            raise UserError(f"{source}: {key}={cfg[key]!r} is not valid; must be true or false")
    return STDiTArgs(
        depth=_int(cfg, "depth", source),
        hidden_size=hidden,
        num_heads=heads,
        in_channels=_int(cfg, "in_channels", source),
        patch_size=tuple(patch),
        caption_channels=_int(cfg, "caption_channels", source),
        model_max_length=_int(cfg, "model_max_length", source),
        mlp_ratio=float(mlp_ratio),
        qk_norm=_field(cfg, "qk_norm", source),
        pred_sigma=_field(cfg, "pred_sigma", source),
        input_sq_size=_int(cfg, "input_sq_size", source),
        class_dropout_prob=float(_field(cfg, "class_dropout_prob", source)),
        caption_vocab_size=_int(cfg, "caption_vocab_size", source, minimum=0),
        caption_encoder_layers=_int(cfg, "caption_encoder_layers", source, minimum=0),
        temporal_pos_embed=_field(cfg, "temporal_pos_embed", source),
    )


def args_to_hf(args: STDiTArgs, dtype: str) -> dict:
    """A `config.json` dict Open-Sora's `STDiT3Config` reads (plus parallm's caption encoder
    fields, 0 / ignored for an Open-Sora model, and `temporal_pos_embed`, written only when on,
    since Open-Sora v1.2 has no such embedding)."""
    extra = {"temporal_pos_embed": True} if args.temporal_pos_embed else {}
    return {
        "architectures": ["STDiT3"],
        "model_type": "STDiT3",
        "depth": args.depth,
        "hidden_size": args.hidden_size,
        "num_heads": args.num_heads,
        "in_channels": args.in_channels,
        "patch_size": list(args.patch_size),
        "caption_channels": args.caption_channels,
        "model_max_length": args.model_max_length,
        "mlp_ratio": args.mlp_ratio,
        "qk_norm": args.qk_norm,
        "pred_sigma": args.pred_sigma,
        "input_sq_size": args.input_sq_size,
        "class_dropout_prob": args.class_dropout_prob,
        "caption_vocab_size": args.caption_vocab_size,
        "caption_encoder_layers": args.caption_encoder_layers,
        "torch_dtype": dtype,
        # save_state_dict writes these to generation_config.json; a video model has none.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **extra,
    }


def hf_key(name: str) -> str:
    """parallm parameter name -> checkpoint key (Open-Sora's names are parallm's)."""
    return name


# Non-persistent state of Open-Sora's modules, never weights (present only in odd exports).
_NOT_WEIGHTS = ("inv_freq", "cached_freqs", "cached_scales", "dummy")


def parallm_key(key: str) -> str | None:
    """Checkpoint key -> parallm parameter name; None for keys that are not the model's."""
    return None if key.rpartition(".")[2] in _NOT_WEIGHTS else key
