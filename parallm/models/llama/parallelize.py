"""Apply parallelism to a Llama-family `Transformer` (or a pipeline stage of one), in place.

The order is fixed and matters: tensor parallel, then (context parallel is an attention backend
chosen by the trainer), then activation checkpointing, then `torch.compile` per block, then FSDP.
Each step is a function so the serving engine can reuse `apply_tp` alone.

Tensor-parallel plan (Megatron-style, with sequence parallelism):
  embed_tokens   vocabulary-parallel (rows of the table), output sharded over the sequence
  norms          SequenceParallel: each TP rank normalises its slice of the tokens
  q/k/v, gate/up column-parallel (heads / ffn columns); o, down row-parallel, reduce-scattered
                 back to sequence shards
  q/k norms      (Qwen3) replicated weights over head-sharded activations
  lm_head        column-parallel over the vocabulary; logits stay sharded and the loss is
                 computed under `loss_parallel()`, so full logits are never gathered
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallm.config import AC_MODES
from parallm.models.llama.model import Transformer


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, *, loss_parallel: bool = True) -> None:
    """Shard `model` over `tp_mesh` with sequence parallelism (see the module docstring).

    With `loss_parallel`, the logits come out as a DTensor sharded over the vocabulary; compute
    the cross entropy inside `torch.distributed.tensor.parallel.loss_parallel()`. Otherwise
    they are gathered to a plain tensor (for inference).
    """
    tied = (
        model.args.tie_embeddings and model.embed_tokens is not None and model.lm_head is not None
    )
    top: dict[str, object] = {}
    # Activations between modules stay DTensors with the global (B, T, dim) shape, so the model
    # computes positions and RoPE for all T tokens; only stage boundaries hold local shards.
    if model.embed_tokens is not None:
        top["embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        )
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, top)
    _prepare_stage_boundaries(model, tp_mesh)
    if tied:  # both halves are Shard(0) over the vocabulary, so one parameter still serves
        model.lm_head.weight = model.embed_tokens.weight

    for block in model.layers.values():
        attn_inputs = (Shard(1), None, None, None, None)  # x, cos, sin, positions, backend
        plan: dict[str, object] = {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(
                input_layouts=attn_inputs,
                desired_input_layouts=(Replicate(), None, None, None, None),
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
        if block.self_attn.q_norm is not None:
            # (B, T, H_local, D): heads are sharded over tp; the norm weight is replicated and
            # its gradient is summed over the head shards by DTensor.
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


def _prepare_stage_boundaries(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """A pipeline stage sends and receives plain tensors: its sequence shard (B, T / tp, dim).
    Wrap a stage's hidden-state input as a sequence-sharded DTensor, and unwrap its output."""
    first, last = model.embed_tokens is not None, model.lm_head is not None
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


def apply_ac(model: Transformer, mode: str) -> None:
    """Activation checkpointing per block: `full` recomputes each block in the backward pass,
    `selective` saves matmul outputs and recomputes the rest."""
    assert mode in AC_MODES, mode
    if mode == "none":
        return
    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block,
                preserve_rng_state=False,
                context_fn=partial(create_selective_checkpoint_contexts, _selective_policy),
            )
        model.layers[name] = wrapped


def apply_compile(model: Transformer) -> None:
    """`torch.compile` each block in place (parameter names are unchanged)."""
    for block in model.layers.values():
        block.compile(fullgraph=False)


def apply_fsdp(
    model: Transformer,
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
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    # The root holds the embeddings, final norm and head (whichever this stage has); it is
    # resharded at the end of backward regardless, so there is nothing to gain by keeping it.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def parallel_modules(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wrapped (the blocks and the root), for gradient-sync control."""
    return [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
