"""The simple reference generation path: one prompt, a contiguous KV cache, greedy or sampled.

The high-throughput engine (paged KV cache, continuous batching) is a separate piece; this path
stays small so that it can serve as the reference the engine is checked against. It takes the
engine's `SamplingParams` (one vocabulary), of which it implements the basic fields.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields

import torch
from torch import nn

from parallm.errors import UserError
from parallm.inference.sampling import SamplingParams
from parallm.models.attention import AttentionInputs, sdpa
from parallm.models.registry import ModelFacts, family_of_model

# The fields the reference path implements; anything else needs the engine (`parallm.LLM`).
_SUPPORTED = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids"}


def _check_supported(params: SamplingParams) -> None:
    default = SamplingParams()
    for f in fields(SamplingParams):
        if f.name not in _SUPPORTED and getattr(params, f.name) != getattr(default, f.name):
            raise UserError(
                f"{f.name}: not supported by the reference generate(); it implements "
                f"{', '.join(sorted(_SUPPORTED))}. Use parallm.LLM for the rest"
            )


class KVCache:
    """Contiguous per-layer KV cache for the simple generation path (one sequence per row).

    All rows advance together: a call with T new tokens writes cache slots [len, len + T).
    """

    def __init__(self, facts: ModelFacts, batch: int, max_len: int, *, dtype, device) -> None:
        shape = (batch, max_len, facts.n_kv_heads, facts.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(facts.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(facts.n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens cached so far (the same for every layer after a full forward)

    def __call__(self, q, k, v, *, layer_idx, attn: AttentionInputs):
        assert attn.spec.causal and not attn.spec.documents, "a KV cache serves causal attention"
        positions = attn.positions
        start, end = positions[0, 0].item(), positions[0, -1].item() + 1
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; position {end - 1} is past it")
        self.k[layer_idx][:, start:end] = k
        self.v[layer_idx][:, start:end] = v
        self.length = end
        k_all, v_all = self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]
        k_pos = torch.arange(end, device=q.device).expand(q.shape[0], end)
        if start == 0 and attn.is_causal_in_order(end):
            return sdpa(q, k_all, v_all, None)
        return sdpa(q, k_all, v_all, attn.mask(k_pos))


def sample_next(
    logits: torch.Tensor, opts: SamplingParams, generator: torch.Generator | None
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
    model: nn.Module,
    prompt_ids: Sequence[int],
    opts: SamplingParams,
    *,
    stop_token_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield generated token ids one at a time; stops after a stop token (which is yielded).
    Stop tokens are `stop_token_ids` and `opts.stop_token_ids`."""
    _check_supported(opts)
    if not prompt_ids:
        raise UserError("prompt is empty: give at least one token")
    facts = family_of_model(model).facts(model.args)
    vocab = facts.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    total = len(prompt_ids) + opts.max_tokens
    if total > facts.max_seq_len:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({opts.max_tokens}) = {total} exceeds "
            f"the model's context of {facts.max_seq_len} tokens"
        )
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cache = KVCache(facts, 1, total, dtype=dtype, device=device)
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    tokens = torch.tensor([list(prompt_ids)], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    stops = set(stop_token_ids) | set(opts.stop_token_ids)
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
    model: nn.Module,
    prompt_ids: Sequence[int],
    opts: SamplingParams,
    *,
    stop_token_ids: Sequence[int] = (),
) -> list[int]:
    """The generated token ids (without the prompt)."""
    return list(generate_tokens(model, prompt_ids, opts, stop_token_ids=stop_token_ids))
