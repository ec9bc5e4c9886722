"""`python -m parallm.train job.toml [--resume [MODE]] [--section.key value ...]`: the entry point
each rank runs (started by `parallm train --nproc N`'s agent, or by `torchrun -m parallm.train`),
and what `parallm train` runs in-process for one process.

Every check that needs no rank (`train.preflight`) runs before the process group is joined, on
every rank alike, so a bad job is one line (printed by rank 0) and exit 2 on every rank. Failures
are loud and bounded: any other exception is printed by the rank that raised it, which exits 1,
and the agent then stops the other ranks; a rank that waits on a dead peer fails after
`parallel.timeout_s`. Under an elastic agent with restarts, use `--resume auto` (`parallm train`
does: its `--resume never` removes the checkpoints before launch and starts the ranks with `auto`),
so that restarted ranks resume from this job's own checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from parallm.train.preflight import RESUME_MODES


def add_resume_option(parser: argparse.ArgumentParser) -> None:
    """`--resume [auto|always|never]`: bare `--resume` is `always`, the default `auto`."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const="always",
        default="auto",
        choices=RESUME_MODES,
        help="auto (default): continue from the newest complete checkpoint if there is one; "
        "always (bare --resume): fail if there is none; never: start at step 0",
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, printed once (by rank 0), exit 2 on every rank
        from parallm.distributed.launch import launched_rank

        if launched_rank() == 0:
            print(f"parallm: error: train: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _Parser(prog="parallm train", add_help=True)
    parser.add_argument("job", help="job file (TOML)")
    add_resume_option(parser)
    return parser.parse_known_args(argv)


def run(job: str, overrides: list[str], *, resume: str) -> int:
    """Load and check the job, join the process group (if launched), train, export, sample."""
    from parallm.config import JobConfig, load_config
    from parallm.distributed.launch import (
        init_distributed,
        launched_local_rank,
        launched_world_size,
        restart_count,
    )
    from parallm.train.preflight import preflight

    cfg = load_config(JobConfig, job, overrides)
    restarts, most = restart_count()
    if restarts and launched_local_rank() == 0:  # once per node whose ranks failed
        print(f"parallm: restart {restarts} of at most {most}: --resume {resume}", flush=True)
    preflight(cfg, launched_world_size(), resume=resume)  # before any rank waits on another
    local_rank = init_distributed(cfg.parallel.timeout_s)
    from parallm.train.trainer import Trainer, summary

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
    from parallm.distributed.launch import rank_main

    args, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    return rank_main(lambda: run(args.job, overrides, resume=args.resume))


if __name__ == "__main__":
    from parallm.distributed.launch import leave

    leave(main())
