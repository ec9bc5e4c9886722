"""Linear layers on oneDNN-packed weights for the engine's steps on a CPU.

A CPU GEMM with few rows (a decode step's batch) spends much of its time re-laying out the
weight; oneDNN can lay it out once ("reorder" into its blocked format) and reuse it. vLLM's CPU
backend does the same (`create_onednn_mm`). Measured on the 2-core development machine, float32,
one GEMM (x: M x 384): a 384 -> 1024 projection 1.3-2x faster for M of 8-200, and the 384 ->
16384 output head 2.5-9x (M 64 down to 1); the results equal `F.linear` up to float32 rounding
(the sums are ordered differently).

Layers that always read the same input (a module's `FUSED_LINEARS`, e.g. an attention's q, k
and v projections, an MLP's gate and up) run as one GEMM on their concatenated packed weights:
the first layer called computes every member's output and the others take theirs when they are
called with that same input tensor (any other input: the fused GEMM again). One GEMM instead
of three (384 -> 384 + 128 + 128) at 34 rows: 284 -> 206 us; gate + up 620 -> 570 us; at 1 row
117 -> 55 and 135 -> 94 us.

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
        plain = set(self.layers)
        # Groups of sibling layers fed the same input, as the modules declare them.
        self.groups = [
            group
            for module in (model.modules() if self.layers else ())
            for names in getattr(type(module), "FUSED_LINEARS", ())
            if _fusable(group := tuple(getattr(module, n, None) for n in names), plain)
        ]
        grouped = {layer for group in self.groups for layer in group}
        self.single = [layer for layer in self.layers if layer not in grouped]
        # layers -> ((storage pointer, version) of each weight packed from, their forwards)
        self._packed: dict[tuple[nn.Linear, ...], tuple[tuple, list[Callable]]] = {}
        self._fused: dict[tuple[nn.Linear, ...], _Fused] = {}
        # What the last `active()` installed: each layer's __dict__ and forward, and the key of
        # every weight then, so a step whose weights are all unchanged reinstalls them as they
        # are (one pass over the weights instead of a check per group).
        self._installed: list[tuple[dict, Callable]] = []
        self._installed_key: list[tuple[int, int]] | None = None

    def weights_key(self) -> list[tuple[int, int]]:
        """(storage pointer, version) of every layer's weight, as it is now."""
        # _parameters, not layer.weight: nn.Module.__getattr__ costs more than the check.
        return [
            (w.data_ptr(), w._version)
            for w in (layer._parameters["weight"] for layer in self.layers)
        ]

    def packed_forwards(self, layers: tuple[nn.Linear, ...]) -> list[Callable]:
        """One forward per layer of `layers`, all on one packed weight (packed again when any
        weight has changed)."""
        key = tuple((layer.weight.data_ptr(), layer.weight._version) for layer in layers)
        cached = self._packed.get(layers)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weight = torch.cat([layer.weight.detach() for layer in layers])
                biases = [layer.bias for layer in layers]
                bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
            forward = _packed_forward(packed, bias)
            if len(layers) == 1:
                forwards = [forward]
            else:
                fused = _Fused(forward, [layer.out_features for layer in layers])
                self._fused[layers] = fused
                forwards = fused.forwards
            cached = self._packed[layers] = (key, forwards)
        return cached[1]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Every layer runs on its packed weight inside (packed now if new or changed)."""
        key = self.weights_key()
        if key != self._installed_key:  # some weight is new or changed: repack what changed
            self._installed = [
                (layer.__dict__, forward)
                for layers in [*self.groups, *((layer,) for layer in self.single)]
                for layer, forward in zip(layers, self.packed_forwards(layers), strict=True)
            ]
            self._installed_key = key
        # Through the instance __dict__: nn.Module.__setattr__ would cost more than the check.
        for attrs, forward in self._installed:
            attrs["forward"] = forward
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.__dict__["forward"]  # back to nn.Linear.forward
            for fused in self._fused.values():
                fused.clear()  # no activation outlives the step


def _fusable(group: tuple, plain: set[nn.Linear]) -> bool:
    """Plain linear layers of one input size, all with a bias or none."""
    return (
        len(group) > 1
        and all(layer in plain for layer in group)
        and len({layer.in_features for layer in group}) == 1
        and len({layer.bias is None for layer in group}) == 1
    )


class _Fused:
    """Forwards for sibling layers over one GEMM: whichever is called computes every output and
    keeps the others' for their call with the same input tensor; a call with another input, or
    a second call, runs the GEMM again. `clear` drops what is kept (at the end of a step)."""

    def __init__(self, gemm: Callable, sizes: list[int]) -> None:
        self.gemm, self.sizes = gemm, sizes
        self.input: torch.Tensor | None = None
        self.kept: dict[int, torch.Tensor] = {}
        self.forwards = [self._member(i) for i in range(len(sizes))]

    def _member(self, i: int) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.input is x and i in self.kept:
                return self.kept.pop(i)
            outs = self.gemm(x).split_with_sizes(self.sizes, dim=-1)  # no Tensor.split wrapper
            self.input, self.kept = x, {j: out for j, out in enumerate(outs) if j != i}
            return outs[i]

        return forward

    def clear(self) -> None:
        self.input, self.kept = None, {}


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None):
    # The overload itself: calling the packet would resolve it on every call.
    linear = torch.ops.mkldnn._linear_pointwise.default

    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, packed, bias, "none", [None], "")

    return forward
