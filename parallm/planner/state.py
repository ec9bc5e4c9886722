"""Exact per-rank bytes of parameters, gradients and AdamW state, without building a model.

Reproduces what `parallm.train.trainer.state_bytes` measures on a real layout, from the shapes in
`ModelArgs` and the degrees in `ParallelDims` alone, by following the same rules the real code
applies to every parameter:

1. Pipeline cutting (`distributed/pipeline.py`): a pipeline rank holds the layers of its stages;
   the first stage holds `embed_tokens`, the last `norm` and `lm_head`. With tied embeddings and
   pp > 1 the last stage's `lm_head.weight` is its own copy; with pp = 1 it is the embedding.
2. Tensor parallelism (`models/llama/parallelize.py`, DTensor `Shard` = `torch.chunk` slices):
   column-parallel q/k/v/gate/up/lm_head shard weight dim 0 and their bias; row-parallel o/down
   shard weight dim 1 and replicate their bias; the vocabulary-parallel embedding shards dim 0;
   norms (and Qwen3's q/k norms) are replicated.
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
from parallm.models.llama.model import ModelArgs

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


def _linear(name: str, d_in: int, d_out: int, bias: bool, colwise: bool) -> list[ParamSpec]:
    # nn.Linear weight is (out, in): colwise shards the output rows, rowwise the input columns.
    specs = [ParamSpec(f"{name}.weight", (d_out, d_in), 0 if colwise else 1)]
    if bias:  # a colwise bias follows its output rows; a rowwise bias is added after the sum
        specs.append(ParamSpec(f"{name}.bias", (d_out,), 0 if colwise else None))
    return specs


def layer_params(args: ModelArgs) -> list[ParamSpec]:
    """The parameters of one decoder layer (names relative to `layers.<i>.`)."""
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    specs = [ParamSpec("input_layernorm.weight", (args.dim,), None)]
    specs += _linear("self_attn.q_proj", args.dim, q_out, args.qkv_bias, colwise=True)
    specs += _linear("self_attn.k_proj", args.dim, kv_out, args.qkv_bias, colwise=True)
    specs += _linear("self_attn.v_proj", args.dim, kv_out, args.qkv_bias, colwise=True)
    specs += _linear("self_attn.o_proj", q_out, args.dim, args.o_bias, colwise=False)
    if args.qk_norm:
        specs.append(ParamSpec("self_attn.q_norm.weight", (args.head_dim,), None))
        specs.append(ParamSpec("self_attn.k_norm.weight", (args.head_dim,), None))
    specs.append(ParamSpec("post_attention_layernorm.weight", (args.dim,), None))
    specs += _linear("mlp.gate_proj", args.dim, args.ffn_dim, args.mlp_bias, colwise=True)
    specs += _linear("mlp.up_proj", args.dim, args.ffn_dim, args.mlp_bias, colwise=True)
    specs += _linear("mlp.down_proj", args.ffn_dim, args.dim, args.mlp_bias, colwise=False)
    return specs


def rank_holdings(
    args: ModelArgs,
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
    layers = pipeline.split_layers(args.n_layers, n_stages, pp_layers or None)
    first, last = 0 in ids, n_stages - 1 in ids
    embed = ParamSpec("embed_tokens.weight", (args.vocab_size, args.dim), 0)
    head = ParamSpec("lm_head.weight", (args.vocab_size, args.dim), 0)
    ends: list[ParamSpec] = [embed] if first else []
    if last:
        ends.append(ParamSpec("norm.weight", (args.dim,), None))
        # Tied on one stage: lm_head.weight is embed_tokens.weight, one parameter. Across
        # stages each end has its own tensor (kept equal by summing their gradients).
        if not (args.tie_embeddings and n_stages == 1):
            ends.append(head)
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
    args: ModelArgs,
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
    args: ModelArgs,
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
    args: ModelArgs,
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
    per_layer = sum(local_numel(s, **where) for s in layer_params(args))
    numel = held.n_layers * per_layer + sum(local_numel(s, **where) for s in held.ends)
    n_tensors = held.n_layers * len(layer_params(args)) + len(held.ends)
    param_bytes = numel * dtype_bytes
    return {
        "parameters": param_bytes,
        "gradients": param_bytes,
        "optimizer": 2 * param_bytes + ADAMW_STEP_BYTES * n_tensors,
    }
