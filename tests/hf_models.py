"""Tiny random `transformers` models of each supported architecture, saved as HF directories.

Test-only: `transformers` is the reference, never a run-time dependency of parallm.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (transformers config class name, extra config fields)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=8, rms_norm_eps=1e-5)),
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0)),
    "llama31": (
        "LlamaConfig",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama32_tied": ("LlamaConfig", dict(tie_word_embeddings=True, head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=7)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, attention_bias=False)),
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A transformers model of variant `name` with random weights (biases and norms non-trivial);
    `overrides` replace config fields (e.g. vocab_size to fit a tokenizer)."""
    import transformers

    cls_name, extra = VARIANTS[name]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    return model.eval()


def save_hf_model(name: str, path: Path, seed: int = 0, **overrides):
    model = make_hf_model(name, seed, **overrides)
    model.save_pretrained(path)
    return model


CODE_TEXTS = ["def add(a, b):\n    return a + b\n", "for x in items:\n    print(x)\n"] * 10


def save_hf_model_with_tokenizer(name: str, path: Path, seed: int = 0):
    """A random `transformers` model of `name` saved with a byte-level BPE tokenizer whose
    vocabulary is the model's; returns (model, tokenizer)."""
    from parallm.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(iter(CODE_TEXTS), vocab_size=280)
    ref = save_hf_model(name, path, seed, vocab_size=tok.vocab_size)
    tok.save(path)
    return ref, tok


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    """`transformers` greedy `generate` for one prompt: the generated ids only."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()
