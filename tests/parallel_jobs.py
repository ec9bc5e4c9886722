"""A tiny training job shared by the multi-process tests, and the worker that runs it.

Every layout trains the same model on the same global batches; the single-process run is the
reference its losses and weights are compared with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from parallm.config import JobConfig, load_config
from parallm.models.hf import load_pretrained
from parallm.tokenizer import save_tokenizer_dir, train_bpe_tokenizer
from parallm.train.tasks import IGNORE_INDEX, Batch, register_task
from parallm.train.tasks.pretrain import Pretrain

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
]


def make_corpus(root: Path) -> tuple[Path, Path]:
    """Text files and a tokenizer trained on them (shared so every run tokenizes alike)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(16):
        (data / f"doc{i:02d}.txt").write_text(CORPUS[i % len(CORPUS)] * (2 + i % 3))
    texts = [p.read_text() for p in sorted(data.iterdir())]
    tok = save_tokenizer_dir(train_bpe_tokenizer(iter(texts), 300), root / "tokenizer")
    return data, tok


@register_task
class SparseLabels(Pretrain):
    """Pre-training whose labels are masked very unevenly (a plug-in task defined by a test):
    rows starting with an even token count only their first 3 labels, the rest all of them, so
    data-parallel ranks, context-parallel chunks and micro-batches hold very different numbers
    of counted tokens, and some micro-batches may hold almost none."""

    name = "test_sparse_labels"

    def batch(self, rows: torch.Tensor) -> Batch:
        batch = super().batch(rows)
        t = batch.labels.shape[1]
        keep = torch.where(rows[:, :1] % 2 == 0, 3, t)  # (B, 1) labels kept per row
        masked = torch.arange(t)[None, :] >= keep
        batch.labels = batch.labels.masked_fill(masked, IGNORE_INDEX)
        return batch


# The masked job: the sparse labels above, packed documents that do not see each other.
MASKED = ("--task.name=test_sparse_labels", "--task.attention=document")


# LoRA on column- and row-parallel layers (q, v, gate / o, down), and a module trained whole
# (the final norm: replicated under tensor parallelism, on the last pipeline stage).
LORA = (
    "--lora.r=4",
    "--lora.target_modules=q_proj,v_proj,o_proj,gate_proj,down_proj",
    "--lora.modules_to_save=norm",
)


def job(data: Path, tokenizer: Path, out: Path, *extra: str) -> JobConfig:
    overrides = [
        f"--data.paths={data}",
        "--data.seq_len=32",
        f"--tokenizer.path={tokenizer}",
        "--model.vocab_size=320",
        "--model.dim=32",
        "--model.n_layers=4",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.ffn_dim=64",
        "--model.tie_embeddings=true",
        "--train.steps=5",
        "--train.batch_size=8",
        "--train.micro_batch_size=2",
        "--train.warmup_steps=1",
        "--train.lr=3e-3",
        "--train.grad_clip=0.5",
        # AdamW's eps 1e-8 would give a weight whose gradient is pure rounding noise a near
        # full-size step of random sign, so the reduction order of a layout (which is not the
        # computation) would show in the weights at ~2e-5; at 1e-6 such steps are damped and a
        # real difference in what is computed still shows (measured: 1.9e-5 -> 1.8e-6 worst).
        "--train.eps=1e-6",
        "--train.log_every=100",
        "--checkpoint.every=0",
        f"--output.dir={out}",
        "--generate.max_tokens=0",
        *extra,
    ]
    return load_config(JobConfig, None, overrides)


def train_worker(
    rank: int,
    world_size: int,
    data: Path,
    tok: Path,
    out: Path,
    extra: tuple,
    until_step: int | None = None,
    resume: str = "auto",
):
    """Train the job on this rank; rank 0 returns its per-step records."""
    from parallm.train.trainer import Trainer

    trainer = Trainer(job(data, tok, out, *extra), resume=resume)
    records = trainer.fit(until_step=until_step)
    return records if rank == 0 else None


def weights(out: Path) -> dict[str, torch.Tensor]:
    """What a run trained: the exported model, or the adapter of a LoRA run."""
    if (out / "adapter").exists():
        return load_file(out / "adapter" / "adapter_model.safetensors")
    return load_pretrained(out / "hf").state_dict()


def assert_weights_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Each tensor within 1e-5 relative error in norm: ||got - ref|| <= 1e-5 ||ref||.

    Per-element error is the wrong yardstick after AdamW: it divides each gradient by its
    running RMS, so the embedding row of a rare token, whose gradient is tiny and dominated by
    float rounding in a different reduction order, can move by ~1e-5 more or less.
    """
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        err = (got[key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{key}: relative error {err:.2e}"


def random_token_job(
    out: Path,
    *extra: str,
    steps: int,
    samples: int,
    vocab: int = 64,
    batch: int = 4,
    warmup: int = 2,
) -> JobConfig:
    """A tiny Llama trained on `samples` x 16 random token ids (no tokenizer, no files),
    checkpointing into `out`: the jobs of the checkpoint, drill and multi-node tests."""
    overrides = [
        f"--data.random_tokens={samples}",
        "--data.seq_len=16",
        f"--model.vocab_size={vocab}",
        "--model.dim=32",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.ffn_dim=64",
        f"--train.steps={steps}",
        f"--train.batch_size={batch}",
        f"--train.warmup_steps={warmup}",
        "--train.lr=3e-3",
        "--checkpoint.export_hf=false",
        f"--output.dir={out}",
        "--generate.max_tokens=0",
        *extra,
    ]
    return load_config(JobConfig, None, overrides)
