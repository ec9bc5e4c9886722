"""`python -m parallm.train job.toml [--resume] [--section.key value ...]`, the entry point that
`torchrun` starts on every rank (and that `parallm train` runs in-process for one process).

Failures are loud and bounded: a user error found by every rank (a bad layout, a bad override)
is printed once, by rank 0, and every rank exits with status 2; any other exception is printed
by the rank that raised it, which exits 1, and torchrun then stops the other ranks. A rank that
waits on a dead peer fails after `parallel.timeout_s`.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch.distributed as dist

from parallm.errors import UserError


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="parallm train", add_help=True)
    parser.add_argument("job", help="job file (TOML)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    return parser.parse_known_args(argv)


def run(job: str, overrides: list[str], *, resume: bool) -> int:
    """Load the job, join the process group (if launched by torchrun), train, export, sample."""
    from parallm.config import JobConfig, load_config
    from parallm.distributed.launch import init_distributed
    from parallm.train.trainer import Trainer, summary

    cfg = load_config(JobConfig, job, overrides)
    local_rank = init_distributed(cfg.parallel.timeout_s)
    trainer = Trainer(cfg, resume=resume, local_rank=local_rank)
    records = trainer.fit()
    if trainer.rank == 0:
        print(summary(records), flush=True)
        if trainer.step == cfg.train.steps and cfg.checkpoint.export_hf:
            what = "LoRA adapter (peft format)" if trainer.lora else "Hugging Face directory"
            where = trainer.out / ("adapter" if trainer.lora else "hf")
            print(f"saved {what} {where}", flush=True)
            if cfg.generate.max_tokens > 0:
                print("--- sample ---\n" + trainer.sample(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    rank = 0
    try:
        return run(args.job, overrides, resume=args.resume)
    except UserError as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(f"parallm: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(
            f"parallm: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
