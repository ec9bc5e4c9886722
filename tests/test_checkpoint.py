"""Checkpoints: manifest and verification, fallback past corruption, keep_last, stale temporaries,
resume modes, a stop by SIGTERM / SIGINT at a step boundary, and async saves equal to sync ones.

Runs are tiny (random token ids, a 2-layer model of width 32) and compared with an uninterrupted
run of the same job: a resume must continue with exactly the same losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parallel_jobs import random_token_job

from parallm.config import JobConfig, config_to_toml
from parallm.errors import UserError
from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled
from parallm.train import checkpoint as ckpt
from parallm.train.trainer import Trainer

STEPS = 6
TESTS = Path(__file__).parent


def job(out: Path, *extra: str) -> JobConfig:
    return random_token_job(
        out,
        "--train.micro_batch_size=2",
        "--train.log_every=100",
        "--checkpoint.every=2",
        "--checkpoint.keep_last=0",
        *extra,
        steps=STEPS,
        samples=8192,
    )


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """The losses of an uninterrupted run."""
    return losses(Trainer(job(tmp_path_factory.mktemp("ref") / "out")).fit())


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_manifest_lists_every_file_with_size_and_sha256_and_is_written_last(tmp_path):
    Trainer(job(tmp_path, "--train.steps=2")).fit()
    path = tmp_path / "checkpoints" / "step_00000002"
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    others = [p for p in path.iterdir() if p.name != ckpt.MANIFEST]
    assert sorted(manifest["files"]) == sorted(p.name for p in others)
    assert {".metadata", "__0_0.distcp", "rng.pt", ckpt.STATE_FILE} <= set(manifest["files"])
    for p in others:
        entry = manifest["files"][p.name]
        assert entry["size"] == p.stat().st_size
        assert entry["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert p.stat().st_mtime_ns <= (path / ckpt.MANIFEST).stat().st_mtime_ns
    assert ckpt.verify(path) is None


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_flip_byte, "file __0_0.distcp: checksum mismatch"),
        (_truncate, "file __0_0.distcp: size"),
        (Path.unlink, "file __0_0.distcp: missing"),
    ],
)
def test_corrupt_newest_falls_back_to_the_previous_with_a_warning(
    tmp_path, reference, capsys, damage, problem
):
    Trainer(job(tmp_path)).fit(until_step=4)
    root = tmp_path / "checkpoints"
    damage(root / "step_00000004" / "__0_0.distcp")
    assert ckpt.latest_checkpoint(root).name == "step_00000004"  # cheap: no hashing
    capsys.readouterr()
    resumed = Trainer(job(tmp_path))
    err = capsys.readouterr().err
    assert f"warning: checkpoint step_00000004 is corrupt ({problem}" in err
    assert "resuming from step_00000002" in err
    assert resumed.step == 2
    # Set aside, so neither the next resume nor keep_last counts it.
    assert names(root) == ["step_00000002", "step_00000004.corrupt"]
    assert losses(resumed.fit()) == reference[2:]


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_when_no_checkpoint_verifies_resuming_is_an_error_not_a_fresh_start(tmp_path, mode):
    Trainer(job(tmp_path)).fit(until_step=2)
    state = tmp_path / "checkpoints" / "step_00000002" / ckpt.STATE_FILE
    _flip_byte(state)
    with pytest.raises(UserError, match=r"--resume: no checkpoint in .* verifies .*checksum"):
        Trainer(job(tmp_path), resume=mode)
    assert state.exists()  # nothing was deleted or moved


def test_a_checkpoint_without_manifest_loads_unverified_with_a_warning(tmp_path, reference, capsys):
    Trainer(job(tmp_path)).fit(until_step=2)
    (tmp_path / "checkpoints" / "step_00000002" / ckpt.MANIFEST).unlink()  # as before manifests
    capsys.readouterr()
    resumed = Trainer(job(tmp_path))
    assert "checkpoint step_00000002 has no manifest" in capsys.readouterr().err
    assert losses(resumed.fit()) == reference[2:]


def test_keep_last_keeps_the_newest(tmp_path):
    Trainer(job(tmp_path, "--checkpoint.every=1", "--checkpoint.keep_last=2")).fit()
    assert names(tmp_path / "checkpoints") == ["step_00000005", "step_00000006"]


def test_the_old_key_name_is_a_one_line_error_naming_the_new_one(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'checkpoint.keep'; .*keep_last"):
        job(tmp_path, "--checkpoint.keep=2")


def test_stale_temporaries_are_removed_at_start(tmp_path, capsys):
    Trainer(job(tmp_path)).fit(until_step=2)
    root = tmp_path / "checkpoints"
    stale = root / ".step_00000004.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    (root / "unrelated.tmp").mkdir()
    capsys.readouterr()
    resumed = Trainer(job(tmp_path))
    assert f"removed {stale}" in capsys.readouterr().out
    assert names(root) == ["step_00000002", "unrelated.tmp"]
    assert resumed.step == 2


def test_resume_modes(tmp_path, reference, capsys):
    with pytest.raises(UserError, match="--resume"):
        Trainer(job(tmp_path), resume="always")  # nothing to resume from
    fresh = Trainer(job(tmp_path), resume="auto")
    assert fresh.step == 0 and "starting at step 0" in capsys.readouterr().out
    fresh.fit(until_step=4)
    auto = Trainer(job(tmp_path), resume="auto")
    assert auto.step == 4
    assert Trainer(job(tmp_path), resume="always").step == 4
    never = Trainer(job(tmp_path), resume="never")
    assert "--resume never: removed 2 checkpoints" in capsys.readouterr().out
    assert never.step == 0 and names(tmp_path / "checkpoints") == []
    assert losses(never.fit()) == reference
    with pytest.raises(UserError, match="--resume"):
        Trainer(job(tmp_path), resume="sometimes")


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint_whatever_comes_next(
    tmp_path, reference, capsys, monkeypatch
):
    trainer = Trainer(job(tmp_path, "--checkpoint.every=0"))
    step = trainer.train_step

    def step_then_signal():
        record = step()
        if trainer.step == 3:  # arrives during step 3: the loop stops after it
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    save = trainer.checkpointer.save

    def save_with_more_signals(*args):
        os.kill(os.getpid(), signal.SIGINT)  # impatient Ctrl-C and a second SIGTERM mid-save
        os.kill(os.getpid(), signal.SIGTERM)
        return save(*args)

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    monkeypatch.setattr(trainer.checkpointer, "save", save_with_more_signals)
    before = signal.getsignal(signal.SIGTERM)
    records = trainer.fit()
    assert [r["step"] for r in records] == [1, 2, 3] and trainer.stopped_by == "SIGTERM"
    saved = tmp_path / "checkpoints" / "step_00000003"
    assert (
        f"stopped by SIGTERM at step 3; checkpoint saved to {saved}; run the same command"
        in capsys.readouterr().out
    )
    assert names(tmp_path / "checkpoints") == ["step_00000003"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    assert losses(records + Trainer(job(tmp_path, "--checkpoint.every=0")).fit()) == reference


def test_async_save_writes_what_sync_save_writes(tmp_path):
    sync = Trainer(job(tmp_path / "sync"))
    asyn = Trainer(job(tmp_path / "async", "--checkpoint.async_save=true"))
    assert losses(sync.fit()) == losses(asyn.fit())
    for step in (2, 4, 6):
        a = tmp_path / "sync" / "checkpoints" / f"step_{step:08d}"
        b = tmp_path / "async" / "checkpoints" / f"step_{step:08d}"
        assert ckpt.verify(b) is None
        torch.testing.assert_close(_tensors(a), _tensors(b), rtol=0, atol=0)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / (path.name + ".pt")
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def test_async_save_resumes_exactly(tmp_path, reference):
    extra = ("--checkpoint.async_save=true",)
    Trainer(job(tmp_path, *extra)).fit(until_step=4)
    resumed = Trainer(job(tmp_path, *extra))
    assert resumed.step == 4
    assert losses(resumed.fit()) == reference[4:]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signalled_process_exits_0_and_the_same_command_resumes(tmp_path, reference, sig):
    """`python -m parallm.train` (what `parallm train` runs for one process), sent Ctrl-C or a
    preemption's SIGTERM during step 3 (by tests/drill_rank.py): it saves, says where and exits
    0; the same command then finishes the run with the losses of a run never stopped."""
    path = tmp_path / "job.toml"
    path.write_text(config_to_toml(job(tmp_path / "out", "--checkpoint.every=0")))
    command = [sys.executable, str(TESTS / "drill_rank.py"), str(path)]
    env = {**os.environ, "DRILL_SIGNAL": f"3:{sig}"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=scaled(300))
    assert first.returncode == 0, first.stderr[-2000:]
    saved = tmp_path / "out" / "checkpoints" / "step_00000003"
    assert (
        f"stopped by {sig} at step 3; checkpoint saved to {saved}; run the same command to "
        "resume\n" in first.stdout
    )
    assert "Traceback" not in first.stderr
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=scaled(300))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {saved} at step 3" in again.stdout
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in metrics] == reference


def _two_ranks(rank: int, world_size: int, out: Path, extra: tuple) -> tuple[int, list[float]]:
    """Train the job on dp_shard=2; this rank's starting step and the losses it saw."""
    trainer = Trainer(job(out, "--parallel.dp_shard=2", *extra))
    start = trainer.step
    return start, losses(trainer.fit())


def test_two_ranks_save_async_as_sync_and_skip_a_corrupt_shard_alike(tmp_path):
    """Two ranks: async saves (on their own gloo group) equal sync ones and cover both ranks'
    files; after one shard of the newest checkpoint is damaged, both ranks resume from the
    previous one (each hashes part of the files; the verdicts are all-gathered)."""
    async_save = ("--checkpoint.async_save=true",)
    sync = run_distributed(_two_ranks, 2, tmp_path / "w1", tmp_path / "sync", ())
    asyn = run_distributed(_two_ranks, 2, tmp_path / "w2", tmp_path / "async", async_save)
    assert sync == asyn and sync[0] == (0, sync[0][1]) and len(sync[0][1]) == STEPS
    newest = tmp_path / "async" / "checkpoints" / "step_00000006"
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(manifest)
    for step in (2, 4, 6):
        a = tmp_path / "sync" / "checkpoints" / f"step_{step:08d}"
        b = tmp_path / "async" / "checkpoints" / f"step_{step:08d}"
        torch.testing.assert_close(_tensors(a), _tensors(b), rtol=0, atol=0)
    _flip_byte(newest / "__1_0.distcp")
    # A run of 6 steps resumed at 4 redoes steps 5 and 6 with the same losses.
    resumed = run_distributed(_two_ranks, 2, tmp_path / "w3", tmp_path / "async", async_save)
    assert resumed == [(4, sync[0][1][4:])] * 2
    assert (tmp_path / "async" / "checkpoints" / "step_00000006.corrupt").exists()
