"""The training loop: build (tokenizer, model, optimizer, data), step, log, checkpoint, export.

One code path serves every layout, from one process to a pp x dp_replicate x dp_shard x cp x tp
mesh: `ParallelDims` validates the degrees, `layout.build_rank_model` gives this rank its
parallelized model parts, `step.StepRunner` runs forward and backward, and on one process every
collective is skipped. Only rank 0 prints, writes metrics and renames checkpoints. Nothing below
reads `RANK` or environment variables: the process group (if any) is already initialized.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parallm.config import JobConfig, config_to_toml
from parallm.errors import UserError
from parallm.generate import generate
from parallm.inference.sampling import SamplingParams
from parallm.models.build import canonical_name
from parallm.models.hf import load_pretrained, save_state_dict
from parallm.models.peft_format import (
    Adapter,
    merge_adapter,
    read_adapter,
    save_adapter,
    start_adapter,
)
from parallm.models.registry import family_of_args
from parallm.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    Tokenizer,
    save_tokenizer_dir,
    train_bpe_tokenizer,
)
from parallm.train import checkpoint as ckpt
from parallm.train.data import PackedDataLoader, PackedDataset, RowDataset, iter_texts
from parallm.train.layout import RankModel, build_rank_model
from parallm.train.metrics import MetricsLog, Progress, device_peak_flops, flops_per_token
from parallm.train.optim import Optimizers, lr_at
from parallm.train.preflight import check_model, model_args_from_config, preflight
from parallm.train.signals import StopSignals
from parallm.train.step import Reference, StepRunner
from parallm.train.tasks import make_task, task_class
from parallm.utils.fs import write_json_atomic, write_text_atomic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: {name!r} is not a device; valid: auto, cpu, cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} requested but no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def state_bytes(model: RankModel) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and AdamW state (exp_avg, exp_avg_sq, step)."""
    params = {id(p): p for p in model.parameters()}.values()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    param_bytes = sum(t.numel() * t.element_size() for t in local)
    return {
        "parameters": param_bytes,
        "gradients": param_bytes,
        "optimizer": 2 * param_bytes + 4 * len(local),  # two moments + a float32 step each
    }


class Trainer:
    """Trains one job. `fit()` runs to `train.steps`, checkpointing and exporting as configured."""

    def __init__(self, cfg: JobConfig, *, resume: str = "auto", local_rank: int = 0) -> None:
        self.cfg = cfg
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        p = cfg.parallel
        # Every check that needs no rank and no tokenizer, as before launch (one piece of code).
        self.preflight = preflight(cfg, self.world, resume=resume)
        self.dims = self.preflight.dims
        self.micro_batch_size = self.preflight.micro_batch_size
        self.out = Path(cfg.output.dir)
        self.ckpt_root = self.out / "checkpoints"
        self.device = pick_device(cfg.train.device, local_rank)
        seed_everything(cfg.train.seed)
        # Which checkpoint (if any) to resume from is settled before anything is built.
        self.resume_from = self._resume_choice(resume)
        self.checkpointer = ckpt.Checkpointer(
            self.ckpt_root,
            keep_last=cfg.checkpoint.keep_last,
            async_save=cfg.checkpoint.async_save,
        )
        self.stopped_by: str | None = None  # the signal that stopped `fit` early, if one did

        d, t = cfg.data, cfg.train
        files = self.preflight.files
        dataset = None
        if not task_class(cfg.task.name).uses_tokenizer:
            # A task that reads its own inputs (video): its data first, since the caption
            # encoder's vocabulary (a model size) is learnt from the captions.
            self.tokenizer = None
            self.task = make_task(cfg.task, job=cfg)
            dataset = self._build_dataset(files, None)
            args = model_args_from_config(cfg, self._task_vocab(dataset))
        elif d.random_tokens:
            self.tokenizer = None
            args = model_args_from_config(cfg, cfg.model.vocab_size or 0)
        else:
            self.tokenizer = self._build_tokenizer(files)
            args = model_args_from_config(cfg, self.tokenizer.vocab_size)
            if not cfg.model.path:
                args.bos_token_id = self.tokenizer.bos_token_id
                args.eos_token_id = self.tokenizer.eos_token_id
                args.pad_token_id = self.tokenizer.pad_token_id
        if dataset is None:
            self.task = make_task(cfg.task, tokenizer=self.tokenizer, job=cfg)
        self._validate(args)
        self.args = args
        self.lora = cfg.lora.spec()
        adapter = self._lora_start(args)
        if self.world > 1:
            self.dims.build_mesh(self.device.type)
        fsdp_bf16 = self._wants_bf16() and self.dims.fsdp_enabled
        frozen_bf16 = self.lora is not None and cfg.lora.base_dtype == "bfloat16"
        self.model = build_rank_model(
            args,
            p,
            self.dims,
            self.device,
            seed=t.seed,
            hf_path=cfg.model.path,
            param_dtype=torch.bfloat16 if fsdp_bf16 else None,
            lora=self.lora,
            adapter=adapter.tensors if adapter is not None else None,
            frozen_dtype=torch.bfloat16 if frozen_bf16 else None,
        )
        self.reference = self._build_reference(
            args, param_dtype=torch.bfloat16 if fsdp_bf16 else None
        )
        self.optimizer = Optimizers(
            self.model.parts, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps
        )
        if dataset is None:
            dataset = self._build_dataset(files, args)
        self.held_out = None
        if d.eval_fraction > 0:
            dataset, self.held_out = dataset.split(d.eval_fraction)
            if len(self.held_out) < t.batch_size:
                raise UserError(
                    f"data.eval_fraction: {d.eval_fraction} holds out {len(self.held_out)} "
                    f"samples, fewer than one batch of train.batch_size={t.batch_size}"
                )
        self.data = self._loader(dataset)
        bf16 = (self._wants_bf16() and not fsdp_bf16) or frozen_bf16
        autocast = torch.bfloat16 if bf16 else None
        self.runner = StepRunner(
            self.model,
            self.dims,
            p,
            self.task,
            device=self.device,
            autocast=autocast,
            reference=self.reference,
        )
        self.tokens_per_sample, attention_len = self.task.sample_tokens(args, d)
        self.rollouts = self._build_rollouts(args)
        self._rollout: tuple | None = None  # the rollout batch in use, its metrics, its uses
        self._log_start(files, dataset)
        self.step = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if self.rank == 0:
            write_text_atomic(self.out / "config.toml", config_to_toml(cfg))
        self.flops_per_token = flops_per_token(args, attention_len)
        self.peak_flops = device_peak_flops(self.device)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # -- building ------------------------------------------------------------------------------

    def _wants_bf16(self) -> bool:
        dtype = self.cfg.train.dtype
        return dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda")

    def _validate(self, args) -> None:
        """The checks that need the tokenizer: the model's final arguments (its vocabulary)
        against the layout, by the code `preflight` ran before launch, and the tokenizer against
        the model and the task. No communication, so a bad job fails on every rank alike."""
        cfg = self.cfg
        facts = family_of_args(args).facts(args)
        check_model(cfg, self.dims, args, task=self.task)
        if self.tokenizer is not None and facts.vocab_size < self.tokenizer.vocab_size:
            raise UserError(
                f"model.vocab_size: {facts.vocab_size} is smaller than the tokenizer's "
                f"vocabulary of {self.tokenizer.vocab_size}"
            )
        if cfg.task.attention == "document" and (
            self.tokenizer is None or self.tokenizer.eos_token_id is None
        ):
            raise UserError(
                "task.attention: 'document' needs a tokenizer with an EOS token to find where "
                "documents end"
            )

    def _lora_start(self, args) -> Adapter | None:
        """Check `[lora]` against the model (on `meta`); the adapter to start from, if any."""
        if self.lora is None:
            return None
        return start_adapter(self.lora, args, self.cfg.lora.init_from)

    def _build_reference(self, args, *, param_dtype: torch.dtype | None) -> Reference | None:
        """The frozen model the task scores the policy against, if it needs one: the policy as
        it starts. Under LoRA the policy itself, its fresh adapters switched off (the base, no
        copy of any weight), or, when it starts from an adapter or trains saved modules, with
        their starting values (a copy of the adapter's size) put back for the reference
        forward. Under full fine-tuning a frozen copy built like the policy (same layout)."""
        if not self.task.needs_reference():
            return None
        cfg = self.cfg
        if self.lora is not None:
            if cfg.lora.init_from is None and not self.lora.modules_to_save:
                return Reference(self.model)
            start = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
            return Reference(self.model, start)
        reference = build_rank_model(
            args,
            cfg.parallel,
            self.dims,
            self.device,
            seed=cfg.train.seed,
            hf_path=cfg.model.path,
            param_dtype=param_dtype,
        )
        for p in reference.parameters():
            p.requires_grad_(False)
        return Reference(reference)

    def _build_rollouts(self, args):
        """The engine in the loop of an online task (GRPO), over this rank's policy."""
        if not getattr(self.task, "online", False):
            return None
        from parallm.train.rollout import Rollouts

        dp_group = self.dims.mesh["dp"].get_group() if self.world > 1 and self.dims.dp > 1 else None
        rollouts = Rollouts(
            self.task,
            self.model.parts,
            args,
            self.tokenizer,
            lora=self.lora,
            device=self.device,
            seed=self.cfg.train.seed,
            local_prompts=self.cfg.train.batch_size // self.dims.dp,
            dp_group=dp_group,
        )
        how = "the trainer's own tensors" if rollouts.shared else "a gathered copy"
        self.log(f"rollouts: parallm's engine on {how} of the policy")
        return rollouts

    def _online_batch(self) -> tuple[Any, dict[str, Any]]:
        """The step's batch of an online task: a new rollout batch every `task.iterations`
        steps (its prompts the loader's next), the same one in between."""
        if self._rollout is None or self._rollout[2] == self.cfg.task.iterations:
            data = self.data
            first = data.consumed + data.dp_rank * data.local_batch_size
            prompts = data.next_rows()[:, 0].tolist()
            samples = list(range(first, first + len(prompts)))
            batch, metrics = self.rollouts.generate(prompts, samples)
            for name, line in self.rollouts.first_errors.items():
                self.warn(f"reward {name!r} raised on a sample (counted): {line}")
            self._rollout = (batch, metrics, 0)
        else:
            batch, metrics, _ = self._rollout
            metrics = {**metrics, "rollout_s": 0.0}  # no rollout this step: the batch is reused
        self._rollout = (self._rollout[0], self._rollout[1], self._rollout[2] + 1)
        return batch, metrics

    def _loader(self, dataset: PackedDataset | RowDataset) -> PackedDataLoader:
        t = self.cfg.train
        return PackedDataLoader(
            dataset,
            global_batch_size=t.batch_size,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dims.coordinate("dp"),
            dp_degree=self.dims.dp,
        )

    def evaluate(self) -> float:
        """The mean loss over the held-out data's counted units, in whole global batches (all
        ranks take part; forward only)."""
        loader = self._loader(self.held_out)
        total = count = 0.0
        for _ in range(len(self.held_out) // self.cfg.train.batch_size):
            batch = self.task.batch(loader.next_rows())
            mean, n = self.runner.evaluate(batch.split(self.micro_batch_size))
            total, count = total + mean * n, count + n
        return total / max(count, 1.0)

    def _build_dataset(self, files: list[Path], args) -> PackedDataset | RowDataset:
        d = self.cfg.data
        if d.random_tokens:
            vocab = family_of_args(args).facts(args).vocab_size
            return PackedDataset.random(d.random_tokens, vocab, seq_len=d.seq_len)
        dataset = self.task.dataset(files, d, seed=self.cfg.train.seed)
        if self.task.data_summary:
            self.log(self.task.data_summary)
        return dataset

    def _task_vocab(self, dataset) -> int:
        """The video task's caption vocabulary: with the trainable caption encoder, its
        tokenizer is learnt from the dataset's captions by rank 0 (or reused from an earlier
        run of this job) and read by every rank; 0 with T5 embeddings."""
        task, saved = self.task, self.out / "caption_tokenizer"
        if self.cfg.video.trainable_text:
            from parallm.video.text import CAPTION_TOKENIZER_FILE

            if self.cfg.model.path is not None:  # fine-tuning: the model's own tokenizer
                saved = Path(self.cfg.model.path)
            elif self.rank == 0 and not (saved / CAPTION_TOKENIZER_FILE).exists():
                task.train_caption_tokenizer(dataset.captions, saved)
            if self.world > 1:
                dist.barrier()
        self.log(task.use_captions(dataset.captions, saved))
        return task.caption_vocab_size

    def _build_tokenizer(self, files: list[Path]) -> Tokenizer:
        cfg = self.cfg
        saved = self.out / "tokenizer"
        if cfg.tokenizer.train_vocab_size is not None:
            # Rank 0 trains (or reuses) it; the others wait and read the same files.
            if self.rank == 0 and not (saved / "tokenizer.json").exists():
                texts = iter_texts(files, cfg.data.text_field, desc="training the tokenizer on")
                tok = train_bpe_tokenizer(texts, cfg.tokenizer.train_vocab_size)
                # So that the model trained with it can chat (serve, generate --chat, SFT).
                tok.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
                save_tokenizer_dir(tok, saved)
            if self.world > 1:
                dist.barrier()
            return Tokenizer.from_dir(saved)
        path = cfg.tokenizer.path or cfg.model.path
        if path is None:
            raise UserError(
                "tokenizer.path: no tokenizer given; set tokenizer.path or model.path, "
                "or tokenizer.train_vocab_size to train one on the data"
            )
        return Tokenizer.from_dir(path)

    def _log_start(self, files: list[Path], dataset: PackedDataset) -> None:
        cfg, args, d = self.cfg, self.args, self.dims
        facts = family_of_args(args).facts(args)
        self.log(
            f"model: {getattr(args, 'architecture', family_of_args(args).model_types[0])}, "
            f"{facts.num_params / 1e6:.2f}M parameters "
            f"({facts.num_params_no_embed / 1e6:.2f}M without embeddings) on "
            f"{self.world} x {self.device.type}; task: {cfg.task.name} "
            f"({self.task.attention_kind or cfg.task.attention} attention)"
        )
        zero = f"; zero_stage={cfg.parallel.zero_stage}" if d.fsdp_enabled else ""
        auto = " (auto)" if cfg.train.micro_batch_size == "auto" else ""
        self.log(
            f"layout: pp={d.pp} dp_replicate={d.dp_replicate} dp_shard={d.dp_shard} cp={d.cp} "
            f"tp={d.tp}{zero}; micro_batch_size={self.micro_batch_size}{auto}"
        )
        ref = self.reference
        if ref is not None:
            if ref.model is not self.model:
                what = "a frozen copy of the starting weights, laid out like the policy"
            elif ref.start is None:
                what = "the base model (LoRA adapters off)"
            else:
                what = "the policy with its starting adapter and saved modules"
            self.log(f"reference: {what}")
        epochs = cfg.train.steps * cfg.train.batch_size / len(dataset)
        steps = f"{cfg.train.steps} steps x {cfg.train.batch_size} samples = {epochs:.2f} epochs"
        if hasattr(dataset, "num_tokens"):
            self.log(
                f"data: {f'{len(files)} files' if files else 'random token ids'}, "
                f"{dataset.num_tokens:,} tokens -> {len(dataset):,} samples of "
                f"{cfg.data.seq_len} tokens; {steps}"
            )
        elif getattr(self.task, "online", False):
            self.log(f"data: {len(files)} files -> {len(dataset):,} prompts; {steps}")
        else:
            v = cfg.video
            self.log(
                f"data: {len(files)} files -> {len(dataset):,} samples of {v.frames} x "
                f"{v.height} x {v.width} ({self.tokens_per_sample:,} patch tokens each); {steps}"
            )
        mine = state_bytes(self.model)
        every = [mine]
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        self.state_bytes = every
        for r, b in enumerate(every):
            self.log(
                f"rank {r}: parameters {b['parameters']:,} B, gradients {b['gradients']:,} B, "
                f"optimizer state {b['optimizer']:,} B"
            )
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "state_bytes.json", every)

    # -- state ---------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "data": self.data.state_dict(),
            "schedule": {
                "total_steps": self.cfg.train.steps,
                "warmup": self.cfg.train.warmup_steps,
            },
        }

    def _resume_choice(self, mode: str) -> Path | None:
        """Clear what an interrupted save left; under `never` every checkpoint too; otherwise
        the newest checkpoint that verifies (the same on every rank), falling back past
        corrupt ones with a warning."""
        root = self.ckpt_root
        if self.rank == 0:
            for p in ckpt.remove_stale(root):
                self.log(f"removed {p}: a save that was interrupted")
            if mode == "never":
                removed = ckpt.remove_all(root)
                if removed:
                    self.log(f"--resume never: removed {len(removed)} checkpoints in {root}")
        if mode == "never":
            return None
        choice = ckpt.choose_checkpoint(root)
        newer = choice.path.name if choice.path is not None else None
        for path, problem, aside in choice.corrupt:
            self.warn(
                f"checkpoint {path.name} is corrupt ({problem}; renamed {aside.name}); "
                f"resuming from {newer}"
            )
        if choice.path is None:
            if mode == "always":
                raise UserError(f"--resume always: no checkpoint found in {root}")
            self.log(f"no checkpoint in {root}: starting at step 0")
        elif not choice.verified:
            self.warn(
                f"checkpoint {choice.path.name} has no manifest (an older parallm wrote "
                "it): loading it unverified"
            )
        return choice.path

    def warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.model.parts, self.optimizer)
        self.data.load_state_dict(state["data"])
        self.step = state["step"]
        self.log(f"resumed from {path} at step {self.step}")

    # -- the loop ------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the global batch; returns the step's metrics record."""
        t = self.cfg.train
        start = time.perf_counter()
        lr = lr_at(
            self.step + 1,
            lr=t.lr,
            warmup_steps=t.warmup_steps,
            total_steps=t.steps,
            min_lr_ratio=t.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rollout: dict[str, Any] = {}
        if self.rollouts is not None:
            batch, rollout = self._online_batch()
            micro_rows = self.micro_batch_size * self.cfg.task.group_size
        else:
            batch = self.task.batch(self.data.next_rows())
            micro_rows = self.micro_batch_size
        loss = self.runner.forward_backward(batch.split(micro_rows))
        metrics = self.runner.metrics
        grad_norm = self.runner.clip_grad_norm(t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.rollouts is not None:
            self.rollouts.weights_changed()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        tokens = t.batch_size * self.tokens_per_sample
        if rollout:
            metrics = {**rollout, **metrics}
            tokens = round(rollout["sequence_length"] * rollout["completions"])
            train_s = elapsed - rollout["rollout_s"]
            metrics["training_tokens_per_s"] = tokens / train_s
            metrics["rollout_share"] = rollout["rollout_s"] / elapsed
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_device": tokens / elapsed / self.world,
            "step_time_s": elapsed,
            **metrics,
        }
        if self.peak_flops is not None:
            record["mfu"] = tokens * self.flops_per_token / elapsed / self.peak_flops / self.world
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return record

    def fit(self, *, until_step: int | None = None) -> list[dict[str, Any]]:
        """Train to `train.steps` (or stop early after `until_step`); returns the step records.
        SIGTERM or SIGINT ends it after the step under way, every rank after the same step,
        with a checkpoint (`stopped_by` names the signal)."""
        cfg = self.cfg
        end = min(cfg.train.steps, until_step) if until_step is not None else cfg.train.steps
        log = MetricsLog(self.out, resume_step=self.step) if self.rank == 0 else None
        progress = Progress(cfg.train.steps, self.step, cfg.train.log_every, self.rank == 0)
        records = []
        try:
            with StopSignals() as signals:
                while self.step < end:
                    record = self.train_step()
                    eval_every, last = cfg.train.eval_every, self.step == cfg.train.steps
                    if self.held_out is not None and (
                        last or (eval_every and self.step % eval_every == 0)
                    ):
                        record["eval_loss"] = self.evaluate()
                    records.append(record)
                    if log is not None:
                        log.write(record)
                    progress.update(record)
                    every = cfg.checkpoint.every
                    saved = None
                    if (every > 0 and self.step % every == 0) or self.step == cfg.train.steps:
                        saved = self.save_checkpoint()
                    self.stopped_by = signals.agreed(self.device)
                    if self.stopped_by is not None:
                        saved = saved or self.save_checkpoint()
                        break
            self.checkpointer.wait()  # the last async save is complete before anything reads it
        finally:
            progress.close()
            if log is not None:
                log.close()
        if self.stopped_by is not None and self.step < cfg.train.steps:
            self.log(
                f"stopped by {self.stopped_by} at step {self.step}; checkpoint saved to {saved}; "
                "run the same command to resume"
            )
            return records
        if self.step == cfg.train.steps and cfg.checkpoint.export_hf:
            if self.lora is not None:
                self.export_adapter(self.out / "adapter")
            else:
                self.export(self.out / "hf")
        return records

    def save_checkpoint(self) -> Path:
        """Save this step (in the background with `checkpoint.async_save`; `fit` waits)."""
        return self.checkpointer.save(
            self.step, self.model.parts, self.optimizer, self.trainer_state()
        )

    def full_state_dict(self, *, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Every parameter (or only those that train: a LoRA adapter and its saved modules),
        gathered from all shards and stages; on rank 0 (None elsewhere)."""
        leader = self.dims.coordinate("dp_cp") == 0 and self.dims.coordinate("tp") == 0
        mine: dict[str, torch.Tensor] = {}
        for part in self.model.parts:
            if trainable_only:
                items = [(n, p) for n, p in part.named_parameters() if p.requires_grad]
            else:
                items = list(part.state_dict().items())
            for name, tensor in items:
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if leader:
                    mine[canonical_name(name)] = full.detach().to("cpu", copy=True)
        if self.world == 1:
            return mine
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return None
        state: dict[str, torch.Tensor] = {}
        for part_state in gathered:
            state.update(part_state)
        return state

    def export(self, path: Path) -> Path:
        """Write the current weights and the tokenizer as a HF directory (rank 0 writes)."""
        state = self.full_state_dict()
        if state is not None:
            save_state_dict(state, self.args, path, tokenizer=self.tokenizer)
            self.task.export_extras(path)
        if self.world > 1:
            dist.barrier()
        return path

    def export_adapter(self, path: Path) -> Path:
        """Write the LoRA adapter (and saved modules) as a peft directory (rank 0 writes)."""
        tensors = self.full_state_dict(trainable_only=True)
        if tensors is not None:
            adapter = Adapter(spec=self.lora, tensors=tensors, base_model=self.cfg.model.path)
            save_adapter(adapter, self.args, path)
            if self.tokenizer is not None:
                self.tokenizer.save(path)
        if self.world > 1:
            dist.barrier()
        return path

    def sample(self) -> str:
        """Generate a sample from `[generate]` settings with the exported weights (rank 0); a
        task without a tokenizer (video) has no text sample: a line saying how to generate."""
        if self.tokenizer is None:
            return (
                f"(no text sample for task {self.cfg.task.name!r}; generate with "
                f"parallm video generate --model {self.out / 'hf'})"
            )
        g = self.cfg.generate
        opts = SamplingParams(
            max_tokens=g.max_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            seed=self.cfg.train.seed,
        )
        if self.world == 1:
            model = self.model.parts[0]
        elif self.lora is not None:
            model = load_pretrained(self.cfg.model.path, device=self.device)
            adapter = read_adapter(self.out / "adapter", self.args)
            merged = merge_adapter(model.state_dict(), adapter)
            model.load_state_dict(merged)
        else:
            model = load_pretrained(self.out / "hf", device=self.device)
        prompt = self.tokenizer.encode(g.prompt)
        model.eval()
        ids = generate(model, prompt, opts, stop_token_ids=self.tokenizer.eos_token_ids)
        model.train()
        return g.prompt + self.tokenizer.decode(ids, skip_special_tokens=True)


def summary(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no steps run"
    first, last = records[0], records[-1]
    tps = sorted(r["tokens_per_s"] for r in records)[len(records) // 2]
    return json.dumps(
        {
            "steps": last["step"],
            "first_loss": round(first["loss"], 4),
            "last_loss": round(last["loss"], 4),
            "median_tokens_per_s": round(tps, 1),
        }
    )
