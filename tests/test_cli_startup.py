"""`parallm --help`, every command's help and every error that needs no model answer without
importing torch (which takes seconds, minutes on a loaded machine); `parallm bench --help` lists
the benchmarks and each benchmark shows its own options.

The check is on module presence, not on time: a fresh interpreter runs the commands one after
another and reports, after each, its exit status, its output and whether torch is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallm.testing.timeouts import scaled

RUNNER = """
import contextlib, io, json, sys
from parallm.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's --help
            code = e.code
    results.append([argv, code, out.getvalue(), err.getvalue(), "torch" in sys.modules])
print(json.dumps(results))
"""


def _run(*argvs: list[str]) -> dict[str, tuple[int, str, str, bool]]:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode == 0, proc.stderr
    return {
        " ".join(argv): (code, out, err, torch)
        for argv, code, out, err, torch in json.loads(proc.stdout)
    }


@pytest.fixture
def job(tmp_path: Path) -> str:
    (tmp_path / "data.txt").write_text("some text to train on\n")
    path = tmp_path / "job.toml"
    path.write_text(
        f'[data]\npaths = ["{tmp_path}"]\n[train]\nsteps = 2\n[output]\ndir = "{tmp_path}/out"\n'
    )
    return str(path)


HELP = [
    ["--help"],
    ["train", "--help"],
    ["generate", "--help"],
    ["merge", "--help"],
    ["plan", "--help"],
    ["keys", "--help"],
    ["keys", "create", "--help"],
    ["serve", "--help"],
    ["ui", "--help"],
    ["bench", "--help"],
    ["bench", "train", "--help"],
    ["bench", "infer", "--help"],
    ["bench", "serve", "--help"],
    ["bench", "video", "--help"],
    ["video", "--help"],
    ["video", "generate", "--help"],
]


def test_help_never_imports_torch():
    results = _run(*HELP)
    for argv in map(" ".join, HELP):
        code, out, err, torch = results[argv]
        assert code == 0 and out.startswith("usage: parallm"), (argv, code, err)
        assert not torch, f"parallm {argv} imported torch"


def test_bench_help_lists_the_benchmarks_and_each_shows_its_options():
    results = _run(*[h for h in HELP if h[0] == "bench"])
    listing = results["bench --help"][1]
    for name in ("train", "infer", "serve", "video"):
        line = next(x for x in listing.splitlines() if x.strip().startswith(name + " "))
        assert len(line.split()) > 2, line  # the name, then what it measures
    own = {"train": "--shape", "infer": "--num-requests", "serve": "--rates", "video": "--frames"}
    for name, option in own.items():
        out = results[f"bench {name} --help"][1]
        assert out.startswith(f"usage: parallm bench {name}") and option in out, out


def test_errors_that_need_no_model_never_import_torch(job, tmp_path):
    errors = {
        # argument errors
        "train: the following arguments are required: job": ["train"],
        "bench: the following arguments are required": ["bench"],
        "invalid choice: 'nope'": ["bench", "nope"],
        "generate: argument --model: expected one argument": ["generate", "--model"],
        "serve: the following arguments are required: --model": ["serve"],
        # job files and their overrides
        "job file 'missing.toml' does not exist": ["train", "missing.toml"],
        "train.stepz": ["train", job, "--train.stepz", "3"],
        "train.steps: expected int": ["train", job, "--train.steps", "x"],
        "model.architecture: 'gpt2'": ["train", job, "--model.architecture", "gpt2"],
        "task.name: 'nope'": ["train", job, "--task.name", "nope"],
        "lora.r: -1": ["train", job, "--lora.r", "-1"],
        "--nproc: 0": ["train", "--nproc", "0", job],
        # what the job asks of the machine: layout degrees, data paths, resume state
        "tp=3 x pp=1 vs world size 2": ["train", "--nproc", "2", job, "--parallel.tp", "3"],
        "data.paths: '/nope'": ["train", job, "--data.paths", '["/nope"]'],
        "--resume: always, but there is no complete checkpoint": ["train", job, "--resume"],
        # options of the other commands
        "--port: -1": ["serve", "--model", str(tmp_path), "--port", "-1"],
        "--max-waiting: 0": ["serve", "--model", str(tmp_path), "--max-waiting", "0"],
        "--log-level: 'loud'": ["serve", "--model", str(tmp_path), "--log-level", "loud"],
        "--lora: 'x'": ["serve", "--model", str(tmp_path), "--lora", "x"],
        "does not exist": ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
        "config.json": ["generate", "--model", str(tmp_path), "--prompt", "x"],
        "--input-len: '5:3'": ["bench", "infer", "--input-len", "5:3"],
    }
    results = _run(*errors.values())
    for needle, argv in errors.items():
        code, _, err, torch = results[" ".join(argv)]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("parallm: error:"), (argv, err)
        assert needle in lines[0], (needle, lines[0])
        assert not torch, f"parallm {' '.join(argv)} imported torch"


def test_console_script_answers_help():
    script = Path(sys.executable).parent / "parallm"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (not installed with pip -e)")
    proc = subprocess.run(
        [str(script), "bench", "--help"], capture_output=True, text=True, timeout=scaled(60)
    )
    assert proc.returncode == 0 and "train" in proc.stdout and "serve" in proc.stdout, proc.stderr
