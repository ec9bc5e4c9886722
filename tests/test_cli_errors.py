"""Every error a user can cause: one line on stderr naming what is wrong, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import save_hf_model

from parallm.cli import main
from parallm.testing.timeouts import scaled


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parallm: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf")
    save_hf_model("llama3", d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_model_directory(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert_one_line_error(code, err, "nope", "does not exist")


def test_unsupported_architecture(capsys, tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "generate", "--model", str(d), "--prompt", "x")
    assert_one_line_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_truncated_safetensors(capsys, tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, "generate", "--model", str(d), "--prompt", "x")
    assert_one_line_error(code, err, "model.safetensors", "truncated")


def test_config_disagrees_with_weights(capsys, tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "generate", "--model", str(d), "--prompt", "x")
    assert_one_line_error(code, err, "mlp", "112]", "96]", "disagree")


def test_invalid_config_json(capsys, tmp_path, hf_dir):
    d = _copy(hf_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    code, err = run_cli(capsys, "generate", "--model", str(d), "--prompt", "x")
    assert_one_line_error(code, err, "config.json", "invalid JSON")


def _job(tmp_path: Path, data: Path) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(
        f'[data]\npaths = ["{data}"]\nseq_len = 16\n'
        "[tokenizer]\ntrain_vocab_size = 300\n"
        f'[output]\ndir = "{tmp_path / "out"}"\n'
        "[train]\nsteps = 1\nbatch_size = 2\nmicro_batch_size = 2\nwarmup_steps = 0\n"
        "[model]\ndim = 32\nn_layers = 1\nn_heads = 4\nffn_dim = 64\n"
    )
    return job


def test_empty_dataset(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.txt").write_text("")
    code, err = run_cli(capsys, "train", str(_job(tmp_path, data)))
    assert_one_line_error(code, err, "token")
    assert not (tmp_path / "out" / "hf").exists()


def test_unknown_override_lists_valid_keys(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    code, err = run_cli(capsys, "train", str(_job(tmp_path, data)), "--train.lrr", "1")
    assert_one_line_error(code, err, "train.lrr", "lr", "batch_size")


def test_bad_override_value(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    code, err = run_cli(capsys, "train", str(_job(tmp_path, data)), "--train.lr", "fast")
    assert_one_line_error(code, err, "train.lr", "fast")


def test_bad_cli_argument(capsys):
    code, err = run_cli(capsys, "generate", "--model")
    assert_one_line_error(code, err, "--model")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "parallm.cli",
            "generate",
            "--model",
            str(tmp_path),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "config.json" in proc.stderr


def test_serve_errors_before_loading(capsys, tmp_path, hf_dir):
    import socket

    code, err = run_cli(capsys, "serve", "--model", str(tmp_path / "nope"), "--no-auth")
    assert_one_line_error(code, err, "does not exist")
    code, err = run_cli(capsys, "serve", "--model", str(hf_dir), "--max-waiting", "0")
    assert_one_line_error(code, err, "--max-waiting", "0", ">= 1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code, err = run_cli(capsys, "serve", "--model", str(hf_dir), "--port", port, "--no-auth")
    assert_one_line_error(code, err, "--port", port)
    code, err = run_cli(
        capsys, "serve", "--model", str(hf_dir), "--no-auth", "--tensor-parallel-size", "3"
    )
    assert_one_line_error(code, err, "tensor")


def test_a_video_model_given_to_the_text_engine_is_one_line(capsys, tmp_path):
    from parallm.models.hf import save_pretrained
    from parallm.models.stdit import SPEC, STDiTArgs

    args = STDiTArgs(depth=1, hidden_size=32, num_heads=2, caption_channels=16, model_max_length=4)
    path = save_pretrained(SPEC.build(args, device="cpu"), tmp_path / "stdit")
    code, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi")
    assert_one_line_error(code, err, "is a STDiT3 video model", "--video-model")
