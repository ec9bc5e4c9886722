"""Linear layers on oneDNN-packed weights for the engine's steps on a CPU.

A CPU GEMM with few rows (a decode step's batch) spends much of its time re-laying out the
weight; oneDNN can lay it out once ("reorder" into its blocked format) and reuse it. vLLM's CPU
backend does the same (`create_onednn_mm`). Measured on the 2-core development machine, float32,
one GEMM (x: M x 384): a 384 -> 1024 projection 1.3-2x faster for M of 8-200, and the 384 ->
16384 output head 2.5-9x (M 64 down to 1); the results equal `F.linear` up to float32 rounding
(the sums are ordered differently).

`PackedLinears(model)` finds the model's plain `nn.Linear` layers; inside `active()` each runs
on its packed weight, outside they are untouched, so a trainer sharing the model
(`LLMEngine.from_model`) never sees the packed copies. A weight is packed again when it has
changed since (its storage or its version counter, which every in-place update bumps: an
optimizer step, a `copy_` from the gathered shards). The cost is a second copy of the packed
weights in memory. Tensor-parallel shards and anything that is not a plain `nn.Linear` run as
before; so does every layer on a GPU, and where oneDNN is not built in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# The row count oneDNN's layout is chosen for; measured, the choice (1..1024) changes nothing
# of note for M from 1 to 1024.
PACK_ROWS_HINT = 64
PACKED_DTYPES = (torch.float32,)


def can_pack(model: nn.Module) -> bool:
    """Whether `model`'s linear layers can run on packed weights: float32 on a CPU with oneDNN."""
    param = next(model.parameters())
    return (
        param.device.type == "cpu"
        and param.dtype in PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
    )


class PackedLinears:
    """The packed weights of `model`'s `nn.Linear` layers (none when `can_pack` is false)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = (
            [m for m in model.modules() if type(m) is nn.Linear] if can_pack(model) else []
        )
        # layer -> ((storage pointer, version) of the weight it was packed from, its forward)
        self._packed: dict[nn.Linear, tuple[tuple[int, int], Callable]] = {}

    def packed_forward(self, layer: nn.Linear):
        """`layer`'s forward on its packed weight (packed again if the weight has changed)."""
        weight = layer.weight
        key = (weight.data_ptr(), weight._version)
        cached = self._packed.get(layer)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
            cached = self._packed[layer] = (key, _packed_forward(packed, layer.bias))
        return cached[1]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Every layer runs on its packed weight inside (packed now if new or changed)."""
        # Through the instance __dict__: nn.Module.__setattr__ would cost more than the check.
        for layer in self.layers:
            layer.__dict__["forward"] = self.packed_forward(layer)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.__dict__["forward"]  # back to nn.Linear.forward


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")

    return forward
