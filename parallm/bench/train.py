"""`parallm bench train`: a fixed number of training steps of a named model shape and layout.

Random token ids (no files, no tokenizer), a fresh model of the named shape, the usual trainer
on whatever layout `--set parallel.*` asks for. Reports tokens/s per device, MFU (model FLOPs,
6 x non-embedding params + output head + causal attention, over the device's dense bf16 peak)
and peak memory, as medians over the steps after warm-up, printed and saved as JSON.

    parallm bench train --shape llama3.2-1b --seq-len 4096 --batch 8 --steps 20
    parallm bench train --shape tiny --nproc 2 --set parallel.dp_shard=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# Published shapes (config.json of each model family's release), for benchmarks only.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
        tie_embeddings=True, rope_theta=500000.0, max_seq_len=131072,
    ),
    "llama3.2-3b": dict(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
        tie_embeddings=True, rope_theta=500000.0, max_seq_len=131072,
    ),
    "llama3.1-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
        tie_embeddings=False, rope_theta=500000.0, max_seq_len=131072,
    ),
    "qwen3-0.6b": dict(
        architecture="qwen3", dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
        ffn_dim=3072, vocab_size=151936, tie_embeddings=True, rope_theta=1000000.0,
        max_seq_len=40960,
    ),
    "tiny": dict(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, vocab_size=4096,
        max_seq_len=4096,
    ),
}  # fmt: skip


def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The job (as --section.key overrides) that the benchmark trains."""
    if args.shape not in SHAPES:
        from parallm.errors import UserError

        raise UserError(f"--shape: {args.shape!r} is not known; valid: {', '.join(SHAPES)}")
    steps = args.warmup + args.steps
    batch_tokens = args.batch * args.seq_len
    out = [f"--model.{k}={v}" for k, v in SHAPES[args.shape].items()]
    out += [
        f"--data.seq_len={args.seq_len}",
        f"--data.random_tokens={max(batch_tokens * steps + 1, 2 * args.seq_len + 1)}",
        f"--train.steps={steps}",
        f"--train.batch_size={args.batch}",
        f"--train.micro_batch_size={args.micro_batch or args.batch}",
        "--train.warmup_steps=0",
        f"--train.log_every={max(steps // 10, 1)}",
        "--checkpoint.every=0",
        "--checkpoint.export_hf=false",
        "--generate.max_tokens=0",
        f"--output.dir={args.out}",
    ]
    return out + [f"--{s}" for s in args.set]


def report(records: list[dict[str, Any]], args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Medians over the measured steps (the first `warmup` steps compile, allocate, warm up)."""
    measured = records[args.warmup :] or records

    def median(key: str) -> float | None:
        values = [r[key] for r in measured if key in r]
        return statistics.median(values) if values else None

    return {
        "shape": args.shape,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "devices": world,
        "layout": args.set,
        "steps_measured": len(measured),
        "tokens_per_s": median("tokens_per_s"),
        "tokens_per_s_per_device": median("tokens_per_s_per_device"),
        "step_time_s": median("step_time_s"),
        "mfu": median("mfu"),
        "peak_memory_gib": max(
            (r["peak_memory_gib"] for r in records if "peak_memory_gib" in r), default=None
        ),
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallm bench train", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--micro-batch", type=int, default=0, help="per forward (0: the whole batch)")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="any job override, e.g. parallel.tp=2 or parallel.activation_checkpoint=full",
    )  # fmt: skip
    p.add_argument("--out", default="runs/bench/train", help="output directory (report.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on this process (under torchrun, on every rank)."""
    import torch.distributed as dist

    from parallm.config import JobConfig, load_config
    from parallm.distributed.launch import init_distributed
    from parallm.train.trainer import Trainer
    from parallm.utils.fs import write_json_atomic

    args = parser().parse_args(argv)
    cfg = load_config(JobConfig, None, bench_overrides(args))
    local_rank = init_distributed(cfg.parallel.timeout_s)
    trainer = Trainer(cfg, local_rank=local_rank)
    records = trainer.fit()
    if trainer.rank == 0:
        result = report(records, args, trainer.world)
        write_json_atomic(Path(args.out) / "report.json", result)
        print(json.dumps(result, indent=2), flush=True)
        print(f"saved {Path(args.out) / 'report.json'}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
