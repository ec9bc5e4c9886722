"""Forward and backward of one optimizer step on any layout; loss reduction; global clipping.

Every rank holds the same number of tokens per micro-batch (packed rows, equal data-parallel
slices, equal context-parallel chunks), so the global mean loss is the mean of the ranks' local
means: FSDP averages gradients over the data and context axes, tensor-parallel ranks compute the
same loss, and the pipeline's last stage is the only one that has it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from parallm.config import ParallelConfig
from parallm.distributed import pipeline
from parallm.distributed.parallel_dims import ParallelDims
from parallm.train.layout import RankModel


def _value(t: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor (under loss_parallel it is a replicated DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class StepRunner:
    """Runs the micro-batches of one optimizer step through this rank's model parts."""

    def __init__(
        self,
        model: RankModel,
        dims: ParallelDims,
        pcfg: ParallelConfig,
        *,
        device: torch.device,
        n_accum: int,
        autocast: torch.dtype | None,
    ) -> None:
        self.model, self.dims, self.pcfg = model, dims, pcfg
        self.device, self.n_accum, self.autocast = device, n_accum, autocast
        self.schedule = None
        self.tied_sync = None
        self.loss_scale = n_accum  # micro-batches whose gradients add up to one step's
        if dims.pp > 1:
            n_micro = pcfg.pp_microbatches or model.n_stages
            self.loss_scale = n_accum * n_micro
            self.schedule = pipeline.build_schedule(
                pcfg.pp_schedule,
                model.parts,
                model.stage_ids,
                model.n_stages,
                group=dims.mesh["pp"].get_group(),
                device=device,
                n_microbatches=n_micro,
                loss_fn=self._loss,
            )
            if model.parts[0].args.tie_embeddings:
                self.tied_sync = pipeline.TiedGradSync(model.parts, dims.mesh["pp"].get_group())

    # -- pieces ----------------------------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over these tokens, as a share of the step's mean loss."""
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return loss / self.loss_scale

    def _loss_ctx(self):
        # Vocabulary-parallel logits: the loss (forward and backward) runs on the shards.
        return loss_parallel() if self.dims.tp > 1 else nullcontext()

    def _autocast_ctx(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _shard_sequence(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims.cp == 1:
            return x
        from parallm.distributed.context_parallel import shard_sequence

        return shard_sequence(
            x,
            self.dims.coordinate("cp"),
            self.dims.cp,
            load_balance=self.pcfg.cp_mode == "ring",
        )

    # -- the step ------------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Accumulate gradients over `micro_batches`; return the global mean loss (all ranks)."""
        total = torch.zeros((), device=self.device)
        for i, (inputs, labels) in enumerate(micro_batches):
            inputs = self._shard_sequence(inputs.to(self.device))
            labels = self._shard_sequence(labels.to(self.device))
            if self.schedule is not None:
                total += self._pipeline_micro_batch(inputs, labels)
                continue
            last = i == len(micro_batches) - 1
            if self.dims.fsdp_enabled and self.pcfg.zero_stage == 1:
                # ZeRO-1: keep full gradients over accumulation, reduce-scatter once per step.
                self.model.parts[0].set_requires_gradient_sync(last)
            with self._loss_ctx():
                with self._autocast_ctx():
                    logits = self.model.parts[0](inputs)
                loss = self._loss(logits, labels)
                loss.backward()
            total += _value(loss.detach())
        if self.tied_sync is not None:
            self.tied_sync()
        return self._global_mean(total)

    def _pipeline_micro_batch(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.model.has_first_stage else ()
        target = labels if self.model.has_last_stage else None
        with self._loss_ctx(), self._autocast_ctx():
            self.schedule.step(*args, target=target, losses=losses)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([_value(x.detach()) for x in losses]).sum()

    def _global_mean(self, local: torch.Tensor) -> float:
        if not dist.is_initialized():
            return float(local)
        d = self.dims
        counts = self.model.has_last_stage and d.coordinate("tp") == 0
        value = local.float() / (d.dp * d.cp) if counts else torch.zeros((), device=self.device)
        value = value.reshape(1).clone()
        dist.all_reduce(value)
        return float(value)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to the global norm over every mesh axis (0: only measure); returns the norm."""
        params, counted = [], []
        for part in self.model.parts:
            for name, p in part.named_parameters():
                if p.grad is None:
                    continue
                params.append(p)
                # A tied head on a stage without the embedding is the same weight: count once.
                if not (
                    name == "lm_head.weight"
                    and part.args.tie_embeddings
                    and part.embed_tokens is None
                ):
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
