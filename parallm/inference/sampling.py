"""Sampling parameters and the batched sampler of the serving engine.

`Sampler` turns one step's logits (B, V) into one token per row, each row with its own
`SamplingParams`. The order is fixed and matches `parallm.generate.sample_next` (the simple
reference path), with penalties and min-p added in front of and after it:

1. penalties (repetition as HF / vLLM, presence and frequency as OpenAI),
2. greedy rows (temperature 0) take the argmax of the penalised logits,
3. temperature, then top-k, top-p and min-p truncation,
4. one draw per row from that row's `torch.Generator` (exponential race, see `_draw`), so a seeded
   request gives the same tokens whatever else shares its batch.

Log-probabilities, when asked for, are by default "raw": the log-softmax of the logits the model
produced, before penalties, temperature and truncation (vLLM's default `raw_logprobs`). They
describe the model rather than the sampling recipe, and they stay finite for tokens truncation
removed. With `logprobs_mode="processed"` they are the log-softmax after penalties and
temperature, still before truncation (vLLM's `processed_logprobs`): log_softmax(logits / T), what
an RL trainer (TRL's GRPO) scores the policy with; greedy rows give the penalised log-softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

import torch
import torch.nn.functional as F

from parallm.errors import UserError

MAX_LOGPROBS = 20  # as OpenAI: top_logprobs is at most 20
LOGPROBS_MODES = ("raw", "processed")  # see the module docstring


def _fail(name: str, value: Any, valid: str) -> None:
    raise UserError(f"{name}: {value!r} is not valid; {valid}")


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    # bool is an int subclass, but `max_tokens=True` is a mistake, never a count.
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(name, value, "must be an integer")
    if value < low or (high is not None and value > high):
        _fail(name, value, f"must be >= {low}" if high is None else f"must be in [{low}, {high}]")


def _check_float(name: str, value: Any, valid: str, ok: Callable[[float], bool]) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        _fail(name, value, "must be a number")
    if not math.isfinite(value) or not ok(value):
        _fail(name, value, valid)


# float field -> (what is valid, the test); NaN and inf are rejected for all of them.
_FLOAT_RULES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "temperature": ("must be >= 0 (0 is greedy)", lambda v: v >= 0),
    "top_p": ("must be in (0, 1] (1 turns it off)", lambda v: 0 < v <= 1),
    "min_p": ("must be in [0, 1] (0 turns it off)", lambda v: 0 <= v <= 1),
    "repetition_penalty": ("must be > 0 (1 turns it off)", lambda v: v > 0),
    "presence_penalty": ("must be in [-2, 2]", lambda v: -2 <= v <= 2),
    "frequency_penalty": ("must be in [-2, 2]", lambda v: -2 <= v <= 2),
}


@dataclass(kw_only=True)
class SamplingParams:
    """How one request samples. Invalid values raise `UserError` naming the field.

    temperature 0 is greedy; top_k 0 or -1, top_p 1 and min_p 0 turn truncation off.
    `logprobs` / `prompt_logprobs`: how many top log-probabilities (0..20) to return per
    generated / prompt token (the chosen token's own log-probability is always included).
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1)
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("top_k", self.top_k, low=-1)
        for name, (valid, ok) in _FLOAT_RULES.items():
            _check_float(name, getattr(self, name), valid, ok)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**64 - 1)
        # OpenAI accepts one stop string as well as a list of them.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            _fail("stop", self.stop, "must be a list of non-empty strings")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, list | tuple):
            _fail("stop_token_ids", self.stop_token_ids, "must be a list of token ids")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0)
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=0, high=MAX_LOGPROBS)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SequenceTokens(Protocol):
    """What the sampler reads of a sequence: its prompt and the tokens generated so far."""

    @property
    def prompt_token_ids(self) -> Sequence[int]: ...

    @property
    def generated_ids(self) -> Sequence[int]: ...


class TokenLogprobs(TypedDict):
    """Log-probabilities at one position: the chosen token's, its 1-based rank among all tokens,
    and the `top` N (token id -> log-probability, highest first)."""

    token_id: int
    logprob: float
    rank: int
    top: dict[int, float]


@dataclass
class SampleOutput:
    """One token per row; `logprobs[i]` is None for rows that did not ask for them, and the
    list itself is None when no row did."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from a request's seed, on the logits' device; None for no seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def compute_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, top_n: Sequence[int]
) -> list[TokenLogprobs]:
    """Per row of `logprobs` (R, V) (a log-softmax): the entry of `token_ids` (R,) and the
    `top_n[r]` most likely tokens. Also serves prompt log-probabilities."""
    chosen = logprobs.gather(1, token_ids[:, None])  # (R, 1)
    # Rank as vLLM and OpenAI count it: 1 + the number of strictly more likely tokens.
    ranks = (logprobs > chosen).sum(dim=1) + 1
    k = min(max(top_n, default=0), logprobs.shape[1])
    top_vals, top_ids = logprobs.topk(k, dim=1)  # (R, k), highest first
    # One host transfer per tensor, not one per element.
    rows = zip(
        token_ids.tolist(),
        chosen[:, 0].tolist(),
        ranks.tolist(),
        top_ids.tolist(),
        top_vals.tolist(),
        top_n,
        strict=True,
    )
    return [
        TokenLogprobs(token_id=t, logprob=lp, rank=r, top=dict(zip(ids[:n], vals[:n], strict=True)))
        for t, lp, r, ids, vals, n in rows
    ]


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[SequenceTokens]
) -> torch.Tensor:
    """Penalised copy of `logits` (B, V) (or `logits` itself when no row has a penalty).

    Repetition (HF / vLLM): every token seen in the prompt or the output has a positive logit
    divided by the penalty and a negative one multiplied by it. Presence and frequency (OpenAI),
    over generated tokens only: logit -= presence * (count > 0) + frequency * count.
    """
    B, V = logits.shape
    device = logits.device
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1]
    occ = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if rep:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        rows, cols = _scatter_index(
            rep,
            [[*histories[i].prompt_token_ids, *histories[i].generated_ids] for i in rep],
            device,
        )
        seen[rows, cols] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if occ:
        counts = torch.zeros(B, V, dtype=logits.dtype, device=device)
        rows, cols = _scatter_index(occ, [list(histories[i].generated_ids) for i in occ], device)
        counts.index_put_((rows, cols), torch.ones_like(cols, dtype=logits.dtype), accumulate=True)
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        logits = logits - presence * (counts > 0) - frequency * counts
    return logits


def _scatter_index(
    rows: list[int], tokens: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every token of every listed row, as two flat tensors."""
    lengths = torch.tensor([len(t) for t in tokens], device=device)
    row_idx = torch.tensor(rows, device=device).repeat_interleave(lengths)
    col_idx = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=device)
    return row_idx, col_idx


def truncate(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p, then min-p remove; per-row parameters (R,).

    top_k <= 0, top_p 1 and min_p 0 leave a row alone. Semantics as `generate.sample_next`:
    top-k keeps every token tied with the k-th; top-p keeps a token while the more likely tokens
    (of the top-k distribution) sum below top_p, so the most likely token always stays. min-p
    keeps tokens with probability >= min_p * the highest probability.
    """
    V = logits.shape[1]
    use_k, use_p = top_k > 0, top_p < 1
    if bool((use_k | use_p).any()):
        sorted_logits, order = logits.sort(dim=1, descending=True)  # (R, V)
        k = torch.where(use_k, top_k.clamp(max=V), V)
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # (R, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        probs = sorted_logits.softmax(dim=1)
        # Rows with top_p 1 must drop nothing, even where rounding takes the sum past 1.
        drop_sorted = ((probs.cumsum(dim=1) - probs) >= top_p[:, None]) & use_p[:, None]
        drop_sorted |= sorted_logits == float("-inf")
        drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if bool((min_p > 0).any()):
        # The ratio p_i / p_max does not change when truncation renormalises, so the probabilities
        # of what top-k / top-p kept give the same mask as the full distribution would.
        probs = logits.softmax(dim=1)
        keep = probs >= min_p[:, None] * probs.max(dim=1, keepdim=True).values
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


# `_draw` searches the cumulative weights in two levels: sums of blocks of this many tokens,
# then within the chosen block. A flat cumulative sum over the vocabulary is one sequential pass
# per row (64 x 16k: ~1 ms on the development CPU); the block sums vectorise.
DRAW_BLOCK = 128


def _draw(weights: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `weights` (R, V) (>= 0, finite, any scale: probabilities or their
    unnormalised exponentials) by inverse transform sampling: the first token whose cumulative
    weight exceeds u * total, u ~ U[0, 1), picks token i with probability w_i / total.
    One uniform per row: seeded rows draw theirs from their own generator (so a row's draw does
    not depend on its batch), the others from the default one. (The exponential race, argmax of
    p_i / q_i with q_i ~ Exp(1), needs V random numbers per row: on a CPU with a 16k vocabulary
    that cost more than the model's attention.)"""
    R, V = weights.shape
    device = weights.device
    u = torch.rand(R, device=device)  # unseeded rows keep these
    for r, g in enumerate(generators):
        if g is not None:
            u[r] = torch.rand((), generator=g, device=g.device).to(device)
    # float32 is enough: each token's share of the running sum is off by one rounding at most,
    # and a token of weight 0 leaves the sum unchanged, so it is never picked.
    w = weights.float()
    pad = -V % DRAW_BLOCK
    blocks = (F.pad(w, (0, pad)) if pad else w).view(R, -1, DRAW_BLOCK)  # (R, V / block, block)
    block_sums = blocks.sum(dim=2)
    running = block_sums.cumsum(dim=1)  # (R, V / block)
    target = (u * running[:, -1])[:, None]
    block = torch.searchsorted(running, target, right=True).clamp_(max=blocks.shape[1] - 1)
    rows = torch.arange(R, device=device)
    before = running.gather(1, block) - block_sums.gather(1, block)  # (R, 1)
    within = blocks[rows, block[:, 0]].cumsum(dim=1) + before  # (R, block)
    offset = torch.searchsorted(within, target, right=True).clamp_(max=DRAW_BLOCK - 1)
    picked = (block * DRAW_BLOCK + offset)[:, 0].clamp_(max=V - 1)
    # Where u * total rounded up to the total (or a block's sums disagree with the running sum
    # by a rounding), the search can end on a token of weight 0: take the last token of weight
    # > 0 at or before it, or the first one after.
    bad = w.gather(1, picked[:, None])[:, 0] == 0
    if bool(bad.any()):
        index = torch.arange(V, device=device)
        nonzero = w[bad] > 0
        at_or_before = torch.where(nonzero & (index <= picked[bad, None]), index, -1).amax(dim=1)
        first = torch.where(nonzero, index, V).amin(dim=1)
        picked[bad] = torch.where(at_or_before >= 0, at_or_before, first)
    return picked


class Sampler:
    """Logits (B, V) of one step -> one token per row, each row with its own parameters.
    `logprobs_mode`: one of `LOGPROBS_MODES` (see the module docstring)."""

    def __init__(self, logprobs_mode: str = "raw") -> None:
        assert logprobs_mode in LOGPROBS_MODES, logprobs_mode  # EngineConfig checks user input
        self.logprobs_mode = logprobs_mode
        self._buffer = torch.empty(0)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped as `like`, in memory reused from call to call."""
        buf = self._buffer
        if buf.numel() < like.numel() or buf.dtype != like.dtype or buf.device != like.device:
            self._buffer = buf = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buf[: like.numel()].view(like.shape)

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: Sequence[SequenceTokens],
        generators: Sequence[torch.Generator | None],
    ) -> SampleOutput:
        B, V = logits.shape
        assert len(params) == len(histories) == len(generators) == B, "one entry per row"
        logits = logits.float()
        device = logits.device
        penalised = apply_penalties(logits, params, histories)
        # What the log-probabilities are taken of: the raw logits, or (processed) the penalised
        # ones, scaled by temperature below in the sampled rows.
        processed = self.logprobs_mode == "processed"
        scored = penalised if processed else logits
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(rows) < B:
            token_ids = penalised.argmax(dim=1)  # the greedy rows' answer; sampled rows overwrite
        else:
            token_ids = torch.empty(B, dtype=torch.long, device=device)
        if rows:
            idx = torch.tensor(rows, device=device)
            sub = penalised[idx] if len(rows) < B else penalised  # (R, V)
            temps = [params[i].temperature for i in rows]
            # Subtracting the row max first keeps tiny temperatures from overflowing to inf - inf.
            # Into a buffer kept across steps, then in place: on a CPU each fresh tensor of a
            # few MB costs its page faults (34 x 16k rows: 18.6 ms a call with four, 2 with none).
            sub = torch.sub(sub, sub.amax(dim=1, keepdim=True), out=self._scratch(sub))
            if any(t != 1 for t in temps):
                sub.div_(torch.tensor(temps, device=device)[:, None])
            if processed and any(p.logprobs is not None for p in params):
                scored = penalised.index_copy(0, idx, sub)  # a shift leaves log_softmax alone
            sub = truncate(
                sub,
                torch.tensor([params[i].top_k for i in rows], device=device),
                torch.tensor([params[i].top_p for i in rows], device=device),
                torch.tensor([params[i].min_p for i in rows], device=device),
            )
            # The row max is 0 (the most likely token survives truncation): exp() <= 1, and
            # `_draw` needs no normalised probabilities.
            token_ids[idx] = _draw(sub.exp_(), [generators[i] for i in rows])
        return SampleOutput(token_ids.tolist(), self._logprobs(scored, token_ids, params))

    @staticmethod
    def _logprobs(
        scored: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[TokenLogprobs | None] | None:
        """The log-probabilities of the rows that asked for them, from `scored` (B, V): the
        logits of the `logprobs_mode`."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return None
        idx = torch.tensor(rows, device=scored.device)
        found = compute_logprobs(
            scored[idx].log_softmax(dim=1), token_ids[idx], [params[i].logprobs for i in rows]
        )
        out: list[TokenLogprobs | None] = [None] * len(params)
        for i, lp in zip(rows, found, strict=True):
            out[i] = lp
        return out
