"""Exact per-rank bytes of parameters, gradients and AdamW state, without building a model.

Reproduces what `parallm.train.trainer.state_bytes` measures on a real layout, from the shapes of
the family's model (built on `meta`: nothing allocated) and the degrees in `ParallelDims` alone,
by following the same rules the real code applies to every parameter:

1. Pipeline cutting (`distributed/pipeline.py`): a pipeline rank holds the layers of its stages;
   the first stage holds the plan's `first_stage` modules (embeddings), the last its
   `last_stage` ones (final norm, head). A tied copy (the family's `tied`, e.g. a tied head)
   is its own tensor on another stage, and the same tensor when one stage holds both.
2. Tensor parallelism (the family's `ParallelPlan`, DTensor `Shard` = `torch.chunk` slices):
   each parameter's sharded dimension is `plan.sharded_dim` (column-parallel weights and biases
   dim 0, row-parallel weights dim 1 with a replicated bias, vocabulary-parallel tables dim 0,
   norms replicated).
3. FSDP2 (`fully_shard` over dp_shard x cp, dp_replicate only replicates) chunks dim 0 of the
   TP-local tensor with `torch.chunk` semantics: chunks of ceil(n / k) rows, so the last ranks
   get a smaller chunk or none at all (6 rows over 4 ranks give 2, 2, 2, 0 and 9 give 3, 3, 3, 0,
   not 3, 2, 2, 2). When TP already
   shards dim 0, FSDP records the placement as `_StridedShard(0, split_factor=tp)`, but the local
   tensor is still the plain chunk of the TP-local rows; the striding only affects how the full
   tensor is reassembled.

Shapes of one decoder layer are the same for every layer, so a rank's bytes are one layer's
times its layer count plus the ends it holds. `local_numels` gives the same per parameter name,
to compare with a real model parameter by parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallm.distributed import pipeline
from parallm.distributed.parallel_dims import AXES, ParallelDims
from parallm.errors import UserError
from parallm.models.registry import ModelFacts, family_of_args

ADAMW_STEP_BYTES = 4  # AdamW's per-tensor `step` is a float32 scalar


@dataclass(frozen=True)
class ParamSpec:
    """One parameter's full shape and the dimension tensor parallelism shards (None: replicated)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None


@dataclass(frozen=True)
class RankHoldings:
    """The parameters one pipeline rank holds: the decoder layers `layer_ids` plus `ends`."""

    layer_ids: tuple[int, ...]
    ends: tuple[ParamSpec, ...]
    first: bool  # holds the first stage (embeddings)
    last: bool  # holds the last stage (final norm, output head)

    @property
    def n_layers(self) -> int:
        return len(self.layer_ids)


_SPECS: dict[str, tuple[tuple[ParamSpec, ...], tuple[ParamSpec, ...]]] = {}


def facts_of(args) -> ModelFacts:
    """The shape facts of `args`'s model (its family's `facts`)."""
    return family_of_args(args).facts(args)


def param_specs(args) -> tuple[tuple[ParamSpec, ...], tuple[ParamSpec, ...]]:
    """One block's parameters (names relative to `layers.<i>.`) and those outside the blocks,
    read from the family's model on `meta` and its plan (computed once per model shape)."""
    key = f"{type(args).__qualname__}:{args!r}"
    if key not in _SPECS:
        spec = family_of_args(args)
        plan = spec.plan
        model = spec.build(args)
        block_prefix = f"{plan.layers}.0."
        block, top = [], []
        for name, p in model.named_parameters():
            if name.startswith(block_prefix):
                rel = name[len(block_prefix) :]
                block.append(ParamSpec(rel, tuple(p.shape), plan.sharded_dim(name)))
            elif not name.startswith(f"{plan.layers}."):
                top.append(ParamSpec(name, tuple(p.shape), plan.sharded_dim(name)))
        for name, source in spec.tied(args).items():  # listed once above, under its source
            shape = next(t.shape for t in top if t.name == source)
            top.append(ParamSpec(name, shape, plan.sharded_dim(name)))
        _SPECS[key] = (tuple(block), tuple(top))
    return _SPECS[key]


def layer_params(args) -> list[ParamSpec]:
    """The parameters of one decoder layer (names relative to `layers.<i>.`)."""
    return list(param_specs(args)[0])


def rank_holdings(
    args,
    pp: int,
    pp_rank: int,
    *,
    pp_schedule: str = "1f1b",
    pp_virtual_stages: int = 2,
    pp_layers: list[int] | None = None,
) -> RankHoldings:
    """What pipeline rank `pp_rank` of `pp` holds, as `train/layout.py` cuts the model."""
    if pp == 1:
        n_stages, ids = 1, [0]
    else:
        per_rank = pipeline.stages_per_rank(pp_schedule, pp_virtual_stages)
        n_stages = pp * per_rank
        ids = pipeline.stage_ids(pp_schedule, pp_rank, pp, per_rank)
    layers = pipeline.split_layers(facts_of(args).n_layers, n_stages, pp_layers or None)
    first, last = 0 in ids, n_stages - 1 in ids
    spec = family_of_args(args)
    plan, tied = spec.plan, spec.tied(args)

    def kept(name: str) -> bool:
        module = name.rpartition(".")[0].partition(".")[0]
        if module in plan.first_stage:
            return first
        return last if module in plan.last_stage else True

    ends: list[ParamSpec] = []
    for p in param_specs(args)[1]:
        # Tied on one stage: the copy is its source, one parameter. Across stages each end has
        # its own tensor (kept equal by summing their gradients).
        if kept(p.name) and not (p.name in tied and n_stages == 1):
            ends.append(p)
    layer_ids = tuple(j for i in ids for j in layers[i])
    return RankHoldings(layer_ids=layer_ids, ends=tuple(ends), first=first, last=last)


def chunk_len(n: int, k: int, i: int) -> int:
    """Length of chunk `i` of `torch.chunk` over `n` rows in `k` chunks (0 when it is empty)."""
    size = -(-n // k)
    return max(0, min(size, n - i * size))


def local_numel(
    spec: ParamSpec, *, tp: int = 1, tp_rank: int = 0, shard: int = 1, shard_rank: int = 0
) -> int:
    """Elements of `spec` a rank holds after TP (degree `tp`) and then FSDP (degree `shard`)."""
    shape = list(spec.shape)
    if tp > 1 and spec.tp_dim is not None:
        shape[spec.tp_dim] = chunk_len(shape[spec.tp_dim], tp, tp_rank)
    if shard > 1:
        shape[0] = chunk_len(shape[0], shard, shard_rank)
    return math.prod(shape)


def _coords(dims: ParallelDims, rank_coords: dict[str, int]) -> dict[str, int]:
    coords = {axis: rank_coords.get(axis, 0) for axis in AXES}
    for axis in AXES:
        size = getattr(dims, axis)
        if not 0 <= coords[axis] < size:
            raise UserError(
                f"rank_coords[{axis!r}]: {coords[axis]} is not valid; the layout has {axis}="
                f"{size}, so it must be in 0..{size - 1}"
            )
    unknown = set(rank_coords) - set(AXES)
    if unknown:
        raise UserError(f"rank_coords: unknown axes {sorted(unknown)}; valid: {', '.join(AXES)}")
    return coords


def _locate(
    args,
    dims: ParallelDims,
    rank_coords: dict[str, int],
    pp_schedule: str,
    pp_virtual_stages: int,
    pp_layers: list[int] | None,
) -> tuple[RankHoldings, dict[str, int]]:
    """What the rank at `rank_coords` holds, and its `local_numel` sharding arguments."""
    c = _coords(dims, rank_coords)
    held = rank_holdings(
        args,
        dims.pp,
        c["pp"],
        pp_schedule=pp_schedule,
        pp_virtual_stages=pp_virtual_stages,
        pp_layers=pp_layers,
    )
    # FSDP shards over the flattened (dp_shard, cp) mesh, row-major: cp is the inner index.
    shard = dims.dp_shard * dims.cp if dims.fsdp_enabled else 1
    where = dict(
        tp=dims.tp, tp_rank=c["tp"], shard=shard, shard_rank=c["dp_shard"] * dims.cp + c["cp"]
    )
    return held, where


def local_numels(
    args,
    dims: ParallelDims,
    *,
    rank_coords: dict[str, int],
    pp_schedule: str = "1f1b",
    pp_virtual_stages: int = 2,
    pp_layers: list[int] | None = None,
) -> dict[str, int]:
    """Local elements of each of the rank's parameters, by name as `named_parameters` gives
    them (one entry for tied embeddings on one stage)."""
    held, where = _locate(args, dims, rank_coords, pp_schedule, pp_virtual_stages, pp_layers)
    out = {
        f"layers.{i}.{s.name}": local_numel(s, **where)
        for i in held.layer_ids
        for s in layer_params(args)
    }
    out.update({s.name: local_numel(s, **where) for s in held.ends})
    return out


def predict_state_bytes(
    args,
    dims: ParallelDims,
    *,
    rank_coords: dict[str, int],
    pp_schedule: str = "1f1b",
    pp_virtual_stages: int = 2,
    pp_layers: list[int] | None = None,
    dtype_bytes: int = 4,
) -> dict[str, int]:
    """The `state_bytes` of the rank at `rank_coords` (keys pp, dp_replicate, dp_shard, cp, tp;
    a missing key is coordinate 0),
    computed from shapes alone: parameters and gradients are the local-shard bytes of the rank's
    unique parameters; AdamW holds two moments of the same size plus a float32 step per tensor.
    `dtype_bytes` is the element size of the stored parameters (float32 in training).
    """
    held, where = _locate(args, dims, rank_coords, pp_schedule, pp_virtual_stages, pp_layers)
    # Every layer has the same shapes: one layer's elements times the count.
    block = layer_params(args)
    per_layer = sum(local_numel(s, **where) for s in block)
    numel = held.n_layers * per_layer + sum(local_numel(s, **where) for s in held.ends)
    n_tensors = held.n_layers * len(block) + len(held.ends)
    param_bytes = numel * dtype_bytes
    return {
        "parameters": param_bytes,
        "gradients": param_bytes,
        "optimizer": 2 * param_bytes + ADAMW_STEP_BYTES * n_tensors,
    }
