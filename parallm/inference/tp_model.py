"""This rank's tensor-parallel shard of a HF model, for serving: plain tensors, plain collectives.

The family's `ParallelPlan` (the one training reads) says how each module is split. On `meta`,
every module the plan shards is replaced by one that holds only this rank's slice and does the
communication itself; the model is then materialised and filled one checkpoint tensor at a time
(each rank slicing its part), so no rank ever holds the whole model. Parameter names do not
change, so the checkpoint loader and tied weights work as on one process.

  VOCAB_EMBED  rows of the table: look up the own ids, zero the others, all-reduce
  COLWISE      output features (heads, ffn columns): no communication
  ROWWISE      input features: partial sums all-reduced, then the bias added once
  VOCAB_HEAD   vocabulary rows: local logits all-gathered, full on every rank
  SEQUENCE, HEAD_LOCAL  replicated: as on one rank

No sequence parallelism: every rank sees all N tokens of a step. Why not DTensor as in training:
DTensor propagates shardings per operator and caches the result by shape, and a serving step's
shape changes nearly every step (N new tokens, R sampled rows); a cache miss cost about 2 s per
step on CPU for a 2-layer model (measured), and sequence parallelism only saves activation
memory, which serving does not need.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallm.inference.tp import TPGroup
from parallm.models import hf
from parallm.models.build import materialize, tie_weights
from parallm.models.plan import TP
from parallm.models.registry import FamilySpec

# The dimension of a Linear / Embedding weight each sharded style splits.
_WEIGHT_DIM = {TP.COLWISE: 0, TP.ROWWISE: 1, TP.VOCAB_EMBED: 0, TP.VOCAB_HEAD: 0}


def load_sharded(
    path: str | os.PathLike, tp: TPGroup, dtype: str | torch.dtype | None = None
) -> nn.Module:
    """Build, shard and fill this rank's part of the HF model at `path` on `tp.device`.
    `dtype` defaults to the checkpoint's, as in `hf.load_pretrained`."""
    spec, args = hf.read_family(path)
    dtype = hf.resolve_dtype(dtype if dtype is not None else hf.checkpoint_dtype(path))
    model = spec.build(args).to(dtype)
    shard_by_plan(model, spec, tp.rank, tp.size, tp.group)
    materialize(model, tp.device)
    hf.load_weights_into(
        model, path, fill=lambda p, full: p.detach().copy_(local_slice(full, p.shape, tp.rank))
    )
    return model.eval()


def local_slice(full: torch.Tensor, shape: torch.Size, rank: int) -> torch.Tensor:
    """Rank `rank`'s equal slice of `full` that has `shape` (the one dimension that differs)."""
    dims = [d for d, (a, b) in enumerate(zip(full.shape, shape, strict=True)) if a != b]
    if not dims:
        return full
    (d,) = dims
    return full.narrow(d, rank * shape[d], shape[d])


def shard_by_plan(model: nn.Module, spec: FamilySpec, rank: int, size: int, group) -> None:
    """On `meta`: replace every module the plan shards with its local-slice counterpart."""
    plan = spec.plan
    for name, module in list(model.named_modules()):
        style = plan.style_of(name)
        if style not in _WEIGHT_DIM:
            continue
        parent, _, leaf = name.rpartition(".")
        local = _Sharded(module, style, rank, size, group)
        setattr(model.get_submodule(parent), leaf, local)
    tie_weights(model)  # both ends hold the same vocabulary rows


def _meta_param(like: torch.Tensor, dim: int | None, size: int) -> nn.Parameter:
    shape = list(like.shape)
    if dim is not None:
        shape[dim] //= size
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device="meta"), requires_grad=False)


class _Sharded(nn.Module):
    """A Linear or Embedding holding this rank's slice (see the module docstring)."""

    def __init__(self, module: nn.Module, style: TP, rank: int, size: int, group) -> None:
        super().__init__()
        self.style, self.group = style, group
        dim = _WEIGHT_DIM[style]
        self.weight = _meta_param(module.weight, dim, size)
        bias = getattr(module, "bias", None)
        # A row-parallel bias is replicated (added once after the sum); others follow dim 0.
        self.bias = None if bias is None else _meta_param(bias, None if dim == 1 else 0, size)
        self.start = rank * self.weight.shape[0]  # first vocabulary row (embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style is TP.VOCAB_EMBED:
            local = x - self.start
            mine = (local >= 0) & (local < self.weight.shape[0])  # (B, T)
            out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
            out = out * mine[..., None].to(out.dtype)  # (B, T, dim), zero for others' ids
            dist.all_reduce(out, group=self.group)
            return out
        if self.style is TP.ROWWISE:
            return self.reduce(self.partial(x))
        out = F.linear(x, self.weight, self.bias)
        if self.style is TP.COLWISE:
            return out
        parts = [torch.empty_like(out) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, out.contiguous(), group=self.group)  # (B, R, vocab / tp) each
        return torch.cat(parts, dim=-1)  # (B, R, vocab)

    # A row-parallel layer in two halves, so a LoRA delta joins the partial sums (one reduce).
    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (B, T, out) partial sums over this rank's inputs

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias
