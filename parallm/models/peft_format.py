"""LoRA adapters on disk in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

A tensor's key is peft's: `base_model.model.` + the Hugging Face key of the parameter
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a saved module's weight as
`base_model.model.lm_head.weight`). So `peft.PeftModel.from_pretrained(hf_model, dir)` loads what
parallm writes, and parallm reads what peft writes. Reading needs neither peft nor transformers.

`read_adapter` checks an adapter against the base model it is for (names, sizes, rank, which
layers `target_modules` picks) before anything is built; `load_model_with_adapter` gives a parallm
model with the adapter's LoRA layers, `start_adapter` the adapter a training run starts from, and
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
from torch import nn

from parallm.errors import UserError
from parallm.models.build import copy_local_shard
from parallm.models.hf import load_pretrained, read_args
from parallm.models.lora import LoraSpec, apply_lora, check_targets, fill_adapter, is_lora_param
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
    """Read a peft LoRA directory for a base model of `args`, checking it against that base: every
    tensor adapts a module the base has, with the base's sizes and the config's rank, and the
    config's `target_modules` pick exactly the adapted modules (a UserError naming `field`)."""
    d = Path(path)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise UserError(
            f"{field}: {str(d)!r} is not a LoRA adapter directory; it needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (as peft's save_pretrained writes them)"
        )
    cfg = read_json(d / CONFIG_FILE)
    spec = _spec_from_config(cfg, d / CONFIG_FILE, field)
    hf = family_of_args(args).hf
    tensors = {}
    for key, tensor in _load_tensors(d / WEIGHTS_FILE, field).items():
        name = hf.parallm_key(key.removeprefix(PREFIX))
        if name is None:
            continue
        # peft saves an embedding it adapts whole under its wrapper's name (`base_layer.`).
        tensors[name.replace(".default.", ".").replace("base_layer.", "")] = tensor
    adapter = Adapter(spec=spec, tensors=tensors, base_model=cfg.get("base_model_name_or_path"))
    _check_against_base(adapter, args, d, field)
    return adapter


def _load_tensors(path: Path, field: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError or OSError
        raise UserError(
            f"{field}: {path} is not a readable safetensors file ({e}); it may be truncated"
        ) from None


# peft options that change which modules are adapted or how; parallm reads plain LoRA only.
_UNSUPPORTED = (
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "use_qalora",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "exclude_modules",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
)


def _spec_from_config(cfg: dict, source: Path, field: str) -> LoraSpec:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{field}: {source} describes a {cfg['peft_type']} adapter; only LORA is supported"
        )
    for option in _UNSUPPORTED:
        if cfg.get(option):
            raise UserError(
                f"{field}: {source} sets {option}={cfg[option]!r}, which parallm does not "
                "support; valid: a plain LoRA adapter (peft's defaults for that option)"
            )
    if cfg.get("bias", "none") != "none":
        raise UserError(
            f"{field}: {source} sets bias={cfg['bias']!r}; parallm supports only bias='none'"
        )
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{field}: {source} has r={r!r}; the rank must be an integer >= 1")
    alpha = cfg.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise UserError(f"{field}: {source} has lora_alpha={alpha!r}; it must be a number > 0")
    targets = cfg.get("target_modules")
    if not targets or not isinstance(targets, str | list):
        raise UserError(
            f"{field}: {source} has target_modules={targets!r}; valid: a list of module names, "
            "a regular expression or 'all-linear'"
        )
    return LoraSpec(
        r=r,
        alpha=float(alpha),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        use_rslora=bool(cfg.get("use_rslora", False)),
    )


def _check_against_base(adapter: Adapter, args: Any, d: Path, field: str) -> None:
    """Every adapter tensor belongs to a module of the base, with the base's sizes and the rank
    the config states, and the config's `target_modules` pick exactly the adapted modules."""
    spec, family = adapter.spec, family_of_args(args)
    model = family.build(args)
    base = dict(model.named_parameters(remove_duplicate=False))
    tied = family.tied(args)
    made_for = f" ({adapter.base_model})" if adapter.base_model else ""
    other_base = f"the adapter was made for another base model{made_for}"
    if not any(is_lora_param(n) for n in adapter.tensors):
        raise UserError(f"{field}: {d}/{WEIGHTS_FILE} holds no lora_A / lora_B tensors")
    for name, tensor in sorted(adapter.tensors.items()):
        if ".lora_" in name and not is_lora_param(name):  # lora_embedding_A, lora_magnitude...
            raise UserError(
                f"{field}: {WEIGHTS_FILE} holds {name}; parallm supports LoRA on linear layers "
                "only (lora_A / lora_B)"
            )
        if not is_lora_param(name):
            if name not in base:
                raise UserError(
                    f"{field}: {WEIGHTS_FILE} saves {name} whole, which the base model does not "
                    f"have; {other_base}"
                )
            if name in tied:
                raise UserError(
                    f"{field}: {WEIGHTS_FILE} saves {name} whole, but the base model ties it to "
                    f"{tied[name]} (tie_word_embeddings); parallm cannot untie them"
                )
            want = tuple(base[name].shape)
            if tuple(tensor.shape) != want:
                raise UserError(
                    f"{field}: {WEIGHTS_FILE} saves {name} with shape {list(tensor.shape)}, but "
                    f"the base model's is {list(want)}; {other_base}"
                )
            continue
        _check_lora_tensor(name, tensor, base, spec.r, field, other_base)
    _check_coverage(adapter, model, field, other_base)


def _check_lora_tensor(
    name: str, tensor: torch.Tensor, base: dict, r: int, field: str, other_base: str
) -> None:
    """`lora_A` is (r, in_features) and `lora_B` (out_features, r) of the module it adapts."""
    module, _, part = name.rpartition(".lora_")
    weight = base.get(f"{module}.weight")
    if weight is None:
        raise UserError(
            f"{field}: {name} adapts {module}, which the base model does not have; {other_base}"
        )
    is_a = part.startswith("A")
    out_f, in_f = weight.shape
    shape = tuple(tensor.shape)
    if len(shape) != 2:
        raise UserError(f"{field}: {name} has shape {list(shape)}; a LoRA weight is 2-D")
    rank, size = (shape[0], shape[1]) if is_a else (shape[1], shape[0])
    want_size, what = (in_f, "input") if is_a else (out_f, "output")
    if size != want_size:
        raise UserError(
            f"{field}: {name} has shape {list(shape)}: {size} {what} features, but the base "
            f"model's {module} has {want_size}; {other_base}"
        )
    if rank != r:
        raise UserError(
            f"{field}: {name} has shape {list(shape)}, which is rank {rank}, but {CONFIG_FILE} "
            f"says r={r}; the config and the weights disagree"
        )


def _check_coverage(adapter: Adapter, model: Any, field: str, other_base: str) -> None:
    """The modules `target_modules` picks in the base are the ones with both A and B tensors."""
    targets = set(adapter.spec.targets(model))
    names = set(adapter.tensors)
    adapted = set(adapted_modules(adapter))
    shown = _show_targets(adapter.spec)
    if not targets:
        raise UserError(
            f"{field}: target_modules {shown} in {CONFIG_FILE} match no linear layer of the "
            f"base model; {other_base}"
        )
    for module in sorted(adapted | targets):
        for part in ("lora_A", "lora_B"):
            if f"{module}.{part}.weight" not in names:
                raise UserError(
                    f"{field}: {WEIGHTS_FILE} has no {module}.{part}.weight, but target_modules "
                    f"{shown} in {CONFIG_FILE} adapt {module}; the config and the weights "
                    "disagree"
                )
        if module not in targets:
            raise UserError(
                f"{field}: {WEIGHTS_FILE} adapts {module}, which target_modules {shown} in "
                f"{CONFIG_FILE} do not pick; the config and the weights disagree"
            )


def _show_targets(spec: LoraSpec) -> str:
    t = spec.target_modules
    return repr(t) if isinstance(t, str) else repr(list(t))


def load_model_with_adapter(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The base model of `model_dir` with the LoRA layers of `adapter_dir` (not merged: the
    adapters stay `LoraLinear` modules, so `adapter_disabled` gives the base back), in eval mode.
    The adapters are float32; the base is in `dtype` (default: the checkpoint's)."""
    adapter = read_adapter(adapter_dir, read_args(model_dir))
    model = load_pretrained(model_dir, dtype=dtype, device=device)
    apply_lora(model, adapter.spec)
    fill_adapter(model, adapter.tensors, fill=copy_local_shard)
    return model.eval()


def start_adapter(spec: LoraSpec, args: Any, init_from: str | None) -> Adapter | None:
    """Check a training run's `[lora]` (as `spec`) against its base model (built on `meta`) and
    read the adapter it starts from (`lora.init_from`), which must be the adapter `spec`
    describes: the same rank, scale, adapted layers and saved modules. Needs no data, so it can
    run before any process is launched."""
    model = family_of_args(args).build(args)
    check_targets(model, spec)
    for name, source in family_of_args(args).tied(args).items():
        for saved in spec.modules_to_save:
            if any(w.split(".")[-2] == saved for w in (name, source)):
                raise UserError(
                    f"lora.modules_to_save: {saved!r} shares its weight with "
                    f"{source if name.split('.')[-2] == saved else name} (tied embeddings), "
                    "which a peft adapter cannot save; leave it out or train without tying"
                )
    if init_from is None:
        return None
    adapter = read_adapter(init_from, args, field="lora.init_from")
    got = adapter.spec
    for option, mine, theirs in (
        ("r", spec.r, got.r),
        ("alpha", spec.alpha, got.alpha),
        ("use_rslora", spec.use_rslora, got.use_rslora),
    ):
        if mine != theirs:
            raise UserError(
                f"lora.init_from: the adapter in {init_from} has {option} = {theirs}, but "
                f"lora.{option} is {mine}; set lora.{option} = {theirs}"
            )
    ours, theirs = set(spec.targets(model)), set(adapted_modules(adapter))
    if ours != theirs:
        diff = sorted(ours ^ theirs)[0]
        where = "lora.target_modules adapts" if diff in ours else "the adapter adapts"
        leaves = sorted({m.rpartition(".")[2] for m in theirs})
        raise UserError(
            f"lora.init_from: {where} {diff}, the other does not; set lora.target_modules = "
            f"{leaves} as the adapter in {init_from} has them"
        )
    if set(got.modules_to_save) != set(spec.modules_to_save):
        raise UserError(
            f"lora.init_from: the adapter in {init_from} has modules_to_save = "
            f"{list(got.modules_to_save)}, but lora.modules_to_save is "
            f"{list(spec.modules_to_save)}; set lora.modules_to_save = {list(got.modules_to_save)}"
        )
    return adapter


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
