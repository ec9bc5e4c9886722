"""AdamW and the warmup + cosine learning-rate schedule.

The schedule is a pure function of the step, so a checkpoint needs only the step to restore it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model_parts: list[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D parameters)."""
    params = list(
        {id(p): p for m in model_parts for p in m.parameters() if p.requires_grad}.values()
    )
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach=False keeps the per-parameter update order independent of how parameters are
    # grouped or sharded, which the layout-equivalence tests rely on.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def lr_at(
    step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then cosine to min."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


class Optimizers:
    """One AdamW per model part (a rank's pipeline stages), stepped as one optimizer.

    Separate optimizers keep each part's state keyed by that part's own parameter names, which
    is what makes a checkpoint independent of how many stages a rank holds.
    """

    def __init__(self, model_parts: list[nn.Module], **kwargs) -> None:
        self.parts = model_parts
        self.optimizers = [build_optimizer([part], **kwargs) for part in model_parts]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
