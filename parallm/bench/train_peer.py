"""One run of the SFT comparison (`parallm bench train --task sft`), in a fresh process: parallm's
trainer (full fine-tuning, LoRA, packed or padded rows) or its peer, the same LoRA SFT through
`transformers` + `peft`.

The peer is a plain training loop over the same batches: the model directory parallm loads, read
by `AutoModelForCausalLM`; `peft.get_peft_model` with the same rank, alpha and target modules; the
rows and labels of parallm's own SFT task (`task.batch`: the same tokens, assistant-only labels
and per-conversation positions, from which `transformers` builds the packed-document mask); the
summed cross entropy over the global count of labels, as parallm's step computes it; gradient
clipping and AdamW with the job's settings. Both measure the same steps the same way
(`timed_steps`), and the peak memory of their own process.

    python -m parallm.bench.train_peer --worker RUN_DIR/run.json   # writes RUN_DIR/result.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class SftRun:
    """One engine's run: what its process trains, and where it writes `result.json`."""

    engine: str  # a key of SFT_ENGINES
    round: int
    model_dir: str
    data: str
    seq_len: int
    batch: int
    micro_batch: int
    warmup: int
    steps: int
    packing: bool
    lora_r: int  # 0: full fine-tuning
    lora_alpha: float
    targets: list[str]
    device: str
    threads: int  # torch's intra-op threads (0: its default)
    seed: int
    sets: list[str]  # job overrides for parallm's engines
    out: str

    def overrides(self) -> list[str]:
        """The parallm job of this run; the peer reads its data, task and optimizer settings."""
        out = [
            f"--model.path={self.model_dir}",
            f"--data.paths={json.dumps([self.data])}",
            f"--data.seq_len={self.seq_len}",
            "--data.shuffle=false",  # every engine reads the rows in file order
            "--task.name=sft",
            f"--task.packing={str(self.packing).lower()}",
            f"--train.steps={self.warmup + self.steps}",
            f"--train.batch_size={self.batch}",
            f"--train.micro_batch_size={self.micro_batch}",
            "--train.warmup_steps=0",
            f"--train.seed={self.seed}",
            f"--train.device={self.device}",
            "--checkpoint.every=0",
            "--checkpoint.export_hf=false",
            "--generate.max_tokens=0",
            f"--output.dir={self.out}",
        ]
        if self.lora_r:
            out += [
                f"--lora.r={self.lora_r}",
                f"--lora.alpha={self.lora_alpha}",
                f"--lora.target_modules={','.join(self.targets)}",
            ]
        return out + [f"--{s}" for s in self.sets]


def memory_mib(device) -> float:
    """Peak memory of this process so far: CUDA `max_memory_allocated`, else peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def label_counts(task, dataset, run: SftRun) -> list[int]:
    """The counted labels of each step's batch, from a loader that reads `dataset` in the order
    the trainer's does."""
    from parallm.train.data import PackedDataLoader

    loader = PackedDataLoader(
        dataset, global_batch_size=run.batch, micro_batch_size=run.micro_batch
    )
    steps = run.warmup + run.steps
    return [int(task.batch(loader.next_rows()).loss_mask.sum()) for _ in range(steps)]


def timed_steps(step: Callable[[], float], counts: list[int], run: SftRun) -> dict[str, Any]:
    """Run `step` (one optimizer step, returning its loss once the device is done) warm-up +
    measured times; throughput over the measured steps, by wall clock and by this process's
    CPU time (all its threads)."""
    walls, cpus, losses = [], [], []
    for _ in range(run.warmup + run.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    m = slice(run.warmup, None)
    tokens, labels = run.batch * run.seq_len * run.steps, sum(counts[m])
    wall, cpu = sum(walls[m]), sum(cpus[m])
    return {
        "tokens_per_s": tokens / wall,
        "label_tokens_per_s": labels / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "label_tokens_per_cpu_s": labels / cpu,
        "step_time_s": statistics.median(walls[m]),
        "cpu_s_per_step": statistics.median(cpus[m]),
        "tokens_per_step": run.batch * run.seq_len,
        "label_tokens_per_step": labels / run.steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def run_parallm_sft(run: SftRun) -> dict[str, Any]:
    """parallm's trainer on the run's job: its own data, model, LoRA, step and optimizer."""
    import torch

    from parallm.config import JobConfig, load_config
    from parallm.train.trainer import Trainer

    device = torch.device(run.device)
    base = memory_mib(device)  # after the imports, before the model
    trainer = Trainer(load_config(JobConfig, None, run.overrides()), resume="never")
    counts = label_counts(trainer.task, trainer.data.dataset, run)
    result = timed_steps(lambda: trainer.train_step()["loss"], counts, run)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {**result, "trainable_params": trainable, **memory_fields(base, device)}


def memory_fields(base: float, device) -> dict[str, float]:
    peak = memory_mib(device)
    return {"peak_memory_mib": peak, "base_memory_mib": base, "training_memory_mib": peak - base}


def worker_main(run: SftRun, run_fn: Callable[[SftRun], dict[str, Any]]) -> int:
    """A run's process: run it, write `result.json` in its directory."""
    import os

    import torch

    from parallm.utils.fs import write_json_atomic

    if run.threads:
        torch.set_num_threads(run.threads)
    result = {
        "engine": run.engine,
        "round": run.round,
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
    }
    result.update(run_fn(run))
    write_json_atomic(Path(run.out) / "result.json", result)
    return 0


def run_peer(run: SftRun) -> dict[str, Any]:
    """The same LoRA SFT through `transformers` + `peft`: a plain loop over parallm's batches."""
    import peft
    import torch
    import torch.nn.functional as F
    import transformers

    from parallm.config import JobConfig, load_config
    from parallm.tokenizer import Tokenizer
    from parallm.train.data import PackedDataLoader
    from parallm.train.tasks import IGNORE_INDEX, make_task

    device = torch.device(run.device)
    base = memory_mib(device)
    cfg = load_config(JobConfig, None, run.overrides())  # the data, task and optimizer settings
    task = make_task(cfg.task, tokenizer=Tokenizer.from_dir(run.model_dir))
    dataset = task.dataset([Path(run.data)], cfg.data, seed=cfg.train.seed)
    counts = label_counts(task, dataset, run)
    loader = PackedDataLoader(
        dataset, global_batch_size=run.batch, micro_batch_size=run.micro_batch
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
    lora = peft.LoraConfig(
        r=run.lora_r,
        lora_alpha=run.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(run.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model.to(device), lora)
    model.train()
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    # bf16 autocast on a GPU, as parallm's train.dtype = "auto" runs it.
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step() -> float:
        batch = task.batch(loader.next_rows()).to(device)
        count = batch.loss_mask.sum().clamp_min(1)
        total = torch.zeros((), device=device)
        for micro in batch.split(run.micro_batch):
            with autocast:
                # Positions restart per conversation: transformers masks each one off.
                logits = model(
                    input_ids=micro.input_ids, position_ids=micro.position_ids, use_cache=False
                ).logits
            summed = F.cross_entropy(
                logits.float().flatten(0, 1),
                micro.labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            loss = summed / count
            loss.backward()
            total += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(total)

    result = timed_steps(step, counts, run)
    trainable = sum(p.numel() for p in params)
    return {**result, "trainable_params": trainable, **memory_fields(base, device)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m parallm.bench.train_peer --worker RUN.json", file=sys.stderr)
        return 2
    run = SftRun(**json.loads(Path(argv[1]).read_text()))
    return worker_main(run, run_peer if run.engine == "peer" else run_parallm_sft)


if __name__ == "__main__":
    sys.exit(main())
