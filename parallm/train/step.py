"""Forward and backward of one optimizer step on any layout; loss reduction; global clipping.

The loss of a step is the sum of the task's per-unit losses over the global batch divided by the
global number of counted units (`Task.count`), which is all-reduced over the data- and
context-parallel ranks and summed over the step's micro-batches (and the pipeline's) before any
forward. Each rank backpropagates its own sum times `dp * cp / count`: FSDP averages gradients
over those dp * cp ranks, so the gradient is the single-process one however unevenly the
counted tokens fall (masked labels, padding). Tensor-parallel ranks compute the same loss, and
the pipeline's last stage is the only one that has it.

A task that needs a frozen reference (DPO) gets its logits on every micro-batch first, without
gradients (`Reference`). The per-unit metrics a task reports (DPO's rewards) are reduced like the
loss.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from parallm.config import ParallelConfig
from parallm.distributed import pipeline
from parallm.distributed.parallel_dims import ParallelDims
from parallm.models.build import canonical_name
from parallm.models.lora import adapter_disabled
from parallm.models.registry import family_of_model
from parallm.train.layout import RankModel
from parallm.train.tasks import Batch, Task


def _value(t: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor (under loss_parallel it is a replicated DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@dataclass
class Reference:
    """The frozen model a task that `needs_reference` is scored against (the starting policy).

    `model` is a frozen copy laid out like the policy (full fine-tuning), or the policy itself
    (LoRA): then its adapters are switched off for the reference forward (a fresh adapter: the
    base, no copy of any weight), or, when `start` is given, its trainable parameters (this
    rank's shards, in `parameters()` order) hold those starting values for it: an adapter it
    started from, saved modules, which the reference keeps as they were (as TRL's copy of the
    adapter).
    """

    model: RankModel
    start: list[torch.Tensor] | None = None


class StepRunner:
    """Runs the micro-batches of one optimizer step through this rank's model parts."""

    def __init__(
        self,
        model: RankModel,
        dims: ParallelDims,
        pcfg: ParallelConfig,
        task: Task,
        *,
        device: torch.device,
        autocast: torch.dtype | None,
        reference: Reference | None = None,
    ) -> None:
        self.model, self.dims, self.pcfg, self.task = model, dims, pcfg, task
        self.device, self.autocast = device, autocast
        assert reference is not None or not task.needs_reference(), "the task needs a reference"
        self.reference = reference
        self.metrics: dict[str, float] = {}  # the task's per-unit metrics of the last step
        self._metric_sums: dict[str, torch.Tensor] = {}
        self.schedule = None
        self.tied_sync = None
        self.loss_scale = torch.ones((), device=device)  # dp * cp / global count, per step
        self._pipeline_batch: Batch | None = None  # the micro-batch the schedule is running
        part = model.parts[0]
        self.tied = family_of_model(part).tied(part.args)
        if dims.pp > 1:
            n_micro = pcfg.pp_microbatches or model.n_stages
            self.schedule = pipeline.build_schedule(
                pcfg.pp_schedule,
                model.parts,
                model.stage_ids,
                model.n_stages,
                group=dims.mesh["pp"].get_group(),
                device=device,
                n_microbatches=n_micro,
                loss_fn=self._pipeline_loss,
            )
            if self.tied:
                self.tied_sync = pipeline.TiedGradSync(model.parts, dims.mesh["pp"].get_group())

    # -- pieces ----------------------------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """This micro-batch's summed loss as its share of the step's global mean (times the
        dp * cp ranks FSDP averages gradients over); its metric sums are kept."""
        loss, metrics = self.task.loss_and_metrics(logits, batch)
        for name, value in metrics.items():
            value = _value(value).detach().float()
            self._metric_sums[name] = self._metric_sums.get(name, 0) + value
        return loss * self.loss_scale

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        """The one model part's forward on `batch` and its loss share (no pipeline). For a task
        that reads only labelled positions, the output head and the loss run on those alone
        (SFT: a fraction of the tokens; the head is most of a small model's time). Not under
        tensor parallelism, whose head works on sequence shards."""
        rows = None
        if self.task.labelled_logits_only and self.dims.tp == 1:
            rows = batch.loss_mask  # (B, T)
            batch = dataclasses.replace(batch, labels=batch.labels[rows][None])  # (1, N)
        with self._autocast_ctx():
            logits = self.task.forward(self.model.parts[0], batch, logit_rows=rows)
        return self._loss(logits, batch)

    @torch.no_grad()
    def _with_reference(self, batch: Batch) -> Batch:
        """`batch` with what the task keeps of the reference model's logits in its extras."""
        ref = self.reference
        model = ref.model.parts[0]
        if ref.model is not self.model:
            weights = nullcontext()
        elif ref.start is None:
            weights = adapter_disabled(model)
        else:
            weights = self._trainable_set_to(ref.start)
        with weights, self._loss_ctx(), self._autocast_ctx():
            logits = self.task.forward(model, batch)
            extras = self.task.reference_extras(logits, batch)
        if ref.model is not self.model or ref.start is not None:
            # ZeRO-1/2 keep parameters gathered after forward until backward reshards them: a
            # frozen copy has no backward (free them now), and the policy must not run on the
            # starting values gathered for the reference.
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        return dataclasses.replace(batch, extras={**batch.extras, **extras})

    @contextmanager
    def _trainable_set_to(self, values: list[torch.Tensor]):
        """The policy's trainable parameters hold `values` (same shards) inside the block."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        assert len(params) == len(values)
        current = [p.detach().clone() for p in params]
        for p, v in zip(params, values, strict=True):
            p.detach().copy_(v)
        try:
            yield
        finally:
            for p, v in zip(params, current, strict=True):
                p.detach().copy_(v)

    def _pipeline_loss(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # The schedule splits the target, the micro-batch's row indices, as it splits inputs.
        return self._loss(logits, self._pipeline_batch.select(rows))

    def _set_loss_scale(self, micro_batches: list[Batch]) -> float:
        """dp * cp / (counted units of the global batch), all-reduced before any forward;
        returns the global count."""
        count = torch.stack([self.task.count(b) for b in micro_batches]).sum().float()
        d = self.dims
        if self.task.model_shards_tokens:
            count = count / d.cp  # each cp rank holds 1/cp of every unit's tokens
        if dist.is_initialized() and d.dp * d.cp > 1:
            count = count.reshape(1).clone()
            dist.all_reduce(count, group=d.mesh["dp_cp"].get_group())
            count = count[0]
        self.loss_scale = d.dp * d.cp / count.clamp_min(1.0)
        return float(count)

    def _loss_ctx(self):
        # Vocabulary-parallel logits: the loss (forward and backward) runs on the shards.
        return loss_parallel() if self.dims.tp > 1 else nullcontext()

    def _autocast_ctx(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _prepare_all(self, micro_batches: list[Batch]) -> list[Batch]:
        """Each micro-batch prepared, with the reference's extras if the task needs them (all
        before any policy forward); the metric sums restart."""
        self._metric_sums = {}
        micro_batches = [self._prepare(b) for b in micro_batches]
        if self.task.needs_reference():
            micro_batches = [self._with_reference(b) for b in micro_batches]
        return micro_batches

    def _prepare(self, batch: Batch) -> Batch:
        """On this device, and this rank's part of every sequence under context parallelism
        (unless the model shards its tokens itself)."""
        batch = batch.to(self.device)
        if batch.position_ids is None:  # the global positions, before they are sharded
            batch.position_ids = batch.positions()
        if self.dims.cp == 1 or self.task.model_shards_tokens:
            return batch
        from parallm.distributed.context_parallel import shard_sequence

        rank, cp, balance = self.dims.coordinate("cp"), self.dims.cp, self.pcfg.cp_mode == "ring"
        return batch.map_tokens(lambda x: shard_sequence(x, rank, cp, load_balance=balance))

    # -- the step ------------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[Batch]) -> float:
        """Accumulate gradients over `micro_batches`; return the global mean loss (all ranks)."""
        micro_batches = self._prepare_all(micro_batches)
        count = self._set_loss_scale(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            if self.schedule is not None:
                total += self._pipeline_micro_batch(batch)
                continue
            last = i == len(micro_batches) - 1
            if self.dims.fsdp_enabled and self.pcfg.zero_stage == 1:
                # ZeRO-1: keep full gradients over accumulation, reduce-scatter once per step.
                self.model.parts[0].set_requires_gradient_sync(last)
            with self._loss_ctx():
                loss = self._forward_loss(batch)
                loss.backward()
            total += _value(loss.detach())
        self._settle_grads()
        if self.tied_sync is not None:
            self.tied_sync()
        self.metrics = self._global_metrics(count)
        return self._global_mean(total)

    def _settle_grads(self) -> None:
        """Give each tensor-parallel gradient its parameter's layout. A replicated weight used on
        sharded activations (a LoRA A before a column-sharded B, a B after a row-sharded A) gets
        a partial-sum gradient from DTensor; the optimizer must see the sum."""
        if self.dims.tp == 1 or self.dims.fsdp_enabled:  # FSDP reduces to its own layout
            return
        for p in self.model.parameters():
            g = p.grad
            if isinstance(g, DTensor) and g.placements != p.placements:
                p.grad = g.redistribute(p.device_mesh, p.placements)

    @torch.no_grad()
    def evaluate(self, micro_batches: list[Batch]) -> tuple[float, float]:
        """The global mean loss of a batch without training (forward only), and the global
        number of counted units it averages over (to weigh batches of an evaluation set)."""
        micro_batches = self._prepare_all(micro_batches)
        count = self._set_loss_scale(micro_batches)
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            if self.schedule is not None:
                total += self._pipeline_micro_batch(batch, train=False)
                continue
            with self._loss_ctx():
                total += _value(self._forward_loss(batch))
        self.metrics = self._global_metrics(count)
        return self._global_mean(total), count

    def _pipeline_micro_batch(self, batch: Batch, *, train: bool = True) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (batch.input_ids,) if self.model.has_first_stage else ()
        # Every stage gets the token layout (split into pipeline micro-batches like the inputs).
        kwargs = {"positions": batch.position_ids, "attention": batch.attention}
        if batch.document_ids is not None:
            kwargs["document_ids"] = batch.document_ids
        rows = torch.arange(batch.rows, device=self.device)
        target = rows if self.model.has_last_stage else None
        self._pipeline_batch = batch
        # torch's V schedules cannot run forward only: evaluation runs their step and drops
        # the gradients it made (the optimizer step before has cleared them).
        forward_only = not train and self.pcfg.pp_schedule not in pipeline.V_SCHEDULES
        run = self.schedule.eval if forward_only else self.schedule.step
        with torch.enable_grad() if not forward_only else nullcontext():
            with self._loss_ctx(), self._autocast_ctx():
                run(*args, target=target, losses=losses, **kwargs)
        if not train and not forward_only:
            for p in self.model.parameters():
                p.grad = None
        self._pipeline_batch = None
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([_value(x.detach()) for x in losses]).sum()

    def _global_mean(self, local: torch.Tensor) -> float:
        """The step's loss: the ranks holding it (last stage, first TP rank) add their shares."""
        d = self.dims
        if not dist.is_initialized():
            return float(local)
        counts = self.model.has_last_stage and d.coordinate("tp") == 0
        value = local.float() / (d.dp * d.cp) if counts else torch.zeros((), device=self.device)
        value = value.reshape(1).clone()
        dist.all_reduce(value)
        return float(value)

    def _global_metrics(self, count: float) -> dict[str, float]:
        """The task's metric sums as means over the global count of units (the ranks that hold
        the loss add theirs). Not under pipeline parallelism, where only the last stage knows
        which metrics there are."""
        d = self.dims
        if not self._metric_sums or d.pp > 1:
            return {}
        names = sorted(self._metric_sums)
        sums = torch.stack([self._metric_sums[n].to(self.device) for n in names])
        if dist.is_initialized():
            if not (self.model.has_last_stage and d.coordinate("tp") == 0):
                sums = torch.zeros_like(sums)
            dist.all_reduce(sums)
        return {n: float(v) / max(count, 1.0) for n, v in zip(names, sums, strict=True)}

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to the global norm over every mesh axis (0: only measure); returns the norm."""
        params, counted = [], []
        for part in self.model.parts:
            for name, p in part.named_parameters():
                if p.grad is None:
                    continue
                params.append(p)
                # A tied copy (a head on a stage without the embedding) is the same weight as
                # its source: count it once (on one stage, named_parameters lists it once).
                if canonical_name(name) not in self.tied:
                    counted.append(p.grad)
        norm = torch.nn.utils.get_total_norm(counted, 2.0, foreach=False) if counted else None
        if norm is None:
            norm = torch.zeros((), device=self.device)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.dims.pp > 1:
            sq = norm.float().pow(2).reshape(1).clone()
            dist.all_reduce(sq, group=self.dims.mesh["pp"].get_group())
            norm = sq.sqrt()[0]
        if max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=False)
        value = float(norm)
        return value if math.isfinite(value) else float("nan")
