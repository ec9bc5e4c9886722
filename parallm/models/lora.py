"""LoRA: low-rank adapters on a model's linear layers, applied from outside like tensor parallelism.

`apply_lora(model, spec)` replaces each targeted `nn.Linear` (on `meta`, before any sharding) with a
`LoraLinear` that holds the frozen layer as `base_layer` and two small layers `lora_A` (r, in) and
`lora_B` (out, r): y = base(x) + B(A(dropout(x))) * alpha / r. These are the module and parameter
names `peft` uses, so an adapter's names in parallm (`layers.0.self_attn.q_proj.lora_A.weight`) are
peft's without its prefix, and `canonical_name` drops `base_layer.` so the base weights keep their
Hugging Face names. Every other parameter is frozen except the `modules_to_save`.

Tensor parallelism (`distributed/parallelize.py`) shards the adapter like its base: a
column-parallel base gets a replicated A and a column-sharded B; a row-parallel base a row-sharded
A and a replicated B, whose partial sums are reduced with the base's. `adapter_disabled(model)`
switches every adapter off (the reference model of DPO and GRPO, without a second copy).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement

from parallm.errors import UserError

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """What an adapter is: rank, scale, which modules it adapts (peft's `LoraConfig` fields).

    `target_modules`: module names or name suffixes (`q_proj` matches `layers.0.self_attn.q_proj`),
    a regular expression the whole name must match (a str), or "all-linear".
    """

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the linear modules of `model` this adapter adapts."""
        head = _output_head_names(model)
        names = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or isinstance(module, _LoraPart):
                continue
            if self.target_modules == ALL_LINEAR:
                hit = name not in head
            elif isinstance(self.target_modules, str):
                hit = any(re.fullmatch(self.target_modules, n) for n in _match_names(model, name))
            else:
                hit = any(name == t or name.endswith(f".{t}") for t in self.target_modules)
            if hit:
                names.append(name)
        return names


def _match_names(model: nn.Module, name: str) -> tuple[str, ...]:
    """The names a regular expression in `target_modules` may match: parallm's, and the Hugging
    Face one (`model.layers.0.self_attn.q_proj`) that peft matched when it made the adapter."""
    args = getattr(model, "args", None)
    if args is None:
        return (name,)
    from parallm.models.registry import family_of_args

    return name, family_of_args(args).hf.hf_key(f"{name}.weight").removesuffix(".weight")


def _output_head_names(model: nn.Module) -> set[str]:
    return {"lm_head"} if getattr(model, "lm_head", None) is not None else set()


class _LoraPart(nn.Linear):
    """`lora_A` / `lora_B`: plain linear layers, marked so they are never targeted themselves."""


class LoraLinear(nn.Module):
    """A frozen linear layer plus a low-rank update (peft's `lora.Linear`, one adapter)."""

    def __init__(self, base_layer: nn.Linear, spec: LoraSpec) -> None:
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.lora_A = _LoraPart(base_layer.in_features, spec.r, bias=False, device=device)
        self.lora_B = _LoraPart(spec.r, base_layer.out_features, bias=False, device=device)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.enabled = True
        # Set by tensor parallelism: how a plain (local) input is laid out over the TP mesh.
        self.tp_input: tuple[object, Placement] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled:
            return out
        h = self.dropout(x)
        if self.tp_input is not None and not isinstance(h, DTensor):
            mesh, placement = self.tp_input
            h = DTensor.from_local(h, mesh, [placement], run_check=False)
        # The scale multiplies the (tokens, r) activations, not the (tokens, out) delta.
        delta = self.lora_B(self.lora_A(h.to(self.lora_A.weight.dtype)) * self.scaling)
        if self.tp_input is None:
            # Plain tensors: add into the base output in place (a linear layer does not keep
            # its output for backward). With the scale above, two fewer (tokens, out_features)
            # temporaries per adapted layer: ~150 MiB less peak RSS in a CPU SFT step
            # (`parallm bench train --task sft`). Under TP the output may be a DTensor view.
            return out.add_(delta.to(out.dtype))
        if isinstance(delta, DTensor):
            # Column-parallel: the base gave its local output shard, the delta is sharded alike.
            # Row-parallel: the delta is a partial sum; reduce it to the base output's layout.
            delta = (
                delta.redistribute(out.device_mesh, out.placements)
                if isinstance(out, DTensor)
                else delta.to_local()
            )
        return out + delta.to(out.dtype)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap the targeted linear layers of `model` (or a pipeline stage of it) in place and freeze
    everything but the adapters and `modules_to_save`; returns the adapted module names.

    A stage may hold none of the targets; `check_targets` is the whole-model check.
    """
    names = spec.targets(model)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), spec))
    freeze_base(model, spec)
    return names


def freeze_base(model: nn.Module, spec: LoraSpec) -> None:
    """Train only the adapters and `modules_to_save`. Run again after tensor parallelism, whose
    styles make new parameters (trainable by default)."""
    saved = _modules_to_save(model, spec)
    for pname, param in model.named_parameters():
        param.requires_grad_(is_lora_param(pname) or any(_under(pname, m) for m in saved))


def _under(param_name: str, module_name: str) -> bool:
    return param_name.startswith(f"{module_name}.")


def _modules_to_save(model: nn.Module, spec: LoraSpec) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if name
        and module is not None
        and any(name == m or name.endswith(f".{m}") for m in spec.modules_to_save)
    ]


def check_targets(
    model: nn.Module, spec: LoraSpec, field_name: str = "lora.target_modules"
) -> None:
    """A UserError unless `spec` adapts at least one linear layer of the whole `model` and every
    `modules_to_save` entry names a module."""
    if not spec.targets(model):
        linear = sorted(
            {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise UserError(
            f"{field_name}: {_show(spec.target_modules)} matches no linear layer of the model; "
            f"its linear layers are {', '.join(linear)} (or use 'all-linear')"
        )
    found = {n.rpartition(".")[2] for n in _modules_to_save(model, spec)} | set(
        _modules_to_save(model, spec)
    )
    missing = [m for m in spec.modules_to_save if m not in found]
    if missing:
        raise UserError(
            f"lora.modules_to_save: {missing[0]!r} names no module of the model; valid: a module "
            "name such as lm_head or embed_tokens"
        )


def _show(targets: tuple[str, ...] | str) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))


def initial_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A LoRA parameter's initial value as peft makes it: A Kaiming-uniform (a = sqrt 5), B zero,
    so training starts from the base model exactly. A function of (seed, name) only."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on a (r, in) weight
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def lora_modules(model: nn.Module) -> Iterator[LoraLinear]:
    for module in model.modules():
        if isinstance(module, LoraLinear):
            yield module


@contextmanager
def adapter_disabled(*models: nn.Module):
    """Run `models` as their base: every adapter off (no copy of any weight)."""
    modules = [m for model in models for m in lora_modules(model)]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def fill_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], *, fill) -> None:
    """Set the adapter (and saved modules) of `model` from full tensors by parallm name, keeping
    what this process holds of each (`fill(param, full)`)."""
    from parallm.models.build import canonical_name

    for name, param in model.named_parameters():
        key = canonical_name(name)
        if key in tensors and param.requires_grad:
            fill(param, tensors[key].float())
