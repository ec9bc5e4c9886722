"""parallm's model reads and writes HF directories and computes what `transformers` computes."""

from __future__ import annotations

import logging

import pytest
import torch
from hf_models import VARIANTS, save_hf_model

import parallm

transformers = pytest.importorskip("transformers")


def _ids(vocab: int, b: int = 2, t: int = 37, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    ref = save_hf_model(variant, tmp_path / "hf")
    model = parallm.load_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = _ids(model.args.vocab_size)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == expected.shape == (2, 37, model.args.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saved_directory_loads_in_transformers(variant, tmp_path, caplog):
    save_hf_model(variant, tmp_path / "hf")
    model = parallm.load_pretrained(tmp_path / "hf", dtype=torch.float32)
    parallm.save_pretrained(model, tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        back, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "out", output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    back.eval()
    noisy = [r.message for r in caplog.records if "missing" in r.message.lower()]
    noisy += [r.message for r in caplog.records if "unexpected" in r.message.lower()]
    noisy += [r.message for r in caplog.records if "newly initialized" in r.message.lower()]
    assert not noisy, noisy
    ids = _ids(model.args.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids), atol=0, rtol=0)


def test_sharded_save_round_trips(tmp_path):
    save_hf_model("llama3", tmp_path / "hf")
    model = parallm.load_pretrained(tmp_path / "hf", dtype=torch.float32)
    parallm.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = parallm.load_pretrained(tmp_path / "sharded")
    ids = _ids(model.args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids), atol=0, rtol=0)


def test_meta_build_loads_without_materialising_twice(tmp_path):
    save_hf_model("qwen3", tmp_path / "hf")
    model = parallm.load_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.inv_freq.device.type == "cpu" and model.inv_freq.dtype == torch.float32
