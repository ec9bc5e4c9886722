"""Pipeline parallelism: cut the model into stages by layers and run a torch schedule.

A stage is the family's model built on `meta` from which the layers of other stages are deleted
(the plan's `layers` is a `ModuleDict`, so the kept layers keep their names and checkpoints stay
layout-independent); only the first stage keeps the plan's `first_stage` modules (embeddings),
only the last its `last_stage` ones (final norm, output head). Loop schedules (`gpipe`, `1f1b`,
`interleaved_1f1b`) give pipeline rank r the stages r, r + pp, ...; V schedules (`zero_bubble` =
ZB-V, `dualpipev`) give it stages r and 2pp-1-r.

Tied weights across stages (the family's `tied`, e.g. an output head tied to the embedding):
the first stage's source and the last stage's copy start equal and `TiedGradSync` sums their
gradients over the pipeline group, so identical AdamW updates keep them equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from parallm.errors import UserError
from parallm.models.build import find_param
from parallm.models.registry import FamilySpec, family_of_model

SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
V_SCHEDULES = ("zero_bubble", "dualpipev")


def stages_per_rank(schedule: str, virtual_stages: int) -> int:
    if schedule in V_SCHEDULES:
        return 2
    return virtual_stages if schedule == "interleaved_1f1b" else 1


def stage_ids(schedule: str, pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The global stage indices held by pipeline rank `pp_rank`."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def split_layers(
    n_layers: int, n_stages: int, pp_layers: list[int] | None = None
) -> list[list[int]]:
    """Layer ids per stage: `pp_layers` (layers per stage) if given, else balanced (earlier
    stages take the remainder, since the last stage also carries the output head)."""
    if pp_layers:
        if len(pp_layers) != n_stages or sum(pp_layers) != n_layers or min(pp_layers) < 1:
            raise UserError(
                f"parallel.pp_layers: {pp_layers} must list {n_stages} positive layer counts "
                f"(one per stage) summing to n_layers={n_layers}"
            )
        counts = pp_layers
    else:
        base, extra = divmod(n_layers, n_stages)
        counts = [base + (1 if s < extra else 0) for s in range(n_stages)]
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def build_stage_model(
    spec: FamilySpec, args, layer_ids: list[int], *, first: bool, last: bool
) -> nn.Module:
    """The family's model on `meta` holding only `layer_ids` (and the ends it owns)."""
    model = spec.build(args)
    layers = getattr(model, spec.plan.layers)
    keep = {str(i) for i in layer_ids}
    for name in list(layers.keys()):
        if name not in keep:
            del layers[name]
    for name in (() if first else spec.plan.first_stage) + (() if last else spec.plan.last_stage):
        setattr(model, name, None)
    return model


def build_schedule(
    schedule: str,
    stage_models: list[nn.Module],
    ids: list[int],
    n_stages: int,
    *,
    group: dist.ProcessGroup,
    device: torch.device,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """The torch pipelining schedule running `stage_models` (this rank's stages `ids`).

    `loss_fn` must return each micro-batch's share of the step's mean loss (its gradients are
    summed, not averaged)."""
    stages = [
        PipelineStage(m, stage_index=i, num_stages=n_stages, device=device, group=group)
        for m, i in zip(stage_models, ids, strict=True)
    ]
    cls = SCHEDULES[schedule]
    # scale_grads=False: torch would divide *all* gradients by n_microbatches after every step,
    # including those accumulated by earlier steps; `loss_fn` does the averaging instead.
    kwargs = {"n_microbatches": n_microbatches, "loss_fn": loss_fn, "scale_grads": False}
    if issubclass(cls, PipelineScheduleSingle):
        assert len(stages) == 1
        return cls(stages[0], **kwargs)
    assert issubclass(cls, PipelineScheduleMulti)
    return cls(stages, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class TiedGradSync:
    """Sums the gradients of a tied pair (e.g. embedding and output head) over the pipeline
    group, for the family's one tied weight.

    Ranks holding neither contribute zeros; a rank holding both (V schedules) adds its two.
    Built once by every rank of the group (it agrees on the local shard shape then).
    """

    def __init__(self, model_parts: list[nn.Module], pp_group: dist.ProcessGroup) -> None:
        self.group = pp_group
        self.held = []
        spec = family_of_model(model_parts[0])
        ((name, source),) = spec.tied(model_parts[0].args).items()
        for part in model_parts:
            # A part holding both holds one tensor (tied on the stage): count it once.
            held = find_param(part, source)
            if held is None:
                held = find_param(part, name)
            if held is not None:
                self.held.append(held)
        shapes: list = [None] * dist.get_world_size(pp_group)
        mine = tuple(_local(self.held[0]).shape) if self.held else None
        dist.all_gather_object(shapes, mine, group=pp_group)
        self.shape = next(s for s in shapes if s is not None)
        self.device = _device(model_parts)

    def __call__(self) -> None:
        total = torch.zeros(self.shape, device=self.device)
        for p in self.held:
            if p.grad is None:
                continue
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                # e.g. a partial-sum gradient under tensor parallelism: reduce it to the
                # parameter's own sharding first, so both ends hold the same shard.
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            total += _local(p.grad).float()
        dist.all_reduce(total, group=self.group)
        for p in self.held:
            if p.grad is not None:
                _local(p.grad).copy_(total)


def _device(model_parts: list[nn.Module]) -> torch.device:
    p = next(p for m in model_parts for p in m.parameters())
    return _local(p).device
