"""The training loop: exact resume, accumulation, metrics, checkpoints and HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import parallm
from parallm.config import JobConfig, load_config
from parallm.train import checkpoint as ckpt
from parallm.train.trainer import Trainer

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(CORPUS[i % len(CORPUS)] * (1 + i % 3))
    return d


def job(corpus: Path, out: Path, *extra: str) -> JobConfig:
    overrides = [
        f"--data.paths={corpus}",
        "--data.seq_len=32",
        "--tokenizer.train_vocab_size=300",
        "--model.dim=32",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.ffn_dim=64",
        "--train.steps=6",
        "--train.batch_size=4",
        "--train.micro_batch_size=2",
        "--train.warmup_steps=2",
        "--train.lr=3e-3",
        "--train.log_every=100",
        f"--output.dir={out}",
        "--generate.max_tokens=0",
        *extra,
    ]
    return load_config(JobConfig, None, overrides)


def test_resume_equals_uninterrupted_run(corpus, tmp_path):
    full = Trainer(job(corpus, tmp_path / "full")).fit()
    first = Trainer(job(corpus, tmp_path / "cut", "--checkpoint.every=3"))
    first.fit(until_step=3)
    assert ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_00000003"
    resumed = Trainer(job(corpus, tmp_path / "cut", "--checkpoint.every=3"), resume="always")
    assert resumed.step == 3
    rest = resumed.fit()
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[3:]]
    assert [r["step"] for r in rest] == [4, 5, 6]
    a = parallm.load_pretrained(tmp_path / "full" / "hf")
    b = parallm.load_pretrained(tmp_path / "cut" / "hf")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    one = Trainer(job(corpus, tmp_path / "a", "--train.micro_batch_size=4")).fit()
    acc = Trainer(job(corpus, tmp_path / "b", "--train.micro_batch_size=1")).fit()
    for x, y in zip(one, acc, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_loss_falls_and_metrics_are_logged(corpus, tmp_path):
    cfg = job(
        corpus, tmp_path / "run", "--train.steps=40", "--train.warmup_steps=4", "--train.lr=1e-2"
    )
    records = Trainer(cfg).fit()
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in lines] == list(range(1, 41))
    for r in lines:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
        assert r["tokens"] == 4 * 32 and r["tokens_per_s"] > 0
    assert lines[0]["lr"] == pytest.approx(1e-2 / 4)  # warmup step 1 of 4
    assert lines[3]["lr"] == pytest.approx(1e-2)
    assert lines[-1]["lr"] == pytest.approx(1e-3)  # cosine down to min_lr_ratio 0.1


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers(corpus, tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    cfg = job(corpus, tmp_path / "run", "--train.steps=2", f"--model.tie_embeddings={tied}")
    trainer = Trainer(cfg)
    model = trainer.model.parts[0]
    # Building on meta and materialising must keep a tied head tied through training.
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    trainer.fit()
    hf = tmp_path / "run" / "hf"
    assert (hf / "tokenizer.json").exists() and (hf / "model.safetensors").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.tensor([trainer.tokenizer.encode("def add(a, b):")])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model.eval()(ids), atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert tok("x = 1")["input_ids"] == trainer.tokenizer.encode("x = 1")


def test_failed_checkpoint_leaves_no_finished_directory(corpus, tmp_path, monkeypatch):
    trainer = Trainer(job(corpus, tmp_path / "run", "--train.steps=2", "--train.warmup_steps=1"))
    trainer.fit(until_step=1)
    trainer.save_checkpoint()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()  # step 2 is the last step: it checkpoints, which fails
    found = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert found == ["step_00000001"]
    assert not (tmp_path / "run" / "hf").exists()


@pytest.mark.parametrize(
    "option",
    [
        "--parallel.activation_checkpoint=full",
        "--parallel.activation_checkpoint=selective",
        "--parallel.compile=true",
    ],
)
def test_checkpointing_and_compile_compute_the_same(corpus, tmp_path, option):
    base = Trainer(job(corpus, tmp_path / "a", "--train.steps=2")).fit()
    other = Trainer(job(corpus, tmp_path / "b", "--train.steps=2", option)).fit()
    for x, y in zip(base, other, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    a = parallm.load_pretrained(tmp_path / "a" / "hf").state_dict()
    b = parallm.load_pretrained(tmp_path / "b" / "hf").state_dict()
    assert a.keys() == b.keys()  # wrappers leave parameter names alone
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_a_model_trained_from_scratch_can_chat(corpus, tmp_path, capsys):
    """The tokenizer parallm trains carries a chat template (rendered as `transformers` renders
    it, assistant turns marked), so `generate --chat`, the chat API and SFT work on the model."""
    transformers = pytest.importorskip("transformers")
    from parallm.cli import main

    Trainer(job(corpus, tmp_path / "run", "--train.steps=1")).fit()
    hf = tmp_path / "run" / "hf"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ref = transformers.AutoTokenizer.from_pretrained(hf).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    from parallm.tokenizer import Tokenizer
    from parallm.train.tasks.sft import tokenize_conversation

    ids, mask = tokenize_conversation(Tokenizer.from_dir(hf), messages, "row")
    assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["assistant_masks"]
    assert 0 < mask.sum() < len(mask)
    argv = ["generate", "--model", str(hf), "--prompt", "Hi", "--chat", "--max-tokens", "4"]
    assert main(argv) == 0
