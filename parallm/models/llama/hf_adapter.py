"""Hugging Face `config.json` and state-dict names <-> parallm's `ModelArgs` and parameters.

Reads both the transformers 4 layout (`rope_theta` + `rope_scaling`) and the transformers 5 one
(`rope_parameters`), and writes the 4 layout, which both versions load.
"""

from __future__ import annotations

from typing import Any

from parallm.errors import UserError
from parallm.models.llama.model import ModelArgs
from parallm.models.registry import model_type_of

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _require(cfg: dict, key: str, source: str) -> Any:
    if key not in cfg:
        raise UserError(f"{source}: missing required field '{key}'")
    return cfg[key]


def _rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params or None
    if scaling is None:
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(
            f"{source}: rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    for key in _ROPE_KEYS.get(kind, ()):
        _require(scaling, key, f"{source} rope_scaling ({kind})")
    if kind == "default":
        return theta, None
    return theta, {"rope_type": kind, **{k: scaling[k] for k in _ROPE_KEYS[kind]}}


def _sliding_windows(cfg: dict, family: str, n_layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    if window is None:
        return [None] * n_layers
    if family == "mistral":
        return [window] * n_layers
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window", False):
        types = cfg.get("layer_types")
        if types is None:  # transformers 4: layers from max_window_layers on use the window
            start = cfg.get("max_window_layers", n_layers)
            types = [
                "sliding_attention" if i >= start else "full_attention" for i in range(n_layers)
            ]
        return [window if t == "sliding_attention" else None for t in types]
    return [None] * n_layers  # Llama has no window; Qwen lists one it does not use


def args_from_hf(cfg: dict, source: str = "config.json") -> ModelArgs:
    """Build `ModelArgs` from a HF config dict; a UserError names any missing or bad field."""
    family = model_type_of(cfg, source)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported; only 'silu'")
    dim = int(_require(cfg, "hidden_size", source))
    n_layers = int(_require(cfg, "num_hidden_layers", source))
    n_heads = int(_require(cfg, "num_attention_heads", source))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or dim // n_heads)
    if n_heads % n_kv:
        raise UserError(
            f"{source}: num_attention_heads={n_heads} must be a multiple of "
            f"num_key_value_heads={n_kv}"
        )
    theta, scaling = _rope(cfg, source)
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        architecture=family,
        vocab_size=int(_require(cfg, "vocab_size", source)),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=int(_require(cfg, "intermediate_size", source)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and none on o_proj; Llama/Qwen3 put one flag on all four.
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        sliding_windows=_sliding_windows(cfg, family, n_layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )


def args_to_hf(args: ModelArgs, dtype: str) -> dict:
    """A `config.json` dict that transformers loads into the same model."""
    family = args.architecture
    cfg: dict[str, Any] = {
        "architectures": [MODEL_TYPES[family]],
        "model_type": family,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.initializer_range,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if family in ("llama", "qwen3"):
        cfg["attention_bias"] = args.qkv_bias
    if family == "llama":
        cfg["mlp_bias"] = args.mlp_bias
    windows = {w for w in args.sliding_windows if w is not None}
    cfg["sliding_window"] = windows.pop() if windows else None
    if family in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = cfg["sliding_window"] is not None
        cfg["layer_types"] = [
            "full_attention" if w is None else "sliding_attention" for w in args.sliding_windows
        ]
        cfg["max_window_layers"] = args.n_layers
    return cfg


def hf_key(name: str) -> str:
    """parallm parameter name -> HF checkpoint key."""
    return name if name == "lm_head.weight" else f"model.{name}"


def parallm_key(key: str) -> str | None:
    """HF checkpoint key -> parallm parameter name; None for keys that carry nothing (inv_freq)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    return key.removeprefix("model.")
