"""The simple reference generation path: one prompt, a contiguous KV cache, greedy or sampled.

The high-throughput engine (paged KV cache, continuous batching) is a separate piece; this path
stays small so that it can serve as the reference the engine is checked against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from parallm.errors import UserError
from parallm.models.llama.model import KVCache, Transformer


@dataclass(kw_only=True)
class SamplingOptions:
    """How to pick each next token. temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


def sample_next(
    logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,)."""
    if opts.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / opts.temperature
    if opts.top_k > 0:
        kth = torch.topk(logits, min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; keep at least one.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= opts.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: Sequence[int],
    opts: SamplingOptions,
    *,
    stop_token_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield generated token ids one at a time; stops after a stop token (which is yielded)."""
    if not prompt_ids:
        raise UserError("prompt is empty: give at least one token")
    vocab = model.args.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    total = len(prompt_ids) + opts.max_tokens
    if total > model.args.max_seq_len:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({opts.max_tokens}) = {total} exceeds "
            f"the model's context of {model.args.max_seq_len} tokens"
        )
    device = model.inv_freq.device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.args, 1, total, dtype=dtype, device=device)
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    tokens = torch.tensor([list(prompt_ids)], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    stops = set(stop_token_ids)
    for _ in range(opts.max_tokens):
        logits = model(tokens, positions, backend=cache)[:, -1]
        nxt = sample_next(logits, opts, generator)
        token = int(nxt.item())
        yield token
        if token in stops:
            return
        tokens = nxt[:, None]
        positions = positions[:, -1:] + 1


def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    opts: SamplingOptions,
    *,
    stop_token_ids: Sequence[int] = (),
) -> list[int]:
    """The generated token ids (without the prompt)."""
    return list(generate_tokens(model, prompt_ids, opts, stop_token_ids=stop_token_ids))
