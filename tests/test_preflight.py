"""Every check that needs no rank runs before launch: one line, exit 2, nothing started.

Most cases call `parallm.cli.main` in this process with the launcher replaced by a function that
fails the test if it is reached, so each asserts both the error and that no rank was started.
The subprocess cases check the real commands: `parallm train --nproc 2`, `parallm bench train
--nproc 2` (the README's line, which runs) and `torchrun -m parallm.train` (each rank checks
before joining the process group; rank 0 prints).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from parallel_jobs import job as make_job
from parallel_jobs import make_corpus
from test_cli_errors import assert_one_line_error

from parallm.cli import main
from parallm.config import JobConfig, config_to_toml, load_config
from parallm.distributed.parallel_dims import ParallelDims
from parallm.errors import UserError
from parallm.testing.timeouts import scaled
from parallm.train.preflight import pipeline_stages, resolve_micro_batch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if anything reaches the launcher or the in-process trainer."""

    def launched(*args, **kwargs):
        raise AssertionError("a rank was started")

    monkeypatch.setattr("parallm.distributed.launch.launch", launched)
    monkeypatch.setattr("parallm.train.__main__.run", launched)


def _job_file(tmp_path: Path, corpus, *extra: str) -> Path:
    data, tok = corpus
    cfg = make_job(data, tok, tmp_path / "out", "--train.steps=2", *extra)
    path = tmp_path / "job.toml"
    path.write_text(config_to_toml(cfg))
    return path


@pytest.mark.parametrize(
    "nproc, extra, needles",
    [
        (2, ["--parallel.tp=3"], ["tp=3", "world size 2"]),
        (4, ["--parallel.tp=4"], ["parallel.tp: 4", "n_kv_heads=2"]),
        (
            4,
            ["--parallel.pp=4", "--parallel.pp_schedule=interleaved_1f1b"],
            ["8 pipeline stages", "n_layers=4"],
        ),
        (2, ["--task.name=dpo", "--parallel.pp=2"], ["parallel.pp: 2", "task.name='dpo'"]),
        (2, ["--lora.r=4", "--lora.target_modules=nope"], ["lora.target_modules", "nope"]),
        (3, [], ["train.batch_size: 8", "3 data-parallel ranks"]),
        (4, ["--train.micro_batch_size=4"], ["train.micro_batch_size: 4", "(2 sequences)"]),
        (
            2,
            ["--parallel.pp=2", "--parallel.pp_microbatches=3"],
            ["parallel.pp_microbatches: 3", "train.micro_batch_size=2"],
        ),
        (2, ["--data.paths=/no/such/dir"], ["data.paths", "/no/such/dir"]),
        (2, ["--data.seq_len=4096"], ["data.seq_len: 4096", "model.max_seq_len"]),
    ],
)
def test_a_bad_job_is_one_line_before_launch(
    capsys, tmp_path, corpus, no_launch, nproc, extra, needles
):
    job = _job_file(tmp_path, corpus, *extra)
    code = main(["train", "--nproc", str(nproc), str(job)])
    assert_one_line_error(code, capsys.readouterr().err, *needles)


@pytest.mark.parametrize(
    "options, needles",
    [
        (["--nnodes", "2"], ["--rdzv-endpoint", "--nnodes 2"]),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], ["--node-rank: 2"]),
        (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1"], ["--rdzv-endpoint", "HOST:PORT"]),
        (["--max-restarts", "-1"], ["--max-restarts: -1", ">= 0"]),
        (["--nproc", "0"], ["--nproc: 0", ">= 1"]),
        (["--standalone", "--rdzv-endpoint", "h:1"], ["--standalone"]),
        (["--resume", "sometimes"], ["--resume", "sometimes", "auto"]),
    ],
)
def test_bad_launch_options_are_one_line(capsys, tmp_path, corpus, no_launch, options, needles):
    job = _job_file(tmp_path, corpus)
    code = main(["train", str(job), *options])
    assert_one_line_error(code, capsys.readouterr().err, *needles)


def test_resume_always_without_a_checkpoint_fails_before_the_tokenizer(capsys, tmp_path, corpus):
    data, _ = corpus
    job = tmp_path / "job.toml"
    out = tmp_path / "out"
    job.write_text(
        f'[data]\npaths = ["{data}"]\nseq_len = 16\n[tokenizer]\ntrain_vocab_size = 300\n'
        f'[output]\ndir = "{out}"\n[model]\ndim = 32\nn_layers = 1\nn_heads = 4\nffn_dim = 64\n'
    )
    (out / "checkpoints" / ".step_00000002.tmp").mkdir(parents=True)  # not a checkpoint
    code = main(["train", str(job), "--resume"])
    assert_one_line_error(code, capsys.readouterr().err, "--resume: always", "checkpoints")
    assert not (out / "tokenizer").exists()  # nothing was built


def _dims(world: int, **degrees) -> ParallelDims:
    return ParallelDims(world_size=world, **degrees)


def test_micro_batch_auto_is_the_data_parallel_share():
    def micro(world: int, *overrides: str) -> int:
        cfg = load_config(JobConfig, None, ["--train.batch_size=16", *overrides])
        dims = ParallelDims.from_config(cfg.parallel, world)
        return resolve_micro_batch(cfg, dims, pipeline_stages(cfg, dims))

    assert micro(1) == 16
    assert micro(2) == 8  # dp_shard fills the world
    assert micro(8, "--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.tp=2") == 4
    assert micro(4, "--parallel.pp=2", "--parallel.dp_shard=2") == 8  # 2 stages divide 8
    assert micro(2, "--train.micro_batch_size=2") == 2  # an explicit number is kept
    with pytest.raises(UserError, match="pp_microbatches: 3 must divide train.micro_batch_size=4"):
        micro(8, "--parallel.pp=2", "--parallel.pp_microbatches=3")
    with pytest.raises(UserError, match="train.batch_size: 16 does not split over the 3"):
        micro(3)


def test_micro_batch_override_auto_parses(tmp_path, corpus):
    path = _job_file(tmp_path, corpus)  # micro_batch_size = 2 in the file
    cfg = load_config(JobConfig, path, ["--train.micro_batch_size", "auto"])
    assert cfg.train.micro_batch_size == "auto"
    assert load_config(JobConfig, path, []).train.micro_batch_size == 2


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=scaled(300), **kwargs)


def test_parallm_train_nproc_error_is_one_line_and_starts_nothing(tmp_path, corpus):
    job = _job_file(tmp_path, corpus, "--data.paths=/no/such/dir")
    proc = _run([sys.executable, "-m", "parallm.cli", "train", "--nproc", "2", str(job)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "parallm: error: data.paths: '/no/such/dir' is neither a file nor a directory"
    ]
    assert "starting" not in proc.stdout  # the launcher was not reached


def test_torchrun_ranks_check_before_joining_and_rank0_prints_once(tmp_path, corpus):
    job = _job_file(tmp_path, corpus, "--parallel.tp=3")
    proc = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "parallm.train", str(job)]
    )
    assert proc.returncode != 0
    # torchrun's own report follows (its table quotes the error each rank recorded); the ranks
    # print one line between them, and no traceback.
    ours = [line for line in proc.stderr.splitlines() if line.startswith("parallm: error:")]
    assert len(ours) == 1 and "tp=3" in ours[0] and "world size 2" in ours[0], proc.stderr
    assert "parallm: rank" not in proc.stderr


def test_bench_train_nproc_errors_before_launch_and_runs(capsys, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    common = ["bench", "train", "--shape", "tiny", "--nproc", "2", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr("parallm.distributed.launch.launch", lambda *a: pytest.fail("launched"))
        code = main([*common, "--set", "parallel.dp_shard=2", "--batch", "3"])
        assert_one_line_error(code, capsys.readouterr().err, "train.batch_size: 3", "2 data")
        code = main([*common, "--set", "parallel.tp=3"])
        assert_one_line_error(code, capsys.readouterr().err, "tp=3", "world size 2")
    # The README's line, with the default --micro-batch 0 (each rank's share), really runs.
    small = ["--seq-len", "32", "--batch", "4", "--steps", "1", "--warmup", "0"]
    proc = _run(
        [sys.executable, "-m", "parallm.cli", *common, "--set", "parallel.dp_shard=2", *small]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "micro_batch_size=2 (auto)" in proc.stdout
    assert (out / "report.json").exists()
