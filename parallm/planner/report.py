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
MEMORY_COLUMNS = ("parameters", "gradients", "optimizer", "gathered", "activations", "logits")
MEMORY_HEADERS = ("params", "grads", "optim", "gather", "activ", "logits")
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
    """A table of the first `limit` candidates (memory of the fullest rank in GiB per GPU,
    traffic in GB sent per GPU per step by mesh axis, step time, throughput, whether it fits),
    then the recommendation, or a clear statement that nothing fits."""
    if not candidates:
        return (
            "NO VALID LAYOUT: every combination of degrees breaks a divisibility rule of the "
            "model (heads, kv heads, ffn, vocabulary, layers), the sequence length, or the split "
            "of the batch into whole micro-batches; try another GPU count, batch or micro-batch."
        )
    header = ["#", "layout", "fits", *MEMORY_HEADERS, "total", *COMM_HEADERS, "step s", "tok/s"]
    shown = candidates[:limit]
    lines = [
        "memory: GiB per GPU on the fullest rank; comm: GB sent per GPU per step, by mesh axis",
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
            "larger GPUs, a shorter sequence or a smaller micro-batch (activation "
            "checkpointing, which this plan does not model, also saves activations)."
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
    model_dir: str, gpus: int, gpu_memory_gb: float, seq_len: int, batch: int, micro_batch: int
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
    )
    return args, candidates


def plan_command(
    model_dir: str, gpus: int, gpu_memory_gb: float, seq_len: int, batch: int, micro_batch: int = 1
) -> str:
    """The text `parallm plan` prints for the model in `model_dir` (its `config.json`)."""
    args, candidates = _plan_dir(model_dir, gpus, gpu_memory_gb, seq_len, batch, micro_batch)
    head = (
        f"{model_dir}: {_describe(args)}\n"
        f"{gpus} GPUs x {gpu_memory_gb:g} GiB; {batch} sequences x {seq_len} tokens per step, "
        f"micro-batch {micro_batch}; bf16 compute, float32 state, AdamW, ZeRO-3, no recompute"
    )
    return head + "\n" + format_plan(candidates, gpu_memory_gb=gpu_memory_gb)


def plan_json(
    model_dir: str, gpus: int, gpu_memory_gb: float, seq_len: int, batch: int, micro_batch: int = 1
) -> str:
    """`plan_command`'s plan as a JSON document (`plan_to_dict` plus the request)."""
    args, candidates = _plan_dir(model_dir, gpus, gpu_memory_gb, seq_len, batch, micro_batch)
    out = {
        "model": model_dir,
        "parameters": facts_of(args).num_params,
        "gpus": gpus,
        "seq_len": seq_len,
        "batch": batch,
        "micro_batch": micro_batch,
        **plan_to_dict(candidates, gpu_memory_gb=gpu_memory_gb),
    }
    return json.dumps(out, indent=2)
