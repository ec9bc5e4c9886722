"""Every layout computes what one process computes: losses and final weights within 1e-5.

Each case trains 5 optimizer steps (gradient accumulation over 2 micro-batches per rank, global
norm clipping at 0.5, tied embeddings) on N gloo processes and compares the per-step losses and
the exported weights with a single-process run of the same job: losses within 1e-5 relative,
weights within 1e-5 relative in norm (see `assert_weights_close`).
"""

from __future__ import annotations

import pytest
import torch
from parallel_jobs import (
    LORA,
    MASKED,
    assert_weights_close,
    job,
    make_corpus,
    train_worker,
    weights,
)

from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled
from parallm.train.trainer import Trainer

# Two stages per rank (4 in all): micro-batches of 4 rows, one pipeline micro-batch per stage.
V4 = ["--train.micro_batch_size=4", "--parallel.pp_microbatches=4", "--parallel.pp_schedule"]

LAYOUTS = {
    "dp_replicate2": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "zero1": (2, ["--parallel.dp_shard=2", "--parallel.zero_stage=1"]),
    "zero2": (2, ["--parallel.dp_shard=2", "--parallel.zero_stage=2"]),
    "zero3": (2, ["--parallel.dp_shard=2", "--parallel.zero_stage=3"]),
    "tp2": (2, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "pp2_gpipe": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=gpipe"]),
    "pp2_1f1b": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=1f1b"]),
    "pp2_interleaved": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", *V4, "interleaved_1f1b"]),
    "pp2_zbv": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", *V4, "zero_bubble"]),
    "pp2_dualpipev": (2, ["--parallel.pp=2", "--parallel.dp_shard=1", *V4, "dualpipev"]),
    "cp2_ulysses": (2, ["--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.cp_mode=ulysses"]),
    "cp2_ring": (2, ["--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.cp_mode=ring"]),
    "dp_shard2_tp2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2"]),
    "dp_shard2_pp2": (4, ["--parallel.dp_shard=2", "--parallel.pp=2"]),
    "tp2_pp2": (4, ["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=1"]),
    "dp_replicate2_cp2": (
        4,
        ["--parallel.dp_replicate=2", "--parallel.cp=2", "--parallel.dp_shard=1"],
    ),
    "dp_shard2_tp2_pp2": (8, ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2"]),
}


def _reference(root, *extra: str):
    data, tok = make_corpus(root)
    records = Trainer(job(data, tok, root / "single", *extra)).fit()
    return data, tok, records, weights(root / "single"), extra


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def masked_reference(tmp_path_factory):
    """The masked job: loss on very different numbers of tokens per rank, document attention."""
    return _reference(tmp_path_factory.mktemp("masked"), *MASKED)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_equals_single_process(name, reference, tmp_path):
    _check_layout(name, reference, tmp_path)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_masked_layout_equals_single_process(name, masked_reference, tmp_path):
    """The loss is normalised by the global count of counted tokens, so uneven masks (and
    packed documents) give the single-process losses and weights on every layout too."""
    _check_layout(name, masked_reference, tmp_path)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    """LoRA: frozen base, adapters on column- and row-parallel layers, a module saved whole."""
    return _reference(tmp_path_factory.mktemp("lora"), *LORA)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_lora_layout_equals_single_process(name, lora_reference, tmp_path):
    """The adapter trains to the single-process losses and adapter weights on every layout."""
    _check_layout(name, lora_reference, tmp_path)


def _check_layout(name, reference, tmp_path):
    data, tok, ref_records, ref_weights, job_extra = reference
    world, extra = LAYOUTS[name]
    out = tmp_path / "run"
    records = run_distributed(
        train_worker,
        world,
        tmp_path / "rdzv",
        data,
        tok,
        out,
        (*job_extra, *extra),
        timeout_s=scaled(240),
    )[0]
    got = [r["loss"] for r in records]
    expected = [r["loss"] for r in ref_records]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        [r["grad_norm"] for r in records], [r["grad_norm"] for r in ref_records], rtol=1e-4, atol=0
    )
    assert_weights_close(weights(out), ref_weights)
