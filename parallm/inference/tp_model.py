"""This rank's tensor-parallel shard of a HF model, for serving: plain local tensors.

The layout is the training plan's, `parallelize.apply_tp`, applied on `meta`; the shard is then
materialised and filled one checkpoint tensor at a time with the training helpers
(`layout.materialize`, `layout.copy_local_shard`), so no rank ever holds the whole model.

Then every DTensor parameter is swapped for its local shard and the DTensor hooks for plain
collectives, chosen by each parameter's placement (no sequence parallelism; every rank sees all
N tokens of the step):

  embed_tokens   Shard(0), vocabulary rows: look up the own ids, zero the others, all-reduce
  q/k/v, gate/up Shard(0), column-parallel: local heads / ffn columns, no communication
  o, down        Shard(1), row-parallel: partial sums all-reduced, then the bias added once
  norms          replicated: as on one rank
  lm_head        Shard(0) over the vocabulary: local logits all-gathered, full on every rank

Why not run the DTensor model as training does: DTensor propagates shardings per operator and
caches the result by shape, and a serving step's shape changes nearly every step (N new tokens,
R sampled rows). A cache miss cost about 2 s per step on CPU for a 2-layer model (measured), and
sequence parallelism only saves activation memory, which serving does not need.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from parallm.models import hf
from parallm.models.llama.model import Transformer
from parallm.models.llama.parallelize import apply_tp
from parallm.train.layout import copy_local_shard, materialize
from parallm.utils.fs import read_json


def load_sharded(
    path: str | os.PathLike,
    tp_mesh: DeviceMesh,
    device: torch.device,
    dtype: str | torch.dtype | None = None,
) -> Transformer:
    """Build, shard and fill this rank's part of the HF model at `path` on `device`.
    `dtype` defaults to the checkpoint's, as in `hf.load_pretrained`."""
    cfg = read_json(os.path.join(path, "config.json"))
    dtype = hf.resolve_dtype(
        dtype if dtype is not None else cfg.get("torch_dtype", cfg.get("dtype"))
    )
    with torch.device("meta"):
        model = Transformer(hf.read_args(path)).to(dtype)
    apply_tp(model, tp_mesh, loss_parallel=False)
    materialize(model, device)
    hf.load_weights_into(model, path, fill=copy_local_shard)
    _localize(model, tp_mesh)
    return model.eval()


def _localize(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Swap DTensor parameters for their local shards and DTensor hooks for plain collectives."""
    group = tp_mesh.get_group()
    head, embed = model.lm_head, model.embed_tokens
    row_parallel = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not head and m.weight.placements == (Shard(1),)
    ]
    assert embed.weight.placements == (Shard(0),) and head.weight.placements == (Shard(0),)
    local: dict[int, nn.Parameter] = {}  # by DTensor: tied embeddings stay one parameter
    for module in model.modules():
        # Only parallelize_module's input/output redistribution hooks live here (no compile,
        # no checkpointing in serving); they would turn plain tensors back into DTensors.
        module._forward_pre_hooks.clear()
        module._forward_pre_hooks_with_kwargs.clear()
        module._forward_hooks.clear()
        module._forward_hooks_with_kwargs.clear()
        module._forward_hooks_always_called.clear()
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in local:
                value = p.to_local() if isinstance(p, DTensor) else p
                local[id(p)] = nn.Parameter(value.detach(), requires_grad=False)
            setattr(module, name, local[id(p)])
    for linear in row_parallel:
        bias, linear.bias = linear.bias, None  # replicated: added once, after the sum
        linear.register_forward_hook(partial(_all_reduce, group=group, bias=bias))
    model.embed_tokens = _VocabParallelEmbedding(embed.weight, tp_mesh.get_local_rank(), group)
    head.register_forward_hook(partial(_all_gather_vocab, group=group))


def _all_reduce(_module, _inputs, out: torch.Tensor, *, group, bias: torch.Tensor | None):
    dist.all_reduce(out, group=group)  # (B, T, dim) partial sums over the rank's columns
    return out if bias is None else out + bias


def _all_gather_vocab(_module, _inputs, out: torch.Tensor, *, group) -> torch.Tensor:
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)  # (B, R, vocab / tp) each
    return torch.cat(parts, dim=-1)  # (B, R, vocab)


class _VocabParallelEmbedding(nn.Module):
    """An embedding whose rank holds rows [rank * V_local, (rank + 1) * V_local) of the table."""

    def __init__(self, weight: nn.Parameter, rank: int, group) -> None:
        super().__init__()
        self.weight = weight  # (V_local, dim); the same parameter as a tied lm_head
        self.start = rank * weight.shape[0]
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])  # (B, T)
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = out * mine[..., None].to(out.dtype)  # (B, T, dim), zero for other ranks' ids
        dist.all_reduce(out, group=self.group)
        return out
