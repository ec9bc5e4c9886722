"""Job configuration: TOML files, --section.key overrides, type checks and clear errors."""

from __future__ import annotations

import tomllib

import pytest

from parallm.config import JobConfig, config_to_toml, load_config
from parallm.errors import UserError


def test_toml_then_overrides_with_types(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[train]\nlr = 1e-3\nsteps = 5\n[data]\npaths = ["a"]\n')
    cfg = load_config(
        JobConfig,
        job,
        [
            "--train.steps",
            "7",
            "--data.paths=x,y",
            "--train.betas=[0.8, 0.9]",
            "--checkpoint.export_hf",
            "false",
            "--model.n_kv_heads=none",
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.data.paths == ["x", "y"] and cfg.train.betas == [0.8, 0.9]
    assert cfg.checkpoint.export_hf is False and cfg.model.n_kv_heads is None
    again = tomllib.loads(config_to_toml(cfg))
    assert load_config(JobConfig, None, []).train.steps != 7
    assert again["train"]["steps"] == 7 and "n_kv_heads" not in again["model"]


@pytest.mark.parametrize(
    "toml, overrides, match",
    [
        ("", ["--train.lrr", "1"], r"unknown key 'train.lrr'; valid keys of \[train\]: steps"),
        ("", ["--trian.lr", "1"], r"unknown section \[trian\]; valid sections: data"),
        ("[train]\nsteps = 'ten'\n", [], "train.steps: expected int, got 'ten'"),
        ("", ["--train.steps", "1.5"], "train.steps: expected int"),
        ("", ["--train.steps", "0"], "train.steps: 0 is not valid; must be >= 1"),
        ("", ["--train.micro_batch_size", "3"], "must divide train.batch_size=8"),
        ("", ["--model.architecture", "gpt2"], "valid: llama, mistral, qwen2, qwen3"),
        ("", ["--model.n_kv_heads", "3"], "must divide model.n_heads=8"),
        ("", ["--checkpoint.export_hf", "maybe"], "expected true or false"),
        ("", ["--train.lr"], "has no value"),
        ("", ["stray"], "unrecognized argument 'stray'"),
        ("[train\n", [], "not valid TOML"),
    ],
)
def test_errors_name_field_value_and_what_is_valid(tmp_path, toml, overrides, match):
    job = tmp_path / "job.toml"
    job.write_text(toml)
    with pytest.raises(UserError, match=match):
        load_config(JobConfig, job, overrides)


def test_missing_job_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(JobConfig, tmp_path / "nope.toml")


def test_demo_config_is_valid():
    cfg = load_config(JobConfig, "configs/demo.toml")
    assert cfg.data.paths == ["{stdlib}"] and cfg.tokenizer.train_vocab_size == 4096
