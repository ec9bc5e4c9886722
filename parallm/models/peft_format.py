"""LoRA adapters on disk in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

A tensor's key is peft's: `base_model.model.` + the Hugging Face key of the parameter
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a saved module's weight as
`base_model.model.lm_head.weight`). So `peft.PeftModel.from_pretrained(hf_model, dir)` loads what
parallm writes, and parallm reads what peft writes. Reading needs neither peft nor transformers.

`merge_adapter` folds an adapter into full base weights (W + B A * scale), for `parallm merge`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from parallm.errors import UserError
from parallm.models.lora import LoraSpec, is_lora_param
from parallm.models.registry import family_of_args
from parallm.utils.fs import atomic_dir, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class Adapter:
    """An adapter: its spec, the base model it names, and its full tensors by parallm name
    (`layers.0.self_attn.q_proj.lora_A.weight`; `lm_head.weight` for a module saved whole)."""

    spec: LoraSpec
    tensors: dict[str, torch.Tensor]
    base_model: str | None = None


def adapter_config(spec: LoraSpec, *, base_model: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` peft writes for `spec` (the fields it needs to load it)."""
    targets = spec.target_modules
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "modules_to_save": list(spec.modules_to_save) or None,
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    adapter: Adapter, args: Any, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Write `adapter` (for a base model of `args`) as a peft directory, atomically."""
    hf = family_of_args(args).hf
    tensors = {
        PREFIX + hf.hf_key(name): t.detach().to("cpu", dtype or t.dtype).contiguous()
        for name, t in adapter.tensors.items()
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = adapter_config(adapter.spec, base_model=adapter.base_model)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(path)


def read_adapter(path: str | os.PathLike, args: Any, *, field: str = "adapter") -> Adapter:
    """Read a peft LoRA directory for a base model of `args`, checking every shape against that
    base (a UserError naming `field` and the mismatch otherwise)."""
    d = Path(path)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise UserError(
            f"{field}: {str(d)!r} is not a LoRA adapter directory; it needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (as peft's save_pretrained writes them)"
        )
    cfg = read_json(d / CONFIG_FILE)
    spec = _spec_from_config(cfg, d, field)
    hf = family_of_args(args).hf
    tensors = {}
    for key, tensor in load_file(str(d / WEIGHTS_FILE)).items():
        name = hf.parallm_key(key.removeprefix(PREFIX))
        if name is None:
            continue
        tensors[name.replace(".default.", ".")] = tensor
    _check_shapes(tensors, spec, args, d, field)
    return Adapter(spec=spec, tensors=tensors, base_model=cfg.get("base_model_name_or_path"))


def _spec_from_config(cfg: dict, d: Path, field: str) -> LoraSpec:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{field}: {d} holds a {cfg['peft_type']} adapter; only LORA is supported")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise UserError(f"{field}: {d} sets {flag}=true, which parallm does not support")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"{field}: {d} uses per-module rank_pattern / alpha_pattern (unsupported)")
    targets = cfg.get("target_modules") or ()
    return LoraSpec(
        r=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", cfg["r"])),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        use_rslora=bool(cfg.get("use_rslora", False)),
    )


def _check_shapes(
    tensors: dict[str, torch.Tensor], spec: LoraSpec, args: Any, d: Path, field: str
) -> None:
    """Every adapter tensor belongs to a module of the base, with the base's sizes and the rank
    the config states."""
    base = dict(family_of_args(args).build(args).named_parameters())
    if not any(is_lora_param(n) for n in tensors):
        raise UserError(f"{field}: {d}/{WEIGHTS_FILE} holds no lora_A / lora_B tensors")
    for name, tensor in tensors.items():
        if not is_lora_param(name):
            if name not in base or tuple(base[name].shape) != tuple(tensor.shape):
                raise UserError(
                    f"{field}: saved module weight {name} {tuple(tensor.shape)} does not match "
                    "the base model; the adapter was trained on another base"
                )
            continue
        module, _, rest = name.rpartition(".lora_")
        weight = base.get(f"{module}.weight")
        if weight is None:
            raise UserError(
                f"{field}: {name} adapts {module}, which the base model does not have; "
                "the adapter was trained on another base"
            )
        out_f, in_f = weight.shape
        want = (spec.r, in_f) if rest.startswith("A") else (out_f, spec.r)
        if tuple(tensor.shape) != want:
            raise UserError(
                f"{field}: {name} has shape {tuple(tensor.shape)}, expected {want} (rank "
                f"r={spec.r} from {CONFIG_FILE}, sizes from the base model); the adapter's base "
                "model or rank does not match"
            )


def adapted_modules(adapter: Adapter) -> list[str]:
    """The module names the adapter changes with a low-rank update."""
    return sorted({n.rpartition(".lora_")[0] for n in adapter.tensors if is_lora_param(n)})


def merge_adapter(state: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
    """Full base weights by parallm name with `adapter` folded in: W + scale * B @ A per adapted
    module, and the saved modules' weights in place of the base's (float32 math)."""
    merged = dict(state)
    for module in adapted_modules(adapter):
        a = adapter.tensors[f"{module}.lora_A.weight"].float()
        b = adapter.tensors[f"{module}.lora_B.weight"].float()
        w = state[f"{module}.weight"]
        merged[f"{module}.weight"] = (w.float() + adapter.spec.scaling * (b @ a)).to(w.dtype)
    for name, tensor in adapter.tensors.items():
        if not is_lora_param(name):
            merged[name] = tensor.to(state[name].dtype)
    return merged
