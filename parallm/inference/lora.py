"""Many LoRA adapters served at once over one base model, in one batch (punica / vLLM style).

`LoraBank.attach` swaps every linear layer of the blocks (the output head excepted) for a
`MultiLoraLinear` that keeps the base layer and `max_loras` adapter slots stacked:
A (slots, r_max, in) and B (slots, out, r_max), a smaller rank padded with zeros and each
adapter's scale folded into its B. Before each step the runner tells the bank which tokens use
which slot (`set_step`, from the step's per-sequence slots, -1 for the base); every layer then
computes base(x) and, for each slot present, adds B_s(A_s(x[rows_s])) to those rows
(index_select / index_add_). A step mixes requests of the base and of any adapters, and tokens
of the base cost nothing more. Nothing is merged, so adapters load and unload between steps.

Tensor parallelism shards a slot like its base layer: a column-parallel base (q/k/v, gate/up)
gets the whole A and its rows of B, so the delta is its output shard; a row-parallel base (o,
down) gets its columns of A and the whole B, and the delta joins the base's partial sums before
their one all-reduce.

Adapters that save whole modules (`modules_to_save`) are refused: a request would need its own
copy of those weights. `parallm merge` folds such an adapter into a model to serve.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from parallm.errors import UserError
from parallm.models.lora import ALL_LINEAR, LoraSpec, is_lora_param
from parallm.models.peft_format import CONFIG_FILE, Adapter
from parallm.models.plan import TP
from parallm.models.registry import family_of_args

DEFAULT_MAX_RANK = 16


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for `LLM.generate(..., lora=...)`, in vLLM's shape: its name, an id (kept for
    familiarity; parallm numbers its loads itself) and its peft directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str


def servable_modules(args) -> list[str]:
    """The modules an adapter may adapt when served: every linear layer but the output head."""
    return _servable(family_of_args(args).build(args))


def _servable(meta: nn.Module) -> list[str]:
    return LoraSpec(r=1, alpha=1, target_modules=ALL_LINEAR).targets(meta)


def check_servable(adapter: Adapter, *, modules: set[str], max_rank: int, field: str) -> None:
    """A UserError naming `field` unless the bank can serve `adapter`: no whole modules saved,
    rank at most `max_rank`, only `modules` adapted, each with both of its matrices."""
    saved = sorted(set(adapter.spec.modules_to_save) | _saved_modules(adapter))
    if saved:
        raise UserError(
            f"{field}: the adapter also saves whole modules ({', '.join(saved)}), which serving "
            "does not swap per request; fold it into the base with `parallm merge` and serve "
            "the merged model"
        )
    r = adapter.spec.r
    if r > max_rank:
        raise UserError(
            f"{field}: rank r={r} exceeds max_lora_rank={max_rank}; start with a larger one "
            f"(serve: --max-lora-rank {r}; LLM: max_lora_rank={r})"
        )
    adapted = {n.rpartition(".lora_")[0] for n in adapter.tensors if is_lora_param(n)}
    for name in sorted(adapted):
        if name not in modules:
            raise UserError(
                f"{field}: it adapts {name}; served adapters may adapt the linear layers of the "
                "blocks only (not the output head)"
            )
        for part in ("A", "B"):
            if f"{name}.lora_{part}.weight" not in adapter.tensors:
                raise UserError(
                    f"{field}: {name} has no lora_{part} weight; the file is incomplete"
                )


def _saved_modules(adapter: Adapter) -> set[str]:
    return {n.rpartition(".")[0] for n in adapter.tensors if not is_lora_param(n)}


def rank_of(path: str | Path) -> int | None:
    """The rank `r` in an adapter directory's config, or None when it cannot be read (loading it
    then says why)."""
    try:
        return int(json.loads((Path(path) / CONFIG_FILE).read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class MultiLoraLinear(nn.Module):
    """A base linear layer (plain, or a tensor-parallel shard) plus `max_loras` adapter slots.

    lora_a (slots, r_max, in_local), lora_b (slots, out_local, r_max), in the model's dtype;
    `active[s]`: slot s adapts this layer (else it is skipped)."""

    def __init__(
        self,
        base_layer: nn.Module,
        bank: LoraBank,
        *,
        in_features: int,
        out_features: int,
        row_parallel: bool,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bank = bank  # a plain object shared by every layer: the step's rows per slot
        self.row_parallel = row_parallel
        weight = base_layer.weight
        slots, rank = bank.max_loras, bank.max_rank
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.register_buffer("lora_a", torch.zeros(slots, rank, in_features, **kw), False)
        self.register_buffer("lora_b", torch.zeros(slots, out_features, rank, **kw), False)
        self.active = [False] * slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (1, N, in_local)
        if self.row_parallel:
            out = self.base_layer.partial(x)
            self._add_adapters(x, out)
            return self.base_layer.reduce(out)
        out = self.base_layer(x)
        self._add_adapters(x, out)
        return out

    def _add_adapters(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += B_s(A_s(x)) on the rows of each slot s in this step (in place)."""
        groups = [g for g in self.bank.groups if self.active[g[0]] or self.bank.profiling]
        if not groups:
            return
        flat_x = x.reshape(-1, x.shape[-1])  # (N, in)
        flat_out = out.view(-1, out.shape[-1])  # (N, out), a view: adds land in `out`
        for slot, r, rows in groups:
            a, b = self.lora_a[slot, :r], self.lora_b[slot, :, :r]  # (r, in), (out, r)
            if rows is None:  # every token of the step uses this slot
                flat_out += (flat_x @ a.T) @ b.T
            else:
                flat_out.index_add_(0, rows, (flat_x.index_select(0, rows) @ a.T) @ b.T)

    @torch.no_grad()
    def fill(self, slot: int, a: torch.Tensor, b: torch.Tensor, tp_rank: int) -> None:
        """Slot `slot` from an adapter's full A (r, in) and scaled B (out, r): this rank's
        slice of each, the rest of the slot zero."""
        from parallm.inference.tp_model import local_slice

        self.clear(slot)
        r = a.shape[0]
        dst_a, dst_b = self.lora_a[slot, :r], self.lora_b[slot, :, :r]
        dst_a.copy_(local_slice(a, dst_a.shape, tp_rank))
        dst_b.copy_(local_slice(b, dst_b.shape, tp_rank))
        self.active[slot] = True

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.active[slot] = False


class LoraBank:
    """The adapter slots of one rank's model: its `MultiLoraLinear` layers by module name, the
    rank of each slot's adapter, and the current step's rows per slot (`groups`)."""

    def __init__(self, *, max_loras: int, max_rank: int, tp_rank: int = 0) -> None:
        self.max_loras, self.max_rank, self.tp_rank = max_loras, max_rank, tp_rank
        self.layers: dict[str, MultiLoraLinear] = {}
        self.ranks = [0] * max_loras
        # (slot, rank, rows (n,) or None for all N tokens) per slot in the current step
        self.groups: list[tuple[int, int, torch.Tensor | None]] = []
        self.profiling = False

    @classmethod
    def attach(
        cls, model: nn.Module, *, max_loras: int, max_rank: int, tp_rank: int = 0, tp_size: int = 1
    ) -> LoraBank:
        """Swap the servable linear layers of `model` (whole, or a tensor-parallel shard made by
        `tp_model`) for multi-adapter layers with empty slots; returns their bank."""
        bank = cls(max_loras=max_loras, max_rank=max_rank, tp_rank=tp_rank)
        meta = family_of_args(model.args).build(model.args)  # the unsharded sizes
        for name in _servable(meta):
            full = meta.get_submodule(name)
            base = model.get_submodule(name)
            style = getattr(base, "style", None)  # a tp_model shard says how it is split
            in_f, out_f = full.in_features, full.out_features
            if style is TP.COLWISE:
                out_f //= tp_size
            elif style is TP.ROWWISE:
                in_f //= tp_size
            else:
                assert style is None, f"{name}: a {style} layer cannot carry an adapter"
            layer = MultiLoraLinear(
                base, bank, in_features=in_f, out_features=out_f, row_parallel=style is TP.ROWWISE
            )
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
            bank.layers[name] = layer
        return bank

    def check(self, adapter: Adapter, field: str) -> None:
        check_servable(adapter, modules=set(self.layers), max_rank=self.max_rank, field=field)

    def load(self, slot: int, adapter: Adapter) -> None:
        """Put `adapter` (checked) into `slot`, replacing whatever was there."""
        scale = adapter.spec.scaling
        for name, layer in self.layers.items():
            a = adapter.tensors.get(f"{name}.lora_A.weight")
            if a is None:
                layer.clear(slot)
                continue
            b = adapter.tensors[f"{name}.lora_B.weight"].float() * scale
            layer.fill(slot, a.float(), b, self.tp_rank)
        self.ranks[slot] = adapter.spec.r

    def set_step(self, slots: list[int], lengths: list[int], device: torch.device) -> None:
        """The next forward's rows per slot, from each sequence's slot (-1: base) and its
        number of new tokens."""
        rows: dict[int, list[int]] = {}
        offset = 0
        for slot, n in zip(slots, lengths, strict=True):
            if slot >= 0:
                rows.setdefault(slot, []).extend(range(offset, offset + n))
            offset += n
        self.groups = [
            (s, self.ranks[s], None if len(r) == offset else torch.tensor(r, device=device))
            for s, r in rows.items()
        ]

    @contextmanager
    def profile(self) -> Iterator[None]:
        """Forwards inside run every token through slot 0 at the full rank (zeros: the output
        is the base's), so a measured step peak includes the adapters' work."""
        self.groups, self.profiling = [(0, self.max_rank, None)], True
        try:
            yield
        finally:
            self.groups, self.profiling = [], False
