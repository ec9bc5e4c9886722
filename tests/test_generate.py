"""The KV-cache generation path against `transformers` greedy `generate` on the same weights."""

from __future__ import annotations

import pytest
import torch
from hf_models import greedy_reference, save_hf_model, save_hf_model_with_tokenizer

import parallm
from parallm.errors import UserError
from parallm.generate import generate, sample_next
from parallm.inference.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    # Lengths cross the Mistral test window (7), so cached decode must apply it too.
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 5, 19)]


@pytest.mark.parametrize("variant", ["llama31", "llama32_tied", "mistral", "qwen2", "qwen3"])
def test_greedy_equals_transformers(variant, tmp_path):
    ref = save_hf_model(variant, tmp_path)
    model = parallm.load_pretrained(tmp_path, dtype=torch.float32)
    for prompt in _prompts(model.args.vocab_size):
        expected = greedy_reference(ref, prompt, 24)
        got = generate(model, prompt, SamplingParams(max_tokens=24, temperature=0))
        assert got == expected, (variant, len(prompt))


def test_cached_logits_equal_full_forward(tmp_path):
    save_hf_model("mistral", tmp_path)
    model = parallm.load_pretrained(tmp_path, dtype=torch.float32)
    prompt = _prompts(model.args.vocab_size)[2]
    out = generate(model, prompt, SamplingParams(max_tokens=10, temperature=0))
    with torch.no_grad():
        full = model(torch.tensor([prompt + out]))[0].argmax(-1)
    assert full[len(prompt) - 1 : -1].tolist() == out


def test_stop_token_and_seeded_sampling(tmp_path):
    save_hf_model("llama3", tmp_path)
    model = parallm.load_pretrained(tmp_path, dtype=torch.float32)
    opts = SamplingParams(max_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate(model, [5, 6, 7], opts)
    assert a == generate(model, [5, 6, 7], opts)
    assert a != generate(model, [5, 6, 7], SamplingParams(**{**vars(opts), "seed": 8}))
    stopped = generate(model, [5, 6, 7], opts, stop_token_ids=[a[3]])
    assert stopped == a[: a.index(a[3]) + 1]


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g)
    assert set(k2.tolist()) == {3, 4}
    # softmax of 0..4: p(4)=0.636, p(3)=0.234 -> top_p 0.8 keeps exactly {4, 3}
    p = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), g)
    assert set(p.tolist()) == {3, 4}
    assert set(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g).tolist()) == {4}


@pytest.mark.parametrize(
    "prompt, opts, match",
    [
        ([], dict(max_tokens=4), "prompt is empty"),
        ([10**6], dict(max_tokens=4), "outside the vocabulary"),
        ([1, 2], dict(max_tokens=10_000), "exceeds the model's context"),
    ],
)
def test_bad_requests(tmp_path, prompt, opts, match):
    save_hf_model("llama3", tmp_path)
    model = parallm.load_pretrained(tmp_path, dtype=torch.float32)
    with pytest.raises(UserError, match=match):
        generate(model, prompt, SamplingParams(**opts))


@pytest.mark.parametrize(
    "opts", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)]
)
def test_bad_sampling_options(opts):
    with pytest.raises(UserError):
        SamplingParams(**opts)


def test_cli_generate_greedy_equals_transformers(tmp_path, capsys):
    from parallm.cli import main
    from parallm.tokenizer import Tokenizer

    ref, tok = save_hf_model_with_tokenizer("qwen3", tmp_path)
    prompt = "def add(a, b):"
    eos = Tokenizer.from_dir(tmp_path).eos_token_ids
    out = greedy_reference(ref, tok.encode(prompt), 30, eos_token_id=eos)
    expected = tok.decode(out, skip_special_tokens=True)
    code = main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-tokens", "30"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"
