"""Family-agnostic steps between a model on `meta` and one with values: allocate, then fill each
parameter from its full value (fresh init or a checkpoint) one at a time, keeping what this
process holds of it (all of it, a tensor-parallel slice, an FSDP shard). Training and serving
both build models this way; neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from parallm.models import lora
from parallm.models.registry import family_of_model

Fill = Callable[[torch.Tensor, torch.Tensor], None]


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper prefixes (activation checkpointing, compile, and a LoRA
    layer's `base_layer`, so base weights keep their names)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "base_layer."):
        name = name.replace(wrapper, "")
    return name


def value_source(model: nn.Module, name: str) -> str:
    """The parameter whose value `name` holds: its canonical name, except that a tied weight
    (a tied `lm_head.weight` on a last pipeline stage without the embedding) is its source."""
    name = canonical_name(name)
    return family_of_model(model).tied(model.args).get(name, name)


def find_param(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter `name` of `model`, or None where it does not hold it (a pipeline stage)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def tie_weights(model: nn.Module) -> None:
    """Make each tied parameter (the family's `tied`) its source again where `model` holds both,
    after a step that replaced one of them (loading with `assign=True`, sharding modules)."""
    for name, source in family_of_model(model).tied(model.args).items():
        src = find_param(model, source)
        if src is not None and find_param(model, name) is not None:
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, src)


@torch.no_grad()
def copy_local_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's shard of the full value `full` into `param` (a DTensor or a tensor)."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds `full`, so each slices its own shard, no comms.
        shard = distribute_tensor(
            full.to(param.device, param.dtype),
            param.device_mesh,
            param.placements,
            src_data_rank=None,
        )
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def init_weights(
    model: nn.Module, seed: int, *, fill: Fill = copy_local_shard, adapters_only: bool = False
) -> None:
    """Fresh values for training from scratch: each parameter's full value is the family's
    `initial_value` of (seed, name) (LoRA adapters: `lora.initial_value`), so a pipeline stage
    or a sharded copy gets exactly the values of the whole model; `fill(param, full)` keeps the
    local part. `adapters_only`: just the LoRA adapters (the base came from a checkpoint)."""
    spec = family_of_model(model)
    for name, param in model.named_parameters():
        source = value_source(model, name)
        shape = tuple(param.shape)  # a DTensor reports its global shape
        if lora.is_lora_param(source):
            fill(param, lora.initial_value(source, shape, seed))
        elif not adapters_only:
            fill(param, spec.initial_value(source, shape, model.args, seed))


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Allocate a `meta`-built (and possibly sharded) model on `device`, uninitialised.

    `to_empty` normally gives every module its own new parameter, which silently unties tied
    weights; swapping tensors in place keeps a shared parameter shared.
    """
    tied_before = _tied_pairs(model)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    model.init_buffers(device)
    assert _tied_pairs(model) == tied_before, "tied parameters came apart"


def _tied_pairs(model: nn.Module) -> set[tuple[str, str]]:
    """Names of parameters that are one object (`named_parameters` lists a shared one once)."""
    by_id: dict[int, str] = {}
    pairs = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in by_id:
            pairs.add((by_id[id(p)], name))
        else:
            by_id[id(p)] = name
    return pairs
