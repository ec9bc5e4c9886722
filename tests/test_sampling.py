"""The batched sampler: parameter validation, truncation supports, penalties, seeds, logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from parallm.errors import UserError
from parallm.inference.sampling import (
    Sampler,
    SamplingParams,
    _draw,
    apply_penalties,
    make_generator,
)


@dataclass
class Hist:
    prompt_token_ids: list[int] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)


def _sample(logits, params, histories=None, generators=None):
    B = logits.shape[0]
    histories = histories or [Hist() for _ in range(B)]
    generators = generators or [None] * B
    return Sampler()(logits, params, histories, generators)


# -- validation --------------------------------------------------------------------------------

BAD = [
    ("n", 0),
    ("n", 1.5),
    ("n", True),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", True),
    ("max_tokens", "16"),
    ("temperature", -0.1),
    ("temperature", "1.0"),
    ("temperature", True),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 5.0),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("presence_penalty", -math.inf),
    ("frequency_penalty", -3),
    ("frequency_penalty", math.nan),
    ("seed", -1),
    ("seed", 1.0),
    ("seed", True),
    ("seed", 2**64),
    ("stop", [""]),
    ("stop", [1]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["2"]),
    ("stop_token_ids", 2),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("prompt_logprobs", 21),
    ("ignore_eos", "yes"),
    ("skip_special_tokens", 1),
    ("include_stop_str_in_output", None),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_invalid_params_name_the_field(name, value):
    with pytest.raises(UserError) as err:
        SamplingParams(**{name: value})
    message = str(err.value)
    assert message.startswith(f"{name}: "), message
    assert "must" in message  # says what would be valid


def test_valid_params():
    SamplingParams()
    p = SamplingParams(temperature=0, top_k=-1, seed=2**64 - 1, stop="END", logprobs=20, min_p=1)
    assert p.greedy and p.stop == ["END"]
    assert not SamplingParams(temperature=0.7).greedy
    with pytest.raises(TypeError):  # keyword-only
        SamplingParams(1)  # type: ignore[misc]


# -- greedy and temperature ----------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    gens = [make_generator(s, "cpu") for s in range(8)]
    out = _sample(logits, [SamplingParams(temperature=0)] * 8, generators=gens)
    assert out.token_ids == logits.argmax(dim=1).tolist()
    assert out.logprobs is None


def test_temperature_zero_vs_positive():
    logits = torch.tensor([[1.0, 0.9, 0.8, 0.7]]).repeat(2000, 1)
    torch.manual_seed(0)
    greedy = _sample(logits, [SamplingParams(temperature=0)] * 2000).token_ids
    hot = _sample(logits, [SamplingParams(temperature=1.0)] * 2000).token_ids
    assert set(greedy) == {0}
    assert set(hot) == {0, 1, 2, 3}
    # A tiny temperature is greedy in the limit and must not overflow into NaN.
    cold = _sample(logits, [SamplingParams(temperature=1e-30)] * 2000).token_ids
    assert set(cold) == {0}


def test_mixed_batch_rows_keep_their_own_params():
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.5, top_p=0.01),
    ]
    assert _sample(logits, params).token_ids == [1, 2, 0]


# -- truncation ------------------------------------------------------------------------------------

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


@pytest.mark.parametrize(
    ("params", "support"),
    [
        pytest.param(SamplingParams(top_k=2), [0, 1], id="top_k=2"),
        pytest.param(SamplingParams(top_k=-1), [0, 1, 2, 3, 4, 5], id="top_k=-1"),
        # Cumulative probability before each token: 0, .4, .65, .8 -> keep while below .75.
        pytest.param(SamplingParams(top_p=0.75), [0, 1, 2], id="top_p=.75"),
        pytest.param(SamplingParams(top_p=0.3), [0], id="top_p=.3"),
        # min_p .3 keeps probabilities >= .12.
        pytest.param(SamplingParams(min_p=0.3), [0, 1, 2], id="min_p=.3"),
        # top-k 4 renormalises to .4/.9 ...; top-p .5 then keeps 0 (0) and 1 (.44 < .5).
        pytest.param(SamplingParams(top_k=4, top_p=0.5), [0, 1], id="top_k=4,top_p=.5"),
        pytest.param(SamplingParams(top_k=5, min_p=0.5), [0, 1], id="top_k=5,min_p=.5"),
        # Temperature 2 flattens the distribution before truncation: min_p .5 keeps p_i/p_0 >= .5
        # i.e. sqrt(q_i/q_0) >= .5, q_i >= .1 -> tokens 0..3.
        pytest.param(SamplingParams(temperature=2.0, min_p=0.5), [0, 1, 2, 3], id="t=2,min_p=.5"),
    ],
)
def test_truncation_support_and_frequencies(params, support):
    n = 6000
    logits = PROBS.log().repeat(n, 1)
    torch.manual_seed(1)
    tokens = torch.tensor(_sample(logits, [params] * n).token_ids)
    assert sorted(set(tokens.tolist())) == support
    # Frequencies follow the renormalised (tempered) distribution over the kept tokens.
    tempered = (PROBS.log() / params.temperature).softmax(0)[support]
    expected = tempered / tempered.sum()
    freq = torch.bincount(tokens, minlength=6)[support].float() / n
    assert torch.allclose(freq, expected, atol=0.025), (freq, expected)


def test_seeded_rows_truncate_exactly_too():
    # Seeded rows draw from their own generators (a different code path from unseeded rows).
    n = 500
    logits = PROBS.log().repeat(n, 1)
    gens = [make_generator(s, "cpu") for s in range(n)]
    tokens = _sample(logits, [SamplingParams(top_k=3, seed=0)] * n, generators=gens).token_ids
    assert set(tokens) == {0, 1, 2}


# -- penalties -------------------------------------------------------------------------------------


def test_penalties_match_hand_computation():
    row = [2.0, -1.0, 0.5, -0.5, 0.0, 3.0]
    logits = torch.tensor([row] * 4)
    hist = Hist(prompt_token_ids=[0, 1], generated_ids=[2, 2, 1])
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
    ]
    got = apply_penalties(logits, params, [hist] * 4)
    # Repetition over prompt + output {0, 1, 2}: 2/2, -1*2, .5/2.
    rep = [1.0, -2.0, 0.25, -0.5, 0.0, 3.0]
    # Presence / frequency over output only, counts {2: 2, 1: 1}:
    # token 1: -(.5 + .25 * 1) = -.75; token 2: -(.5 + .25 * 2) = -1.
    occ = [2.0, -1.75, -0.5, -0.5, 0.0, 3.0]
    both = [1.0, -2.75, -0.75, -0.5, 0.0, 3.0]
    expected = torch.tensor([rep, occ, both, row])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits, torch.tensor([row] * 4))  # the input is not modified


def test_negative_penalties_and_greedy_after_penalties():
    # A negative presence penalty encourages repeats; greedy takes the argmax after penalties.
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 1.5], [0.5, 0.4, 0.0]])
    params = [
        SamplingParams(temperature=0, frequency_penalty=1.0),
        SamplingParams(temperature=0, presence_penalty=-2.0),
        SamplingParams(temperature=0, repetition_penalty=1.5),
    ]
    hists = [Hist(generated_ids=[0]), Hist(generated_ids=[2]), Hist(prompt_token_ids=[0])]
    assert _sample(logits, params, hists).token_ids == [1, 2, 1]


# -- seeds -----------------------------------------------------------------------------------------


def _run_seeded(seed: int, position: int, batch: int, steps: int = 20) -> list[int]:
    """Tokens of one seeded request that sits at `position` among other (varying) rows."""
    g = torch.Generator().manual_seed(123)
    mine = torch.randn(steps, 64, generator=g)  # the request's logits at each step
    noise = torch.Generator().manual_seed(1000 + batch)  # the neighbours differ per batch
    gens = [make_generator(1000 + position * 7 + r, "cpu") if r % 2 else None for r in range(batch)]
    gens[position] = make_generator(seed, "cpu")
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=5 + r) for r in range(batch)]
    params[position] = SamplingParams(temperature=1.2, top_k=40, seed=seed)
    hists = [Hist([1, 2], []) for _ in range(batch)]
    out = []
    for step in range(steps):
        logits = torch.randn(batch, 64, generator=noise) * 3
        logits[position] = mine[step]
        out.append(_sample(logits, params, hists, gens).token_ids[position])
        hists[position].generated_ids.append(out[-1])
    return out


def test_same_seed_same_tokens_in_any_batch():
    a = _run_seeded(seed=42, position=0, batch=3)
    b = _run_seeded(seed=42, position=4, batch=6)
    c = _run_seeded(seed=42, position=0, batch=1)
    assert a == b == c
    assert a != _run_seeded(seed=43, position=0, batch=3)


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(7, "cpu"), make_generator(7, torch.device("cpu"))
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


# -- logprobs --------------------------------------------------------------------------------------


def test_logprobs_are_raw_top_n_sorted():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)) * 2
    params = [
        SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.3, top_k=3),
        SamplingParams(),
        SamplingParams(logprobs=0, temperature=0),
    ]
    hists = [Hist([1, 2, 3], [4]), Hist(), Hist()]
    out = _sample(logits, params, hists, [make_generator(0, "cpu"), None, None])
    raw = logits.log_softmax(dim=1)
    assert out.logprobs is not None and out.logprobs[1] is None
    first, third = out.logprobs[0], out.logprobs[2]
    assert first is not None and third is not None
    assert first["token_id"] == out.token_ids[0]
    assert list(first["top"]) == raw[0].topk(5).indices.tolist()
    values = list(first["top"].values())
    assert values == sorted(values, reverse=True)
    for token, lp in first["top"].items():
        assert lp == pytest.approx(raw[0, token].item(), abs=1e-6)
    assert first["logprob"] == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-6)
    assert first["rank"] == int((raw[0] > raw[0, out.token_ids[0]]).sum()) + 1
    # logprobs=0: the chosen token only; greedy takes the top token, rank 1.
    assert third["top"] == {} and third["rank"] == 1
    assert third["logprob"] == pytest.approx(raw[2].max().item(), abs=1e-6)


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    """Inverse-CDF draws: zero-probability tokens (first, between and last) are never picked,
    the others at their frequency; seeded rows repeat with their seed."""
    probs = torch.tensor([0.0, 0.2, 0.0, 0.0, 0.5, 0.3, 0.0])
    n = 8000
    torch.manual_seed(3)
    tokens = _draw(probs.repeat(n, 1), [None] * n)
    freq = torch.bincount(tokens, minlength=7).float() / n
    assert set(tokens.tolist()) == {1, 4, 5}
    assert torch.allclose(freq, probs, atol=0.02), freq
    gens = [make_generator(s, "cpu") for s in range(200)]
    seeded = _draw(probs.repeat(200, 1), gens)
    again = _draw(probs.repeat(200, 1), [make_generator(s, "cpu") for s in range(200)])
    assert seeded.tolist() == again.tolist() and set(seeded.tolist()) <= {1, 4, 5}
    # A row whose only token is the last one, and one whose only token is the first.
    one_hot = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert _draw(one_hot, [None, None]).tolist() == [2, 0]


def test_two_level_draw_equals_a_flat_inverse_cdf_search():
    """Across block boundaries and a vocabulary that is no multiple of the block: the token
    `_draw` picks (from unnormalised weights) is the one a flat float64 search picks for the
    same seeded uniform."""
    torch.manual_seed(0)
    weights = torch.rand(300, 1000) ** 8  # peaked rows
    weights[:, 500:700] = 0  # whole blocks of zeros
    seeds = range(300)
    picked = _draw(weights, [make_generator(s, "cpu") for s in seeds])
    u = torch.stack([torch.rand((), generator=make_generator(s, "cpu")) for s in seeds]).double()
    cdf = weights.double().cumsum(dim=1)
    flat = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    assert picked.tolist() == flat.tolist()
    assert not bool(((picked >= 500) & (picked < 700)).any())
