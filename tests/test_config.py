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
        ("", ["--model.architecture", "gpt2"], "valid: STDiT3, llama, mistral, qwen2, qwen3"),
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


@pytest.mark.parametrize(
    "override, match",
    [
        ("--parallel.zero_stage=4", "parallel.zero_stage: 4 is not valid; valid: 1, 2, 3"),
        ("--parallel.pp_schedule=zb", "valid: gpipe, 1f1b, interleaved_1f1b, zero_bubble"),
        ("--parallel.cp_mode=star", "valid: ulysses, ring"),
        ("--parallel.dp_shard=0", "must be >= 1, or -1"),
        ("--parallel.activation_checkpoint=some", "valid: none, full, selective"),
    ],
)
def test_parallel_section_errors(override, match):
    with pytest.raises(UserError, match=match):
        load_config(JobConfig, None, [override])


@pytest.mark.parametrize(
    "degrees, world, match",
    [
        (dict(tp=2, pp=2), 2, r"dp_replicate=1 x dp_shard=-1 x cp=1 x tp=2 x pp=2 vs world size 2"),
        (dict(tp=3), 4, "cannot fill parallel.dp_shard=-1"),
        (dict(dp_shard=2, tp=2), 8, "must multiply to the world size"),
    ],
)
def test_layout_degrees_must_multiply_to_world(degrees, world, match):
    from parallm.distributed.parallel_dims import ParallelDims

    with pytest.raises(UserError, match=match):
        ParallelDims(**degrees, world_size=world)


def test_layout_checked_against_the_model():
    from parallm.distributed.parallel_dims import ParallelDims
    from parallm.models.llama.model import ModelArgs

    model = ModelArgs(
        vocab_size=320, dim=64, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=8, ffn_dim=64
    )
    dims = ParallelDims(tp=4, world_size=4)
    with pytest.raises(UserError, match="parallel.tp: 4 must divide the model's n_kv_heads=2"):
        dims.validate_model(model, seq_len=32, cp_mode="ulysses", n_stages=1)
    dims = ParallelDims(cp=2, tp=2, world_size=4)
    with pytest.raises(
        UserError, match="parallel.cp: 2 must divide the attention heads per tensor"
    ):
        dims.validate_model(model, seq_len=32, cp_mode="ulysses", n_stages=1)
    with pytest.raises(UserError, match="seq_len=36 must be divisible by 8"):
        dims.validate_model(model, seq_len=36, cp_mode="ring", n_stages=1)
    with pytest.raises(UserError, match="5 pipeline stages need at least as many layers"):
        ParallelDims(pp=5, world_size=5).validate_model(
            model, seq_len=32, cp_mode="ulysses", n_stages=5
        )
