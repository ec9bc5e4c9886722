"""Build this rank's share of the model for a layout: stages, shards, backends, weights.

The order is the one documented in `models/llama/parallelize.py`: pipeline cutting first (on
`meta`), then tensor parallel, context parallel (an attention backend), activation
checkpointing, compile, FSDP; only then are the weights materialised, each parameter from its
full value one at a time (fresh init or a HF checkpoint), keeping the local shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from parallm.config import ParallelConfig
from parallm.distributed import pipeline
from parallm.distributed.parallel_dims import ParallelDims
from parallm.models import hf
from parallm.models.llama import parallelize
from parallm.models.llama.model import ModelArgs, Transformer


@dataclass
class RankModel:
    """What one rank holds: its model parts (one per pipeline stage it runs) and where they sit."""

    parts: list[Transformer]
    stage_ids: list[int]
    n_stages: int

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()


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


def build_rank_model(
    args: ModelArgs,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    device: torch.device,
    *,
    seed: int,
    hf_path: str | Path | None = None,
    param_dtype: torch.dtype | None = None,
) -> RankModel:
    """This rank's model parts, parallelized and filled (init from `seed`, or `hf_path`)."""
    if dims.pp > 1:
        per_rank = pipeline.stages_per_rank(pcfg.pp_schedule, pcfg.pp_virtual_stages)
        n_stages = dims.pp * per_rank
        ids = pipeline.stage_ids(pcfg.pp_schedule, dims.coordinate("pp"), dims.pp, per_rank)
        layers = pipeline.split_layers(args.n_layers, n_stages, pcfg.pp_layers or None)
        parts = [
            pipeline.build_stage_model(args, layers[i], first=i == 0, last=i == n_stages - 1)
            for i in ids
        ]
    else:
        n_stages, ids = 1, [0]
        with torch.device("meta"):
            parts = [Transformer(args)]
    for part in parts:
        _parallelize(part, pcfg, dims, param_dtype)
        materialize(part, device)
        if hf_path is None:
            part.init_weights(seed, fill=copy_local_shard)
        else:
            hf.load_weights_into(part, hf_path, fill=copy_local_shard)
        part.train()
    return RankModel(parts=parts, stage_ids=ids, n_stages=n_stages)


def materialize(part: Transformer, device: torch.device) -> None:
    """Allocate a `meta`-built (and possibly sharded) model on `device`, uninitialised.

    `to_empty` normally gives every module its own new parameter, which silently unties tied
    embeddings; swapping tensors in place keeps a shared parameter shared.
    """
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        part.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    part.init_buffers(device)
    if part.args.tie_embeddings and part.embed_tokens is not None and part.lm_head is not None:
        assert part.lm_head.weight is part.embed_tokens.weight, "tied embeddings came apart"


def _parallelize(
    part: Transformer, pcfg: ParallelConfig, dims: ParallelDims, param_dtype: torch.dtype | None
) -> None:
    if dims.tp > 1:
        parallelize.apply_tp(part, dims.mesh["tp"])
    if dims.cp > 1:
        from parallm.distributed import context_parallel as cp

        group = dims.mesh["cp"].get_group()
        balance = pcfg.cp_mode == "ring"
        part.default_backend = cp.context_parallel_backend(pcfg.cp_mode, group)
        part.position_fn = partial(
            _cp_positions, cp_rank=dims.coordinate("cp"), cp_size=dims.cp, balance=balance
        )
    parallelize.apply_ac(part, pcfg.activation_checkpoint)
    if pcfg.compile:
        parallelize.apply_compile(part)
    if dims.fsdp_enabled:
        names = ("dp_replicate", "dp_shard_cp") if dims.dp_replicate > 1 else ("dp_shard_cp",)
        parallelize.apply_fsdp(
            part,
            dims.mesh[names],
            zero_stage=pcfg.zero_stage,
            param_dtype=param_dtype,
            reduce_dtype=torch.float32 if param_dtype is not None else None,
            cpu_offload=pcfg.cpu_offload,
        )


def _cp_positions(t: int, device: torch.device, *, cp_rank: int, cp_size: int, balance: bool):
    """Global positions of this rank's `t` local tokens of a sequence of t * cp_size tokens."""
    from parallm.distributed.context_parallel import cp_positions

    return cp_positions(t * cp_size, cp_rank, cp_size, load_balance=balance, device=device)
