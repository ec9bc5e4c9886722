"""Show a plan: a table for people, a JSON-able dict for tools, and the `parallm plan` command."""

from __future__ import annotations

import json

from parallm.errors import UserError
from parallm.models.hf import read_args
from parallm.models.registry import family_of_args
from parallm.planner.cost_model import COMM_AXES, GIB, Candidate
from parallm.planner.search import plan, recommend
from parallm.planner.state import facts_of

GB = 1e9  # traffic is shown in decimal GB, memory in GiB
MEMORY_COLUMNS = (
    "parameters",
    "gradients",
    "optimizer",
    "gathered",
    "unsharded",
    "activations",
    "logits",
    "pipeline",
    "temporaries",
)
MEMORY_HEADERS = ("params", "grads", "optim", "gather", "fullgr", "activ", "logits", "pipe", "tmp")
# What each memory column is (cost_model's docstring, "Memory", has the model in full).
MEMORY_LEGEND = (
    "memory: GiB per GPU on the fullest rank at its peak (the last backward, or the optimizer",
    "step when that holds more):",
    "  params  float32 parameter shards (AdamW's master weights)",
    "  grads   their float32 gradient shards (not made yet at the peak under ZeRO-1 with",
    "          gradient accumulation)",
    "  optim   AdamW's two moments and steps",
    "  gather  parameters unsharded in the compute dtype: FSDP's gathers (ZeRO-3 the root and",
    "          one block, ZeRO-1/2 every block, a pipeline stage all of it), without FSDP",
    "          autocast's low-precision copies",
    "  fullgr  full float32 gradients kept across micro-batches (ZeRO-1, FSDP under a pipeline)",
    "  activ   saved for backward, every micro-batch in flight, after activation checkpointing",
    "  logits  the loss's logits, float32 log-softmax and its gradient (last pipeline stage)",
    "  pipe    stage outputs kept until the step ends (pipeline)",
    "  tmp     AdamW's scratch (when the optimizer step is the peak)",
    "  total   all of these plus the reserved margin (CUDA context, buffers, fragmentation)",
)
COMM_HEADERS = ("fsdp", "dp_rep", "tp", "cp", "pp")


def _row(i: int, c: Candidate) -> list[str]:
    mem = [f"{getattr(c.memory, k) / GIB:.2f}" for k in MEMORY_COLUMNS]
    comm = [f"{c.comm_bytes[a] / GB:.2f}" if c.comm_bytes[a] else "-" for a in COMM_AXES]
    return [
        str(i),
        c.layout.label(),
        "yes" if c.fits else "NO",
        *mem,
        f"{c.memory.total / GIB:.2f}",
        *comm,
        f"{c.step_s:.4g}",
        f"{c.tokens_per_s:,.0f}",
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            cell.ljust(w) if j == 1 else cell.rjust(w)  # the layout label reads left to right
            for j, (cell, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_plan(candidates: list[Candidate], *, gpu_memory_gb: float, limit: int = 15) -> str:
    """A legend of the memory columns (`MEMORY_LEGEND`), then a table of the first `limit`
    candidates (memory of the fullest rank at its peak in GiB per GPU, by term; traffic in GB
    sent per GPU per step by mesh axis; step time, throughput, whether it fits), then the
    recommendation, or a clear statement that nothing fits."""
    if not candidates:
        return (
            "NO VALID LAYOUT: every combination of degrees breaks a divisibility rule of the "
            "model (heads, kv heads, ffn, vocabulary, layers), the sequence length, or the split "
            "of the batch into whole micro-batches; try another GPU count, batch or micro-batch."
        )
    header = ["#", "layout", "fits", *MEMORY_HEADERS, "total", *COMM_HEADERS, "step s", "tok/s"]
    shown = candidates[:limit]
    lines = [
        *MEMORY_LEGEND,
        "comm: GB sent per GPU per step, by mesh axis",
        *_table([header] + [_row(i + 1, c) for i, c in enumerate(shown)]),
    ]
    if len(candidates) > len(shown):
        fitting = sum(c.fits for c in candidates)
        lines.append(
            f"... and {len(candidates) - len(shown)} more; {fitting} of the {len(candidates)} "
            "candidates fit"
        )
    best = recommend(candidates)
    if best is None:
        smallest = min(candidates, key=lambda c: c.memory.total)
        lines.append(
            f"NO LAYOUT FITS in {gpu_memory_gb:g} GiB per GPU: the smallest footprint is "
            f"{smallest.memory.total / GIB:.2f} GiB ({smallest.layout.label()}). Use more or "
            "larger GPUs, a shorter sequence or a smaller micro-batch, or activation "
            "checkpointing (--parallel.activation_checkpoint=full)."
        )
    else:
        lines.append(
            f"recommended: {best.layout.label()}: {best.step_s:.4g} s/step, "
            f"{best.tokens_per_s:,.0f} tokens/s, {best.memory.total / GIB:.2f} of "
            f"{gpu_memory_gb:g} GiB per GPU"
        )
        lines.append("  parallm train JOB " + " ".join(best.overrides))
    return "\n".join(lines)


def plan_to_dict(candidates: list[Candidate], *, gpu_memory_gb: float) -> dict:
    """The plan as plain data: the budget, the recommendation (or None) and every candidate."""
    best = recommend(candidates)
    return {
        "gpu_memory_gb": gpu_memory_gb,
        "fits_any": best is not None,
        "recommended": best.to_dict() if best is not None else None,
        "candidates": [c.to_dict() for c in candidates],
    }


def _describe(args) -> str:
    f = facts_of(args)
    return (
        f"{f.num_params / 1e9:.3f}B parameters ({f.n_layers} layers, dim {f.dim}, "
        f"{f.n_heads} heads / {f.n_kv_heads} kv, ffn {f.ffn_dim}, vocab {f.vocab_size})"
    )


def _plan_dir(
    model_dir: str,
    gpus: int,
    gpu_memory_gb: float,
    seq_len: int,
    batch: int,
    micro_batch: int,
    zero_stage: int,
    activation_checkpoint: str,
) -> tuple[object, list[Candidate]]:
    args = read_args(model_dir)
    spec = family_of_args(args)
    if spec.is_video:
        raise UserError(
            f"--model: {model_dir} is a {spec.model_types[0]} video model; parallm plan sizes "
            "language models (a video model trains with data parallel, ZeRO and sequence "
            "parallel: measure them with `parallm bench video`)"
        )
    candidates = plan(
        args,
        gpus=gpus,
        gpu_memory_gb=gpu_memory_gb,
        seq_len=seq_len,
        batch=batch,
        micro_batch=micro_batch,
        zero_stage=zero_stage,
        activation_checkpoint=activation_checkpoint,
    )
    return args, candidates


def plan_command(
    model_dir: str,
    gpus: int,
    gpu_memory_gb: float,
    seq_len: int,
    batch: int,
    micro_batch: int = 1,
    *,
    zero_stage: int = 3,
    activation_checkpoint: str = "none",
) -> str:
    """The text `parallm plan` prints for the model in `model_dir` (its `config.json`), for
    ZeRO stage `zero_stage` and activation checkpointing `activation_checkpoint`."""
    args, candidates = _plan_dir(
        model_dir,
        gpus,
        gpu_memory_gb,
        seq_len,
        batch,
        micro_batch,
        zero_stage,
        activation_checkpoint,
    )
    head = (
        f"{model_dir}: {_describe(args)}\n"
        f"{gpus} GPUs x {gpu_memory_gb:g} GiB; {batch} sequences x {seq_len} tokens per step, "
        f"micro-batch {micro_batch}; bf16 compute, float32 state, AdamW, ZeRO-{zero_stage}, "
        f"activation checkpointing {activation_checkpoint}"
    )
    return head + "\n" + format_plan(candidates, gpu_memory_gb=gpu_memory_gb)


def plan_json(
    model_dir: str,
    gpus: int,
    gpu_memory_gb: float,
    seq_len: int,
    batch: int,
    micro_batch: int = 1,
    *,
    zero_stage: int = 3,
    activation_checkpoint: str = "none",
) -> str:
    """`plan_command`'s plan as a JSON document (`plan_to_dict` plus the request)."""
    args, candidates = _plan_dir(
        model_dir,
        gpus,
        gpu_memory_gb,
        seq_len,
        batch,
        micro_batch,
        zero_stage,
        activation_checkpoint,
    )
    out = {
        "model": model_dir,
        "parameters": facts_of(args).num_params,
        "gpus": gpus,
        "seq_len": seq_len,
        "batch": batch,
        "micro_batch": micro_batch,
        "zero_stage": zero_stage,
        "activation_checkpoint": activation_checkpoint,
        **plan_to_dict(candidates, gpu_memory_gb=gpu_memory_gb),
    }
    return json.dumps(out, indent=2)
