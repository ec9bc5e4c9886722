"""A checkpoint written on one layout resumes on another with the losses of an unbroken run."""

from __future__ import annotations

import shutil

import pytest
import torch
from parallel_jobs import assert_weights_close, job, make_corpus, train_worker, weights

from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled
from parallm.train import checkpoint as ckpt
from parallm.train.trainer import Trainer

SAVE_ON = ("--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=1", "--checkpoint.every=3")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An unbroken single-process run, and a tp=2 x pp=2 run stopped after its step-3 checkpoint."""
    root = tmp_path_factory.mktemp("reshard")
    data, tok = make_corpus(root)
    full = Trainer(job(data, tok, root / "full")).fit()
    run_distributed(
        train_worker, 4, root / "rdzv", data, tok, root / "cut", SAVE_ON, 3, timeout_s=scaled(240)
    )
    assert ckpt.latest_checkpoint(root / "cut" / "checkpoints").name == "step_00000003"
    return root, data, tok, full


def _resume_copy(root, name):
    out = root / name
    shutil.copytree(root / "cut", out)
    return out


def _check(records, full, out, root):
    assert [r["step"] for r in records] == [4, 5]
    torch.testing.assert_close(
        [r["loss"] for r in records], [r["loss"] for r in full[3:]], rtol=1e-5, atol=0
    )
    assert_weights_close(weights(out), weights(root / "full"))


def test_tp2_pp2_checkpoint_resumes_on_dp_shard4(saved, tmp_path):
    root, data, tok, full = saved
    out = _resume_copy(root, "on_dp4")
    extra = ("--parallel.dp_shard=4", "--checkpoint.every=3")
    args = (data, tok, out, extra, None, "always")  # until_step, resume
    records = run_distributed(train_worker, 4, tmp_path / "rdzv", *args, timeout_s=scaled(240))[0]
    _check(records, full, out, root)


def test_tp2_pp2_checkpoint_resumes_on_one_process(saved):
    root, data, tok, full = saved
    out = _resume_copy(root, "on_one")
    records = Trainer(job(data, tok, out, "--checkpoint.every=3"), resume="always").fit()
    _check(records, full, out, root)
