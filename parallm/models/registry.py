"""Model families as plug-ins: each registers one `FamilySpec`; nothing outside `parallm/models/`
names a family.

A family lives in `parallm/models/<family>/` and registers its spec when imported; the modules
listed in `families.FAMILY_MODULES` (one line per family, with the model types it registers,
readable without torch) are imported on the first lookup. Training, serving, the planner and the
CLI find a family by the `model_type` of a Hugging Face `config.json` (or its `architectures`),
by a model type name, or by the type of a model's arguments, and reach the model only through
the spec.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from parallm.errors import UserError
from parallm.models import families
from parallm.models.attention import AttentionSpec
from parallm.models.plan import ParallelPlan


class HFAdapter(Protocol):
    """Hugging Face `config.json` and checkpoint names in and out (a module of functions)."""

    def args_from_hf(self, cfg: dict, source: str) -> Any: ...
    def args_to_hf(self, args: Any, dtype: str) -> dict: ...
    def hf_key(self, name: str) -> str: ...
    def parallm_key(self, key: str) -> str | None: ...


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """The shape facts the planner, the engine, the layout checks and the metrics read."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    tie_embeddings: bool
    num_params: int  # tied embeddings counted once
    num_params_no_embed: int


@dataclass(frozen=True, kw_only=True, eq=False)
class FamilySpec:
    """Everything parallm needs to know about one model family.

    `model_types`: the HF `model_type`s it serves; `architectures`: HF class names -> model type.
    `model_cls(args)` builds the model (a plain `nn.Module`, no distributed code) whose
    `forward(input_ids, positions, document_ids, *, attention, backend, logit_rows)` returns
    logits. `initial_value(name, shape, args, seed)` is a parameter's fresh value (float32, CPU),
    a function of seed and name only; `tied(args)` maps a parameter name to the one whose value
    it shares (a tied output head). `flops_per_token(args, seq_len)`: training FLOPs.
    `args_from_config(job_cfg, vocab_size)`: a fresh model's args from the job config (its
    `[model]`, and `[video]` for a video family). `modality`: what the model makes, "text" (a
    language model: logits over a vocabulary) or "video" (a diffusion model: patch tokens,
    trained by the `flow` task, served at /v1/videos).
    """

    name: str
    model_types: tuple[str, ...]
    architectures: dict[str, str]
    args_cls: type
    model_cls: type[nn.Module]
    hf: HFAdapter
    plan: ParallelPlan
    facts: Callable[[Any], ModelFacts]
    flops_per_token: Callable[[Any, int], float]
    initial_value: Callable[[str, tuple[int, ...], Any, int], torch.Tensor]
    tied: Callable[[Any], dict[str, str]]
    args_from_config: Callable[[Any, int], Any]
    attention: AttentionSpec = AttentionSpec()
    modality: str = "text"

    @property
    def is_video(self) -> bool:
        return self.modality == "video"

    def build(self, args: Any, device: torch.device | str = "meta") -> nn.Module:
        """The model for `args` on `device` (default `meta`: shapes only, nothing allocated)."""
        with torch.device(device):
            return self.model_cls(args)


_FAMILIES: dict[str, FamilySpec] = {}
_loaded = False


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family (called by the family's package when imported)."""
    for t in spec.model_types:
        other = _FAMILIES.get(t)
        assert other is None or other is spec, f"model_type {t!r} registered twice"
        _FAMILIES[t] = spec
    return spec


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in families.FAMILY_MODULES:
            importlib.import_module(module)
        declared = families.model_types()
        assert sorted(_FAMILIES) == declared, f"registered {sorted(_FAMILIES)}, not {declared}"


def model_types() -> list[str]:
    """Every registered model type, sorted."""
    _load()
    return sorted(_FAMILIES)


def family(model_type: str) -> FamilySpec:
    """The family serving `model_type`; a UserError listing the registered ones otherwise."""
    _load()
    if model_type not in _FAMILIES:
        raise UserError(
            f"model_type {model_type!r} is not supported; registered: {', '.join(model_types())}"
        )
    return _FAMILIES[model_type]


def model_type_of(cfg: dict, source: str = "config.json") -> str:
    """The model type of a HF config dict: its `architectures` first, else its `model_type`."""
    _load()
    archs = cfg.get("architectures") or []
    for spec in dict.fromkeys(_FAMILIES.values()):
        for arch in archs:
            if arch in spec.architectures:
                return spec.architectures[arch]
    if not archs and cfg.get("model_type") in _FAMILIES:
        return cfg["model_type"]
    got = archs or cfg.get("model_type")
    known = sorted(a for s in dict.fromkeys(_FAMILIES.values()) for a in s.architectures)
    raise UserError(
        f"{source}: unsupported architecture {got!r}; registered model types: "
        f"{', '.join(model_types())} ({', '.join(known)})"
    )


def family_of_config(cfg: dict, source: str = "config.json") -> FamilySpec:
    return family(model_type_of(cfg, source))


def family_of_args(args: Any) -> FamilySpec:
    """The family whose model arguments `args` are."""
    _load()
    for spec in _FAMILIES.values():
        if isinstance(args, spec.args_cls):
            return spec
    raise UserError(f"{type(args).__name__} is not the arguments of a registered model family")


def family_of_model(model: nn.Module) -> FamilySpec:
    return family_of_args(model.args)
