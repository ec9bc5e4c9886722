"""Build this rank's share of the model for a layout: stages, shards, backends, weights.

The order is the one documented in `distributed/parallelize.py`: pipeline cutting first (on
`meta`), then tensor parallel (the family's plan), context parallel (an attention backend; a
video model also gets its spatial shard),
activation checkpointing, compile, FSDP; only then are the weights materialised, each parameter
from its full value one at a time (fresh init or a HF checkpoint), keeping the local shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallm.config import ParallelConfig
from parallm.distributed import parallelize, pipeline
from parallm.distributed.parallel_dims import ParallelDims
from parallm.models import hf
from parallm.models.build import copy_local_shard, init_weights, materialize
from parallm.models.lora import LoraSpec, apply_lora, fill_adapter, freeze_base
from parallm.models.registry import family_of_args


@dataclass
class RankModel:
    """What one rank holds: its model parts (one per pipeline stage it runs) and where they sit."""

    parts: list[nn.Module]
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


def build_rank_model(
    args: Any,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    device: torch.device,
    *,
    seed: int,
    hf_path: str | Path | None = None,
    param_dtype: torch.dtype | None = None,
    lora: LoraSpec | None = None,
    adapter: dict[str, torch.Tensor] | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> RankModel:
    """This rank's model parts, parallelized and filled (init from `seed`, or `hf_path`).

    With `lora`, the targeted layers get adapters (initialised from `seed`, or `adapter`: full
    tensors by parallm name) and everything else is frozen, kept in `frozen_dtype` if given.
    """
    spec = family_of_args(args)
    if dims.pp > 1:
        per_rank = pipeline.stages_per_rank(pcfg.pp_schedule, pcfg.pp_virtual_stages)
        n_stages = dims.pp * per_rank
        ids = pipeline.stage_ids(pcfg.pp_schedule, dims.coordinate("pp"), dims.pp, per_rank)
        n_layers = spec.facts(args).n_layers
        layers = pipeline.split_layers(n_layers, n_stages, pcfg.pp_layers or None)
        parts = [
            pipeline.build_stage_model(spec, args, layers[i], first=i == 0, last=i == n_stages - 1)
            for i in ids
        ]
    else:
        n_stages, ids = 1, [0]
        parts = [spec.build(args)]
    for part in parts:
        if lora is not None:
            apply_lora(part, lora)
            if frozen_dtype is not None:
                for p in part.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(frozen_dtype)
        _parallelize(part, pcfg, dims, param_dtype, lora)
        materialize(part, device)
        if hf_path is None:
            init_weights(part, seed)
        else:
            hf.load_weights_into(part, hf_path, fill=copy_local_shard)
            init_weights(part, seed, adapters_only=True)
        if adapter is not None:
            fill_adapter(part, adapter, fill=copy_local_shard)
        part.train()
    return RankModel(parts=parts, stage_ids=ids, n_stages=n_stages)


def _parallelize(
    part: nn.Module,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    param_dtype: torch.dtype | None,
    lora: LoraSpec | None,
) -> None:
    if dims.tp > 1:
        parallelize.apply_tp(part, dims.mesh["tp"])
        if lora is not None:
            freeze_base(part, lora)
    if dims.cp > 1:
        from parallm.distributed import context_parallel as cp

        part.default_backend = cp.context_parallel_backend(
            pcfg.cp_mode, dims.mesh["cp"].get_group()
        )
        if hasattr(part, "spatial_shard"):
            # A video model splits its own spatial tokens (sequence parallelism); the step
            # leaves its batches whole.
            part.spatial_shard = (dims.coordinate("cp"), dims.cp)
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
