"""The training loop: build (tokenizer, model, optimizer, data), step, log, checkpoint, export.

One code path serves every layout. Today it runs one process; the parallel-training work adds a
`ParallelDims` that shards the model between `build_model` and `build_optimizer`, and hands the
data loader its data-parallel rank and degree. Nothing below reads `RANK` or env vars.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from parallm.config import JobConfig, config_to_toml
from parallm.errors import UserError
from parallm.generate import SamplingOptions, generate
from parallm.models.hf import load_pretrained, read_args, save_pretrained
from parallm.models.llama.model import ModelArgs, Transformer
from parallm.tokenizer import Tokenizer, save_tokenizer_dir, train_bpe_tokenizer
from parallm.train import checkpoint as ckpt
from parallm.train.data import PackedDataLoader, PackedDataset, find_files, iter_texts
from parallm.train.metrics import MetricsLog, Progress, device_peak_flops, flops_per_token
from parallm.train.optim import build_optimizer, clip_grad_norm, lr_at
from parallm.utils.fs import write_text_atomic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: {name!r} is not a device; valid: auto, cpu, cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} requested but no CUDA device is available")
    return device


def model_args_from_config(cfg: JobConfig, vocab_size: int) -> ModelArgs:
    """A fresh model's shape from `[model]`, or the shape of the directory in `model.path`."""
    m = cfg.model
    if m.path is not None:
        return read_args(m.path)
    n_kv = m.n_kv_heads or m.n_heads
    return ModelArgs(
        architecture=m.architecture,
        vocab_size=m.vocab_size or vocab_size,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=n_kv,
        head_dim=m.head_dim or m.dim // m.n_heads,
        ffn_dim=m.ffn_dim,
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        max_seq_len=m.max_seq_len,
        tie_embeddings=m.tie_embeddings,
        qkv_bias=m.architecture == "qwen2",
        qk_norm=m.architecture == "qwen3",
    )


class Trainer:
    """Trains one job. `fit()` runs to `train.steps`, checkpointing and exporting as configured."""

    def __init__(self, cfg: JobConfig, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output.dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.out / "checkpoints"
        self.device = pick_device(cfg.train.device)
        self.autocast = self._autocast_dtype()
        seed_everything(cfg.train.seed)

        d = cfg.data
        files = find_files(d.paths, d.extensions, exclude=d.exclude, max_files=d.max_files)
        self.tokenizer = self._build_tokenizer(files)
        self.model = self._build_model()
        if self.model.args.vocab_size < self.tokenizer.vocab_size:
            raise UserError(
                f"model.vocab_size: {self.model.args.vocab_size} is smaller than the tokenizer's "
                f"vocabulary of {self.tokenizer.vocab_size}"
            )
        t = cfg.train
        self.optimizer = build_optimizer(
            self.model, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps
        )
        dataset = PackedDataset(
            files,
            self.tokenizer,
            seq_len=cfg.data.seq_len,
            text_field=cfg.data.text_field,
            seed=t.seed,
            shuffle=cfg.data.shuffle,
            cache_dir=cfg.data.cache_dir,
        )
        self.data = PackedDataLoader(
            dataset, global_batch_size=t.batch_size, micro_batch_size=t.micro_batch_size
        )
        if cfg.data.seq_len > self.model.args.max_seq_len:
            raise UserError(
                f"data.seq_len: {cfg.data.seq_len} exceeds the model's context of "
                f"{self.model.args.max_seq_len} tokens (model.max_seq_len)"
            )
        args = self.model.args
        self.log(
            f"model: {args.architecture}, {args.num_params() / 1e6:.2f}M parameters "
            f"({args.num_params(embeddings=False) / 1e6:.2f}M without embeddings) on {self.device}"
        )
        epochs = t.steps * t.batch_size / len(dataset)
        self.log(
            f"data: {len(files)} files, {len(dataset.tokens):,} tokens -> {len(dataset):,} "
            f"samples of {cfg.data.seq_len} tokens; {t.steps} steps x {t.batch_size} samples "
            f"= {epochs:.2f} epochs"
        )
        self.step = 0
        if resume:
            self._resume()
        write_text_atomic(self.out / "config.toml", config_to_toml(cfg))
        self.flops_per_token = flops_per_token(self.model.args, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(self.device)

    def log(self, message: str) -> None:
        print(message, flush=True)

    # -- building ------------------------------------------------------------------------------

    def _autocast_dtype(self) -> torch.dtype | None:
        dtype = self.cfg.train.dtype
        if dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return torch.bfloat16 if dtype == "bfloat16" else None

    def _build_tokenizer(self, files: list[Path]) -> Tokenizer:
        cfg = self.cfg
        saved = self.out / "tokenizer"
        if cfg.tokenizer.train_vocab_size is not None:
            if (saved / "tokenizer.json").exists():  # a resumed or repeated run reuses it
                return Tokenizer.from_dir(saved)
            texts = iter_texts(files, cfg.data.text_field)
            tok = train_bpe_tokenizer(texts, cfg.tokenizer.train_vocab_size)
            save_tokenizer_dir(tok, saved)
            return tok
        path = cfg.tokenizer.path or cfg.model.path
        if path is None:
            raise UserError(
                "tokenizer.path: no tokenizer given; set tokenizer.path or model.path, "
                "or tokenizer.train_vocab_size to train one on the data"
            )
        return Tokenizer.from_dir(path)

    def _build_model(self) -> Transformer:
        cfg = self.cfg
        if cfg.model.path is not None:
            return load_pretrained(cfg.model.path, dtype=torch.float32, device=self.device).train()
        args = model_args_from_config(cfg, self.tokenizer.vocab_size)
        args.bos_token_id = self.tokenizer.bos_token_id
        args.eos_token_id = self.tokenizer.eos_token_id
        args.pad_token_id = self.tokenizer.pad_token_id
        with torch.device("meta"):
            model = Transformer(args)
        model.to_empty(device=self.device)
        model.init_buffers(self.device)
        model.init_weights(seed=cfg.train.seed)
        return model.train()

    # -- state ---------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "data": self.data.state_dict(),
            "schedule": {
                "total_steps": self.cfg.train.steps,
                "warmup": self.cfg.train.warmup_steps,
            },
        }

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_root)
        if path is None:
            raise UserError(f"--resume: no checkpoint found in {self.ckpt_root}")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
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
        micro_batches = self.data.next_batch()
        total_loss = torch.zeros((), device=self.device)
        tokens = 0
        for inputs, labels in micro_batches:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            with self._autocast_ctx():
                logits = self.model(inputs)
            # Every micro-batch holds the same number of tokens (packed, no padding), so the
            # mean of micro-batch means is the mean over the global batch.
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            (loss / len(micro_batches)).backward()
            total_loss += loss.detach() / len(micro_batches)
            tokens += labels.numel()
        grad_norm = clip_grad_norm(self.model, t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        record: dict[str, Any] = {
            "step": self.step,
            "loss": total_loss.item(),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
        }
        if self.peak_flops is not None:
            record["mfu"] = tokens * self.flops_per_token / elapsed / self.peak_flops
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return record

    def _autocast_ctx(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def fit(self, *, until_step: int | None = None) -> list[dict[str, Any]]:
        """Train to `train.steps` (or stop early after `until_step`); returns the step records."""
        cfg = self.cfg
        end = min(cfg.train.steps, until_step) if until_step is not None else cfg.train.steps
        log = MetricsLog(self.out, resume_step=self.step)
        progress = Progress(cfg.train.steps, self.step, cfg.train.log_every)
        records = []
        try:
            while self.step < end:
                record = self.train_step()
                records.append(record)
                log.write(record)
                progress.update(record)
                every = cfg.checkpoint.every
                if (every > 0 and self.step % every == 0) or self.step == cfg.train.steps:
                    self.save_checkpoint()
        finally:
            progress.close()
            log.close()
        if self.step == cfg.train.steps and cfg.checkpoint.export_hf:
            self.export(self.out / "hf")
        return records

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            self.trainer_state(),
            keep=self.cfg.checkpoint.keep,
        )

    def export(self, path: Path) -> Path:
        """Write the current weights and the tokenizer as a HF directory."""
        return save_pretrained(self.model, path, tokenizer=self.tokenizer)

    def sample(self) -> str:
        """Generate a sample from `[generate]` settings with the current weights."""
        g = self.cfg.generate
        opts = SamplingOptions(
            max_tokens=g.max_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            seed=self.cfg.train.seed,
        )
        prompt = self.tokenizer.encode(g.prompt)
        self.model.eval()
        ids = generate(self.model, prompt, opts, stop_token_ids=self.tokenizer.eos_token_ids)
        self.model.train()
        return g.prompt + self.tokenizer.decode(ids)


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
