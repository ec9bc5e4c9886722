"""LoRA adapters in peft's format, in and out: what parallm writes loads in `peft` and computes
the same logits, what `peft` writes loads in parallm (to run, to train on, to merge), and every
bad adapter is one line naming what is wrong, before anything is written or launched."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hf_models import CODE_TEXTS, save_hf_model, save_hf_model_with_tokenizer
from test_cli_errors import assert_one_line_error

from parallm.cli import main
from parallm.config import JobConfig, load_config
from parallm.models.build import canonical_name, copy_local_shard
from parallm.models.hf import load_pretrained
from parallm.models.lora import LoraSpec, adapter_disabled, apply_lora, fill_adapter, lora_modules
from parallm.models.peft_format import Adapter, load_model_with_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # float32 logits of two implementations of the same model (as in test_hf_parity)


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(seed))


def _peft_adapter(
    base: Path, out: Path, *, r: int = 4, alpha: int = 8, seed: int = 0, **config
) -> torch.nn.Module:
    """Save a peft adapter on the HF model in `base`, with random non-zero lora_B and saved
    modules moved off the base (peft starts from B = 0 and copies); returns the peft model."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    config.setdefault("target_modules", ["q_proj", "k_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(ref, peft.LoraConfig(r=r, lora_alpha=alpha, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    return model.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids) if isinstance(model, peft.PeftModel) else model(ids)
    return out.logits if hasattr(out, "logits") else out


# -- parallm -> peft ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama3", "qwen3", "mistral"])
def test_parallm_adapter_loads_in_peft_with_equal_logits(variant, tmp_path):
    """Adapters on attention (q, k) and MLP (gate, down) layers and an untied lm_head saved
    whole, with random non-zero values: peft's model gives parallm's logits."""
    ref = save_hf_model(variant, tmp_path / "base")
    assert not ref.config.tie_word_embeddings
    model = load_pretrained(tmp_path / "base")
    spec = LoraSpec(
        r=4,
        alpha=8.0,
        target_modules=("q_proj", "k_proj", "gate_proj", "down_proj"),
        modules_to_save=("lm_head",),
    )
    apply_lora(model, spec)
    gen = torch.Generator().manual_seed(3)
    tensors = {
        canonical_name(n): p.detach() + torch.randn(p.shape, generator=gen) * 0.05
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert len(tensors) == 2 * 4 * 3 + 1  # A and B of 4 layers in 3 blocks, and lm_head
    fill_adapter(model, tensors, fill=copy_local_shard)
    save_adapter(Adapter(spec=spec, tensors=tensors), model.args, tmp_path / "adapter")

    ids = _ids(model.args.vocab_size)
    base_logits = _logits(ref, ids)
    ours = _logits(model.eval(), ids)
    assert (ours - base_logits).abs().max() > 0.1  # the adapter changes what the model computes
    theirs = _logits(peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval(), ids)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)
    again = load_model_with_adapter(tmp_path / "base", tmp_path / "adapter")
    torch.testing.assert_close(_logits(again, ids), ours, atol=0, rtol=0)


# -- peft -> parallm ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "config"),
    [
        ("llama3", dict(modules_to_save=["lm_head"])),
        # A regular expression peft matched against HF names (`model.layers.0...`): two blocks.
        ("qwen3", dict(target_modules=r".*\.layers\.[01]\.(self_attn\.(q|v)|mlp\.up)_proj")),
        ("mistral", dict(target_modules="all-linear", use_rslora=True)),
    ],
)
def test_peft_adapter_loads_in_parallm_with_equal_logits(variant, config, tmp_path):
    save_hf_model(variant, tmp_path / "base")
    theirs = _peft_adapter(tmp_path / "base", tmp_path / "adapter", **config)
    model = load_model_with_adapter(tmp_path / "base", tmp_path / "adapter")
    peft_layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(list(lora_modules(model))) == len(peft_layers) > 0
    ids = _ids(model.args.vocab_size, seed=2)
    with adapter_disabled(model):
        base_logits = _logits(model, ids)
    ours = _logits(model, ids)
    assert (ours - base_logits).abs().max() > 0.1
    torch.testing.assert_close(ours, _logits(theirs, ids), atol=ATOL, rtol=ATOL)


# -- training from a peft adapter --------------------------------------------------------------

# The peft adapter of `_peft_adapter`'s defaults plus lm_head, as [lora] settings.
PEFT_LORA = (
    "--lora.r=4",
    "--lora.alpha=8",
    "--lora.target_modules=q_proj,k_proj,up_proj,down_proj",
    "--lora.modules_to_save=lm_head",
)


def _lora_job(base: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(
        JobConfig,
        None,
        [
            f"--model.path={base}",
            "--data.random_tokens=4096",
            "--data.seq_len=16",
            "--train.steps=2",
            "--train.batch_size=4",
            "--train.micro_batch_size=2",
            "--train.warmup_steps=0",
            "--train.lr=1e-2",
            "--train.log_every=100",
            "--checkpoint.every=0",
            "--generate.max_tokens=0",
            f"--output.dir={out}",
            *extra,
        ],
    )


def test_training_starts_from_a_peft_adapter(tmp_path):
    """`lora.init_from` a peft adapter: the step-0 weights are the adapter's, the step-0 loss is
    the peft model's on the same batch, and the adapter trained from it loads back in peft."""
    from parallm.train.tasks import IGNORE_INDEX
    from parallm.train.trainer import Trainer

    save_hf_model("llama3", tmp_path / "base")
    theirs = _peft_adapter(tmp_path / "base", tmp_path / "peft", modules_to_save=["lm_head"])
    cfg = _lora_job(
        tmp_path / "base", tmp_path / "run", *PEFT_LORA, f"--lora.init_from={tmp_path / 'peft'}"
    )
    trainer = Trainer(cfg)
    start = trainer.full_state_dict(trainable_only=True)
    saved = load_model_with_adapter(tmp_path / "base", tmp_path / "peft")
    want = {canonical_name(n): p for n, p in saved.named_parameters() if p.requires_grad}
    assert start.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(start[name], value, atol=0, rtol=0, msg=name)

    batch = trainer.task.batch(trainer.data.next_rows())
    ours, _ = trainer.runner.evaluate(batch.split(cfg.train.micro_batch_size))
    logits = _logits(theirs, batch.input_ids)
    peft_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX
    )
    assert abs(ours - float(peft_loss)) < 1e-5, (ours, float(peft_loss))

    trainer.fit()
    trained = trainer.model.parts[0].eval()
    ids = _ids(trained.args.vocab_size, seed=4)
    back = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        tmp_path / "run" / "adapter",
    ).eval()
    torch.testing.assert_close(_logits(trained, ids), _logits(back, ids), atol=ATOL, rtol=ATOL)
    assert (_logits(trained, ids) - _logits(theirs, ids)).abs().max() > 1e-3  # it trained


def test_frozen_base_in_bfloat16_trains_like_float32(tmp_path):
    """`lora.base_dtype = "bfloat16"` on CPU: the frozen base is bf16, what trains (adapters, a
    saved module) stays float32, and the losses follow the float32 run's.

    Tolerance: each loss is a mean over the batch's 64 tokens of log-softmax of logits made from
    bf16 weights and bf16 matmul inputs (autocast). bf16 keeps 8 significant bits, a unit
    roundoff u = 2^-9; the roundings are independent across tokens and mostly cancel in the
    mean, so the loss moves by much less than one rounding of the loss itself: |diff| <= u * loss
    (0.011 here), while the six steps lower the loss by about 0.3 (measured: diff <= 5e-4)."""
    from parallm.train.trainer import Trainer

    save_hf_model_with_tokenizer("llama3", tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(CODE_TEXTS[:2]):
        (data / f"{i}.txt").write_text(text * 20)
    lora = (
        f"--data.paths={data}",
        "--data.random_tokens=0",
        "--lora.r=4",
        "--lora.target_modules=q_proj,v_proj,gate_proj,down_proj",
        "--lora.modules_to_save=norm",
        "--train.steps=6",
        "--train.lr=2e-2",
    )
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _lora_job(tmp_path / "base", tmp_path / dtype, *lora, f"--lora.base_dtype={dtype}")
        trainer = Trainer(cfg)
        for name, p in trainer.model.parts[0].named_parameters():
            want = torch.float32 if p.requires_grad or dtype == "float32" else torch.bfloat16
            assert p.dtype == want, (dtype, name, p.dtype)
        losses[dtype] = [r["loss"] for r in trainer.fit()]
        assert all(math.isfinite(x) for x in losses[dtype]), losses
        assert losses[dtype][-1] < losses[dtype][0] - 0.1, losses  # it learns the text
    u = 2.0**-9
    for ref, got in zip(losses["float32"], losses["bfloat16"], strict=True):
        assert abs(got - ref) <= u * ref, losses


# -- parallm merge -----------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the fixtures printed (transformers' progress bars)
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_merge_writes_a_model_transformers_loads(capsys, tmp_path):
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _, tok = save_hf_model_with_tokenizer("qwen3", base)
    theirs = _peft_adapter(base, adapter, modules_to_save=["lm_head"])
    code, stdout, err = _cli(capsys, "merge", "--model", base, "--adapter", adapter, "--out", out)
    assert code == 0, err
    assert str(out) in stdout
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(tok.vocab_size, seed=5)
    torch.testing.assert_close(_logits(merged, ids), _logits(theirs, ids), atol=ATOL, rtol=ATOL)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".merged*"))  # no temporary directory left behind

    code, stdout, err = _cli(
        capsys, "generate", "--model", out, "--prompt", "def add", "--max-tokens", "6"
    )
    assert code == 0, err
    assert stdout.endswith("\n")  # generated text streamed, then the closing newline

    # An existing directory is replaced only when asked, and never the base or the adapter.
    code, _, err = _cli(capsys, "merge", "--model", base, "--adapter", adapter, "--out", out)
    assert_one_line_error(code, err, "--out", "not empty", "--force")
    for d in (base, adapter):
        code, _, err = _cli(
            capsys, "merge", "--model", base, "--adapter", adapter, "--out", d, "--force"
        )
        assert_one_line_error(code, err, "--out", "directory; choose a new one")
    (out / "stale.txt").write_text("old")
    argv = ("merge", "--model", base, "--adapter", adapter, "--out", out, "--force")
    assert _cli(capsys, *argv)[0] == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_merge_failing_midway_leaves_nothing(capsys, tmp_path, monkeypatch):
    from parallm import merge as merge_module

    save_hf_model("llama3", tmp_path / "base")
    _peft_adapter(tmp_path / "base", tmp_path / "adapter")

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_module._CopiedFiles, "save", disk_full)
    argv = ("merge", "--model", tmp_path / "base", "--adapter", tmp_path / "adapter")
    code, _, err = _cli(capsys, *argv, "--out", tmp_path / "merged")
    assert_one_line_error(code, err, "--out", "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A base model, a peft adapter for it, and adapters for two other bases: a smaller hidden
    size, and four blocks instead of three."""
    root = tmp_path_factory.mktemp("bad")
    save_hf_model("llama3", root / "base")
    _peft_adapter(root / "base", root / "adapter")
    save_hf_model("llama3", root / "narrow", hidden_size=32, num_attention_heads=4)
    _peft_adapter(root / "narrow", root / "narrow_adapter")
    save_hf_model("llama3", root / "deep", num_hidden_layers=4)
    _peft_adapter(root / "deep", root / "deep_adapter")
    return {d.name: d for d in root.iterdir()}


def _merge(capsys, tmp_path: Path, dirs: dict[str, Path], adapter: Path) -> str:
    out = tmp_path / "merged"
    code, _, err = _cli(
        capsys, "merge", "--model", dirs["base"], "--adapter", adapter, "--out", out
    )
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert code == 2, err
    return err


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_adapter_for_another_hidden_size(capsys, tmp_path, dirs):
    err = _merge(capsys, tmp_path, dirs, dirs["narrow_adapter"])
    assert_one_line_error(
        2,
        err,
        "--adapter: layers.0.mlp.down_proj.lora_B.weight has shape [32, 4]: 32 output features",
        "base model's layers.0.mlp.down_proj has 64",
        "made for another base model",
    )


def test_adapter_for_more_layers(capsys, tmp_path, dirs):
    err = _merge(capsys, tmp_path, dirs, dirs["deep_adapter"])
    assert_one_line_error(2, err, "--adapter:", "layers.3.", "base model does not have")


def test_weights_disagree_with_the_configs_rank(capsys, tmp_path, dirs):
    adapter = _copy(dirs["adapter"], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    err = _merge(capsys, tmp_path, dirs, adapter)
    assert_one_line_error(2, err, "--adapter:", "rank 4", "r=8", "disagree")


def test_not_an_adapter_directory(capsys, tmp_path, dirs):
    err = _merge(capsys, tmp_path, dirs, dirs["base"])
    assert_one_line_error(2, err, "--adapter:", "not a LoRA adapter directory", "adapter_config")


def test_truncated_adapter_weights(capsys, tmp_path, dirs):
    adapter = _copy(dirs["adapter"], tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    err = _merge(capsys, tmp_path, dirs, adapter)
    assert_one_line_error(2, err, "--adapter:", "adapter_model.safetensors", "truncated")


def test_adapter_with_unsupported_peft_options(capsys, tmp_path, dirs):
    adapter = _copy(dirs["adapter"], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["layers_to_transform"] = [0, 1]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    err = _merge(capsys, tmp_path, dirs, adapter)
    assert_one_line_error(2, err, "--adapter:", "layers_to_transform", "plain LoRA")


def _train(capsys, tmp_path: Path, *overrides: str, nproc: int = 1) -> str:
    """`parallm train` with a job on `--model.path`: it must fail before launching anything."""
    job = tmp_path / "job.toml"
    job.write_text("[data]\nrandom_tokens = 4096\nseq_len = 16\n")
    argv = ["train", str(job), f"--nproc={nproc}", f"--output.dir={tmp_path / 'out'}", *overrides]
    code, _, err = _cli(capsys, *argv)
    assert not (tmp_path / "out").exists()
    assert code == 2, err
    return err


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if `parallm train` starts a process or a training run."""
    import subprocess

    import parallm.train.__main__ as train_main

    def launched(*args, **kwargs):
        raise AssertionError("a training process was started")

    monkeypatch.setattr(subprocess, "run", launched)
    monkeypatch.setattr(train_main, "run", launched)
    monkeypatch.setattr("parallm.distributed.launch.launch", launched)


@pytest.mark.parametrize("nproc", [1, 2])
def test_target_modules_that_match_nothing_fail_before_launch(
    capsys, tmp_path, dirs, no_launch, nproc
):
    err = _train(
        capsys,
        tmp_path,
        f"--model.path={dirs['base']}",
        "--lora.r=4",
        "--lora.target_modules=foo",
        nproc=nproc,
    )
    assert_one_line_error(2, err, "lora.target_modules:", "'foo'", "q_proj", "all-linear")


def test_target_modules_checked_on_a_fresh_model_too(capsys, tmp_path, no_launch):
    err = _train(
        capsys,
        tmp_path,
        "--model.vocab_size=64",
        "--model.dim=32",
        "--model.n_layers=1",
        "--model.n_heads=4",
        "--model.ffn_dim=64",
        "--lora.r=4",
        "--lora.target_modules=qproj",
        nproc=2,
    )
    assert_one_line_error(2, err, "lora.target_modules:", "'qproj'", "q_proj")


def test_init_from_with_another_rank_fails_before_launch(capsys, tmp_path, dirs, no_launch):
    base, adapter = dirs["base"], dirs["adapter"]
    lora = [o for o in PEFT_LORA if not o.startswith(("--lora.r=", "--lora.modules_to_save"))]
    err = _train(
        capsys,
        tmp_path,
        f"--model.path={base}",
        f"--lora.init_from={adapter}",
        "--lora.r=8",
        *lora,
        nproc=2,
    )
    assert_one_line_error(2, err, "lora.init_from:", "r = 4", "lora.r is 8", "set lora.r = 4")


def test_init_from_with_other_target_modules(capsys, tmp_path, dirs, no_launch):
    lora = [o for o in PEFT_LORA if not o.startswith(("--lora.target", "--lora.modules_to_save"))]
    err = _train(
        capsys,
        tmp_path,
        f"--model.path={dirs['base']}",
        f"--lora.init_from={dirs['adapter']}",
        *lora,
        "--lora.target_modules=q_proj,v_proj",
    )
    assert_one_line_error(
        2,
        err,
        "lora.init_from:",
        "set lora.target_modules = ['down_proj', 'k_proj', 'q_proj', 'up_proj']",
    )


def test_init_from_an_adapter_of_another_base(capsys, tmp_path, dirs, no_launch):
    lora = [o for o in PEFT_LORA if not o.startswith("--lora.modules_to_save")]
    err = _train(
        capsys,
        tmp_path,
        f"--model.path={dirs['base']}",
        f"--lora.init_from={dirs['narrow_adapter']}",
        *lora,
        nproc=2,
    )
    assert_one_line_error(2, err, "lora.init_from:", "another base model")


def test_adapter_on_an_embedding(capsys, tmp_path, dirs):
    _peft_adapter(dirs["base"], tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"])
    err = _merge(capsys, tmp_path, dirs, tmp_path / "adapter")
    assert_one_line_error(2, err, "--adapter:", "embed_tokens.lora_embedding_A", "linear layers")
