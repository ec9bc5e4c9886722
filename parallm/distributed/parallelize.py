"""Apply parallelism to a model of any family (or a pipeline stage of one), in place.

The order is fixed and matters: tensor parallel (from the family's `ParallelPlan`), then (context
parallel is an attention backend chosen by the trainer), then activation checkpointing, then
`torch.compile` per block, then FSDP. Each step is a function of the model and the plan.

Tensor parallelism runs with sequence parallelism: activations between blocks are sharded over
the tokens (the plan's SEQUENCE modules normalise their slice), gathered before the modules in
`gather_inputs` (attention, MLP), which run column- then row-parallel and reduce-scatter back to
token shards. The vocabulary-parallel head leaves its logits sharded for a loss computed under
`loss_parallel()`, so full logits are never gathered in training.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallm.config import AC_MODES
from parallm.errors import UserError
from parallm.models.build import tie_weights
from parallm.models.lora import LoraLinear
from parallm.models.plan import TP, ParallelPlan
from parallm.models.registry import family_of_model


def blocks(model: nn.Module) -> list[tuple[nn.ModuleDict, str, nn.Module]]:
    """Every repeated block of `model` as (its container, its name there, the block), over the
    plan's block containers in order (one `layers`, or STDiT's spatial and temporal blocks)."""
    plan = family_of_model(model).plan
    out = []
    for container in plan.containers:
        layers = getattr(model, container)
        out += [(layers, name, block) for name, block in layers.items()]
    return out


def _style(tp: TP, *, loss_parallel: bool) -> ParallelStyle:
    """The DTensor style of a plan entry, with sequence-sharded activations around it."""
    if tp is TP.COLWISE:
        return ColwiseParallel()
    if tp is TP.ROWWISE:
        return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    if tp is TP.VOCAB_EMBED:
        return RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        )
    if tp is TP.VOCAB_HEAD:
        return ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if tp is TP.SEQUENCE:
        return SequenceParallel()
    # HEAD_LOCAL: (B, T, H_local, D): heads are sharded over tp; the replicated weight's
    # gradient is summed over the head shards by DTensor.
    return SequenceParallel(sequence_dim=2, use_local_output=True)


def _present(module: nn.Module, names) -> list[str]:
    out = []
    for name in names:
        try:
            if module.get_submodule(name) is not None:
                out.append(name)
        except AttributeError:  # cut by the pipeline (None) or absent in this configuration
            pass
    return out


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool = True) -> None:
    """Shard `model` over `tp_mesh` by its family's plan, with sequence parallelism.

    With `loss_parallel`, the logits come out as a DTensor sharded over the vocabulary; compute
    the cross entropy inside `torch.distributed.tensor.parallel.loss_parallel()`. Otherwise
    they are gathered to a plain tensor.
    """
    spec = family_of_model(model)
    plan = spec.plan
    # Activations between modules stay DTensors with the global (B, T, dim) shape, so the model
    # computes positions and RoPE for all T tokens; only stage boundaries hold local shards.
    top = {}
    for name in _present(model, plan.top):
        top.update(_styles_for(model, name, plan.top[name], tp_mesh, loss_parallel=loss_parallel))
    parallelize_module(model, tp_mesh, top)
    _prepare_stage_boundaries(model, plan, tp_mesh)
    tie_weights(model)  # both halves shard alike, so one parameter still serves

    for _, _, block in blocks(model):
        styles: dict[str, ParallelStyle] = {}
        for name, arity in plan.gather_inputs.items():
            rest = (None,) * (arity - 1)
            styles[name] = PrepareModuleInput(
                input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest)
            )
        for name in _present(block, plan.block):
            style = plan.block[name]
            styles.update(_styles_for(block, name, style, tp_mesh, loss_parallel=loss_parallel))
        parallelize_module(block, tp_mesh, styles)


# LoRA under tensor parallelism: the adapter is laid out like its base. Column-parallel base
# (output features sharded): A (r, in) replicated, B (out, r) sharded on its output rows, so the
# delta comes out sharded like the base output. Row-parallel base (input features sharded): A
# sharded on its input columns, B replicated; the delta is a partial sum reduced like the base's.
_LORA_LAYOUT = {
    TP.COLWISE: (Replicate(), Shard(0), Replicate()),  # A, B, layout of a plain input
    TP.ROWWISE: (Shard(1), Replicate(), Shard(-1)),
}


def _styles_for(
    parent: nn.Module, name: str, tp: TP, tp_mesh: DeviceMesh, *, loss_parallel: bool
) -> dict[str, ParallelStyle]:
    """The styles for the module `name` of `parent`: itself, or the base of a LoRA layer (whose
    adapter is sharded here to match)."""
    module = parent.get_submodule(name)
    if not isinstance(module, LoraLinear):
        return {name: _style(tp, loss_parallel=loss_parallel)}
    if tp not in _LORA_LAYOUT:
        raise UserError(
            f"lora.target_modules: {name} is sharded over the vocabulary under tensor "
            "parallelism, which LoRA does not support; leave it out of target_modules (or "
            "train it whole with lora.modules_to_save)"
        )
    a, b, plain_input = _LORA_LAYOUT[tp]
    for part, placement in ((module.lora_A, a), (module.lora_B, b)):
        weight = distribute_tensor(part.weight, tp_mesh, [placement], src_data_rank=None)
        part.weight = nn.Parameter(weight, requires_grad=part.weight.requires_grad)
    module.tp_input = (tp_mesh, plain_input)
    return {f"{name}.base_layer": _style(tp, loss_parallel=loss_parallel)}


def _prepare_stage_boundaries(model: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh) -> None:
    """A pipeline stage sends and receives plain tensors: its sequence shard (B, T / tp, dim).
    Wrap a stage's hidden-state input as a sequence-sharded DTensor, and unwrap its output."""
    first = len(_present(model, plan.first_stage)) == len(plan.first_stage)
    last = len(_present(model, plan.last_stage)) == len(plan.last_stage)
    wrap_in = {"input_layouts": (Shard(1),), "desired_input_layouts": (Shard(1),)}
    unwrap_out = {"output_layouts": (Shard(1),), "desired_output_layouts": (Shard(1),)}
    if first and last:
        return
    if first:
        style = PrepareModuleOutput(**unwrap_out, use_local_output=True)
    elif last:
        style = PrepareModuleInput(**wrap_in, use_local_output=False)
    else:
        style = PrepareModuleInputOutput(**wrap_in, **unwrap_out, use_local_output=True)
    parallelize_module(model, tp_mesh, style)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul outputs (expensive to recompute), recompute the cheap element-wise rest."""
    save = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> None:
    """Activation checkpointing per block: `full` recomputes each block in the backward pass,
    `selective` saves matmul outputs and recomputes the rest."""
    assert mode in AC_MODES, mode
    if mode == "none":
        return
    for layers, name, block in blocks(model):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block,
                preserve_rng_state=False,
                context_fn=partial(create_selective_checkpoint_contexts, _selective_policy),
            )
        layers[name] = wrapped


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` each block in place (parameter names are unchanged)."""
    for _, _, block in blocks(model):
        block.compile(fullgraph=False)


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    zero_stage: int = 3,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> None:
    """FSDP2 over `dp_mesh` (1-D: shard; 2-D (replicate, shard): hybrid), per block then root.

    ZeRO stages map onto FSDP2 as: 3 reshards parameters after forward (gathered again for
    backward); 2 keeps them gathered from forward to backward; 1 additionally keeps full
    gradients across accumulation micro-batches and reduce-scatters once per step (the trainer
    turns gradient sync off for all but the last micro-batch). Optimizer state is always sharded.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs: dict[str, object] = {"mesh": dp_mesh, "mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    reshard = zero_stage == 3
    for _, _, block in blocks(model):
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    # The root holds the embeddings, final norm and head (whichever this stage has); it is
    # resharded at the end of backward regardless, so there is nothing to gain by keeping it.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if hasattr(model, "forward_tokens"):
        # A video model is called through this method (its sharded output), not `forward`:
        # FSDP gathers the root's parameters around it as around a forward.
        register_fsdp_forward_method(model, "forward_tokens")
