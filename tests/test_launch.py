"""Launching: `parallm train --nproc N` runs torchrun; failures end every rank, loudly, once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from parallel_jobs import job as make_job
from parallel_jobs import make_corpus

from parallm.config import config_to_toml

TESTS = Path(__file__).parent


def _job_file(tmp_path: Path, *extra: str) -> Path:
    data, tok = make_corpus(tmp_path)
    cfg = make_job(
        data, tok, tmp_path / "out", "--train.steps=3", "--checkpoint.export_hf=false", *extra
    )
    path = tmp_path / "job.toml"
    path.write_text(config_to_toml(cfg))
    return path


def test_nproc_trains_and_writes_metrics_on_rank0_only(tmp_path):
    path = _job_file(tmp_path, "--parallel.dp_shard=2", "--train.log_every=1")
    proc = subprocess.run(
        [sys.executable, "-m", "parallm.cli", "train", "--nproc", "2", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 1/3 |") == 1  # one progress line per step: rank 0 only
    assert "rank 1: parameters" in proc.stdout
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_failing_rank_stops_everyone_with_its_error_once(tmp_path):
    path = _job_file(tmp_path, "--parallel.dp_shard=2", "--parallel.timeout_s=120")
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(TESTS / "failing_rank.py"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # Rank 0 was blocked in a collective; torchrun ends it long before the 120 s timeout.
    assert elapsed < 90, elapsed
    assert proc.stderr.count("parallm: rank 1 failed") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("ValueError: simulated failure on rank 1") == 1


def test_bad_layout_is_one_line_before_any_process_starts(tmp_path):
    path = _job_file(tmp_path, "--parallel.tp=3")
    proc = subprocess.run(
        [sys.executable, "-m", "parallm.cli", "train", "--nproc", "2", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tp=3" in lines[0] and "world size 2" in lines[0], proc.stderr
