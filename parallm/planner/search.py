"""Enumerate the layouts a model admits on a number of GPUs and rank their predictions."""

from __future__ import annotations

import itertools

from parallm.distributed.context_parallel import CP_MODES
from parallm.errors import UserError
from parallm.planner.cost_model import TP_DEGREES, Candidate, Hardware, estimate
from parallm.planner.spec import Layout, PlanRequest
from parallm.planner.state import facts_of


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _usable(args, layout: Layout, req: PlanRequest) -> bool:
    """Whether the trainer would accept `layout` for this model, sequence and batch."""
    if req.batch % (layout.dp * req.micro_batch):
        return False  # each data-parallel rank needs whole micro-batches
    if layout.pp > 1 and layout.micro_batches(req) < layout.pp:
        return False  # 1F1B needs at least as many micro-batches as stages
    try:
        layout.dims().validate_model(
            args,
            seq_len=req.seq_len,
            cp_mode=layout.cp_mode,
            n_stages=layout.pp,
        )
    except UserError:
        return False
    return True


def valid_layouts(args, req: PlanRequest, hw: Hardware) -> list[Layout]:
    """Every layout of `req.gpus` GPUs the trainer accepts: tp a power of two within one node,
    pp dividing the layers (1F1B, one stage per rank), cp in either mode, and the data-parallel
    rest split every way between replication and sharding."""
    out = []
    divisors = _divisors(req.gpus)
    for tp, pp, cp, rep in itertools.product(TP_DEGREES, divisors, divisors, divisors):
        if tp > hw.gpus_per_node or req.gpus % (tp * pp * cp * rep) or facts_of(args).n_layers % pp:
            continue
        shard = req.gpus // (tp * pp * cp * rep)
        for mode in CP_MODES if cp > 1 else CP_MODES[:1]:
            layout = Layout(dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, pp=pp, cp_mode=mode)
            if _usable(args, layout, req):
                out.append(layout)
    return out


def plan(
    args,
    *,
    gpus: int,
    gpu_memory_gb: float,
    seq_len: int,
    batch: int,
    micro_batch: int = 1,
    dtype_bytes: int = 2,
    zero_stage: int = 3,
    activation_checkpoint: str = "none",
    hardware: Hardware | None = None,
) -> list[Candidate]:
    """Predict every valid layout for training `args` on `gpus` GPUs of `gpu_memory_gb` GiB.

    `batch` is the global number of sequences of `seq_len` tokens per optimizer step,
    `micro_batch` the sequences per forward/backward (per pipeline micro-batch under pp),
    `dtype_bytes` the compute dtype (2: bf16 mixed precision), `zero_stage` the ZeRO stage under
    FSDP and `activation_checkpoint` none, full or selective (the trainer's `--parallel.*` flags
    of the same names). Returns the candidates that fit first, fastest first, then those that do not, smallest footprint first; see `recommend`.
    """
    req = PlanRequest(
        gpus=gpus,
        gpu_memory_gb=gpu_memory_gb,
        seq_len=seq_len,
        batch=batch,
        micro_batch=micro_batch,
        dtype_bytes=dtype_bytes,
        zero_stage=zero_stage,
        activation_checkpoint=activation_checkpoint,
    )
    hw = hardware or Hardware()
    candidates = [estimate(args, layout, req, hw) for layout in valid_layouts(args, req, hw)]
    # Equal speed: less memory first. Not fitting: closest to fitting first.
    candidates.sort(
        key=lambda c: (0, c.step_s, c.memory.total) if c.fits else (1, c.memory.total, c.step_s)
    )
    return candidates


def recommend(candidates: list[Candidate]) -> Candidate | None:
    """The fastest candidate that fits in memory, or None when none does."""
    return next((c for c in candidates if c.fits), None)
