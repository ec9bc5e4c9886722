"""Launching: `parallm train --nproc N` runs torchrun; failures end every rank, loudly, once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from parallel_jobs import job as make_job
from parallel_jobs import make_corpus

from parallm.config import config_to_toml
from parallm.testing.timeouts import scaled

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
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 1/3 |") == 1  # one progress line per step: rank 0 only
    assert "rank 1: parameters" in proc.stdout
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_failing_rank_stops_everyone_with_its_error_once(tmp_path):
    """parallm's launcher (torchrun's agent, in-process) on `tests/failing_rank.py`: rank 1's
    traceback once, then one line from the launcher naming the rank and its exit status, and
    none of the agent's own report."""
    path = _job_file(tmp_path, "--parallel.dp_shard=2", "--parallel.timeout_s=120")
    launcher = (
        "import sys; from parallm.distributed.launch import LaunchOptions, launch; "
        f"sys.exit(launch('failing_rank', [{str(path)!r}], LaunchOptions(nproc=2)))"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", launcher],
        capture_output=True,
        text=True,
        timeout=scaled(300),
        cwd=TESTS,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Rank 0 was blocked in a collective; the agent ends it long before the 120 s timeout.
    assert elapsed < scaled(90), elapsed
    assert proc.stderr.count("parallm: rank 1 failed") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("ValueError: simulated failure on rank 1") == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "parallm: rank 1 exited with status 1 (its error is above); the job stopped"
    assert "ChildFailedError" not in proc.stderr and "elastic" not in proc.stderr


def test_bad_layout_is_one_line_before_any_process_starts(tmp_path):
    path = _job_file(tmp_path, "--parallel.tp=3")
    proc = subprocess.run(
        [sys.executable, "-m", "parallm.cli", "train", "--nproc", "2", str(path)],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tp=3" in lines[0] and "world size 2" in lines[0], proc.stderr


def test_sigterm_to_the_launcher_saves_and_exits_0(tmp_path):
    """A scheduler's SIGTERM reaches `parallm train --nproc 2` only: its agent passes it on, the
    ranks finish the step, save a checkpoint and exit 0, and so does the launcher."""
    import signal

    path = _job_file(tmp_path, "--train.steps=100000", "--train.log_every=1")
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallm.cli", "train", "--nproc", "2", str(path)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + scaled(300)
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=scaled(120)) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    assert "stopped by SIGTERM at step" in text
    assert "parallm: SIGTERM: the ranks were told to stop at a step boundary" in text
    steps = metrics.read_text().count("\n")
    assert (tmp_path / "out" / "checkpoints" / f"step_{steps:08d}").is_dir()


def test_the_launchers_line_names_the_root_cause(tmp_path, capsys, monkeypatch):
    """From the agent's per-rank failures: a rank killed from outside before one that raised,
    the first error before its peers' (by the time each rank recorded), a user error quoted
    when rank 0 (which prints it) is not among this node's failures."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from parallm.distributed.launch import LaunchOptions, _report_failure, record_error

    def failure(rank: int, exitcode: int, message: str | None = None) -> ProcessFailure:
        path = tmp_path / f"error{rank}.json"
        if message is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            record_error(message)
        return ProcessFailure(
            local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path)
        )

    opts = LaunchOptions(nproc=3)
    first = failure(2, 1, "ValueError: first")
    later = failure(0, 1, "RuntimeError: connection closed by peer")
    assert _report_failure({0: later, 1: failure(1, -15), 2: first}, opts) == 1
    assert capsys.readouterr().err == (
        "parallm: rank 2 exited with status 1 (its error is above); the job stopped\n"
    )
    killed = failure(1, -9)
    assert _report_failure({0: later, 1: killed, 2: first}, LaunchOptions(max_restarts=2)) == 1
    assert capsys.readouterr().err == (
        "parallm: rank 1 was killed by SIGKILL; the job stopped after 2 restarts\n"
    )
    user = failure(3, 2, "parallm: error: data.paths: '/x' is neither a file nor a directory")
    assert _report_failure({3: user, 1: failure(1, -15)}, opts) == 2
    assert capsys.readouterr().err.splitlines() == [
        "parallm: error: data.paths: '/x' is neither a file nor a directory"
    ]
    rank0 = failure(0, 2, "parallm: error: data.paths: '/x' is neither a file nor a directory")
    assert _report_failure({0: rank0, 3: user}, opts) == 2
    assert capsys.readouterr().err == ""  # rank 0 printed it already
