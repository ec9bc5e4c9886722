"""Every check of a job that needs no rank, run before anything is launched.

`parallm train --nproc N`, `parallm bench train --nproc N` and `python -m parallm.train` (on every
rank of a `torchrun` job, before the process group) call `preflight(cfg, world_size, resume=...)`:
the layout's degrees against the world size, the task and `[lora]` against the layout and the
model, the model's sizes against the layout, the batch and micro-batch arithmetic (pipeline
micro-batches included), the data files and the resume state. A mistake is one `UserError`
naming the field, the value and what is valid, found in a fraction of a second, before the
tokenizer is trained or a rank is started.

The vocabulary may be unknown before launch (it is the tokenizer's, trained or read later): the
checks that depend on it run again in `Trainer._validate` through `check_model`, the same code
with the model's final arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from parallm.errors import UserError

if TYPE_CHECKING:  # torch is imported by the checks, not by `--help` reading RESUME_MODES
    from parallm.config import JobConfig
    from parallm.distributed.parallel_dims import ParallelDims

RESUME_MODES = ("auto", "always", "never")


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What the checks worked out: the layout, the resolved micro-batch and the data files."""

    dims: ParallelDims
    micro_batch_size: int  # sequences per forward/backward on one data-parallel rank
    n_stages: int  # pipeline stages in all (1 without pipeline parallelism)
    files: list[Path]  # the data files (none with data.random_tokens)


def model_args_from_config(cfg: JobConfig, vocab_size: int):
    """A fresh model's args from `[model]` (its `architecture` names the family's model type),
    or the args of the directory in `model.path`."""
    from parallm.models.hf import read_args
    from parallm.models.registry import family

    m = cfg.model
    if m.path is not None:
        return read_args(m.path)
    return family(m.architecture).args_from_config(cfg, vocab_size)


def preflight(cfg: JobConfig, world_size: int, *, resume: str = "auto", args=None) -> Preflight:
    """Check `cfg` for `world_size` processes; `args`: the model's arguments when known (the
    trainer's, with the tokenizer's vocabulary), else built from `[model]` without it."""
    from parallm.distributed.parallel_dims import ParallelDims

    # First what needs neither torch nor the model: a mistake here answers at once.
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    files = _files(cfg)
    _check_resume(cfg, resume)
    from parallm.train.tasks import make_task

    task = make_task(cfg.task, job=cfg)
    task.check_layout(dims)  # e.g. DPO refuses pipeline and context parallelism
    _check_task(cfg, task)
    task.check_data(files)  # e.g. GRPO's reward functions import and return numbers
    vocab_known = args is not None or cfg.model.path is not None or bool(cfg.model.vocab_size)
    if args is None:
        args = model_args_from_config(cfg, cfg.model.vocab_size or 1)
    n_stages = pipeline_stages(cfg, dims)
    check_model(cfg, dims, args, vocab_known=vocab_known, task=task)
    if cfg.lora.enabled:
        from parallm.models.peft_format import start_adapter

        # Which layers an adapter targets does not depend on the vocabulary.
        start_adapter(cfg.lora.spec(), args, cfg.lora.init_from)
    micro = resolve_micro_batch(cfg, dims, n_stages)
    _check_device(cfg, dims)
    return Preflight(dims=dims, micro_batch_size=micro, n_stages=n_stages, files=files)


def pipeline_stages(cfg: JobConfig, dims: ParallelDims) -> int:
    """Pipeline stages in all: pp ranks x stages per rank (1 without pipeline parallelism)."""
    if dims.pp == 1:
        return 1
    from parallm.distributed.pipeline import stages_per_rank

    p = cfg.parallel
    return dims.pp * stages_per_rank(p.pp_schedule, p.pp_virtual_stages)


def check_model(
    cfg: JobConfig, dims: ParallelDims, args, *, vocab_known: bool = True, task=None
) -> None:
    """The model against the task (`task.check_model`: a language task refuses a video model
    and the other way round; the video task checks its sizes against the layout), and a language
    model's sizes against the layout and the sequence length (the vocabulary's only when
    `vocab_known`)."""
    from parallm.models.registry import family_of_args
    from parallm.train.tasks import make_task

    task = task if task is not None else make_task(cfg.task, job=cfg)
    task.check_model(args, dims)
    if task.model_shards_tokens:  # a video model: the task checked its tokens and heads
        return
    facts = family_of_args(args).facts(args)
    if cfg.data.seq_len > facts.max_seq_len:
        raise UserError(
            f"data.seq_len: {cfg.data.seq_len} exceeds the model's context of "
            f"{facts.max_seq_len} tokens (model.max_seq_len)"
        )
    dims.validate_model(
        args,
        seq_len=cfg.data.seq_len,
        cp_mode=cfg.parallel.cp_mode,
        n_stages=pipeline_stages(cfg, dims),
        skip=() if vocab_known else ("vocab_size",),
    )


def resolve_micro_batch(cfg: JobConfig, dims: ParallelDims, n_stages: int) -> int:
    """`train.micro_batch_size` as a number: "auto" is each data-parallel rank's whole share of
    the batch; an explicit number must divide that share. Under pipeline parallelism each
    micro-batch is cut into `parallel.pp_microbatches` pipeline micro-batches, which must divide
    it."""
    t, p = cfg.train, cfg.parallel
    if t.batch_size % dims.dp:
        raise UserError(
            f"train.batch_size: {t.batch_size} does not split over the {dims.dp} data-parallel "
            f"ranks (dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard}); use a "
            f"multiple of {dims.dp}"
        )
    share = t.batch_size // dims.dp
    micro = share if t.micro_batch_size == "auto" else t.micro_batch_size
    if share % micro:
        raise UserError(
            f"train.micro_batch_size: {micro} must divide each data-parallel rank's share of "
            f"train.batch_size={t.batch_size} over {dims.dp} ranks ({share} sequences), or "
            'be "auto"'
        )
    if dims.pp > 1:
        n_micro = p.pp_microbatches or n_stages
        if n_micro < n_stages and p.pp_schedule in ("interleaved_1f1b", "dualpipev"):
            raise UserError(
                f"parallel.pp_microbatches: {n_micro} is fewer than the {n_stages} pipeline "
                f"stages that pp_schedule={p.pp_schedule!r} needs"
            )
        if micro % n_micro:
            what = "each data-parallel rank's share of the batch" if micro == share else ""
            raise UserError(
                f"parallel.pp_microbatches: {n_micro} must divide train.micro_batch_size="
                f"{micro}{f' ({what})' if what else ''} (each micro-batch is one pipeline step)"
            )
    return micro


def _check_task(cfg: JobConfig, task) -> None:
    if cfg.data.random_tokens and not task.random_tokens:
        raise UserError(
            f"data.random_tokens: task.name={cfg.task.name!r} trains on its data files "
            "(data.paths), not on random token ids; set data.random_tokens = 0"
        )
    if cfg.data.random_tokens and cfg.task.attention == "document":
        raise UserError(
            "task.attention: 'document' needs a tokenizer with an EOS token to find where "
            "documents end; data.random_tokens has no tokenizer"
        )
    if cfg.data.random_tokens and cfg.model.vocab_size is None and cfg.model.path is None:
        raise UserError("data.random_tokens: set model.vocab_size (there is no tokenizer)")


def _check_device(cfg: JobConfig, dims: ParallelDims) -> None:
    import torch

    name = cfg.train.device
    cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if cfg.parallel.cpu_offload and (not cuda or not dims.fsdp_enabled):
        raise UserError(
            "parallel.cpu_offload: true needs GPUs and FSDP (dp_shard, dp_replicate or cp > 1): "
            "it moves sharded GPU state to CPU memory; this run is on "
            f"{'cuda' if cuda else 'cpu'} with {'FSDP' if dims.fsdp_enabled else 'no FSDP'}"
        )


def _files(cfg: JobConfig) -> list[Path]:
    from parallm.utils.fs import find_files

    d = cfg.data
    if d.random_tokens:
        return []
    return find_files(d.paths, d.extensions, exclude=d.exclude, max_files=d.max_files)


def resume_mode(resume: str) -> str:
    """`--resume`'s mode, checked."""
    if resume not in RESUME_MODES:
        raise UserError(f"--resume: {resume!r} is not valid; valid: {', '.join(RESUME_MODES)}")
    return resume


def _check_resume(cfg: JobConfig, resume: str) -> None:
    from parallm.train.checkpoint_dirs import latest_checkpoint

    root = Path(cfg.output.dir) / "checkpoints"
    if resume_mode(resume) == "always" and latest_checkpoint(root) is None:
        raise UserError(
            f"--resume: always, but there is no complete checkpoint in {root}; use "
            "--resume auto to start fresh when there is none"
        )
