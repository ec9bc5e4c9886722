"""`SamplingParams.prompt_logprobs` in the serving engine equals a full forward of the model.

Every prompt token but the first gets its log-probability given the tokens before it (the raw
log-softmax, float32) with its rank and the top N, within 1e-5 of `model(prompt)`: over chunked
prefill, past a prefix cache that holds the prompt's prefix, through preemptions that recompute
a half-prefilled prompt, for `n` > 1, and with tensor parallelism on 2 CPU processes.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import save_hf_model

from parallm.inference.engine import EngineConfig, LLMEngine, RequestOutput
from parallm.inference.paged_attention import KVPool
from parallm.inference.sampling import SamplingParams
from parallm.models.hf import load_pretrained, read_args
from parallm.tokenizer import train_bpe_tokenizer

pytest.importorskip("transformers")

TOL = 1e-5
BLOCK = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompt_logprobs")
    texts = ["def add(a, b):\n    return a + b\n", "for x in items:\n    print(x)\n"] * 10
    tok = train_bpe_tokenizer(iter(texts), vocab_size=280)
    save_hf_model("mistral", d, vocab_size=tok.vocab_size)  # sliding window 7 too
    tok.save(d)
    return d


def _prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 280, (n,), generator=g).tolist() for n in lengths]


def _engine(d, *, kv_blocks: int | None = None, **kw) -> LLMEngine:
    kv = None
    if kv_blocks is not None:
        args = read_args(d)
        kv = kv_blocks * KVPool.bytes_per_block(args, BLOCK, args.n_kv_heads, torch.float32)
    return LLMEngine(d, EngineConfig(block_size=BLOCK, dtype="float32", kv_cache_memory=kv, **kw))


def _params(top_n: int, **kw) -> SamplingParams:
    return SamplingParams(**{"prompt_logprobs": top_n, "max_tokens": 4, "ignore_eos": True, **kw})


def _run(engine: LLMEngine) -> dict[str, RequestOutput]:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out
    return done


def _check(model, prompt: list[int], got: list | None, top_n: int) -> None:
    """`got` against the log-softmax of a full forward of `prompt`."""
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].float().log_softmax(-1)  # (P, V)
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        entry, row, token = got[i], ref[i - 1], prompt[i]
        assert entry["token_id"] == token
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=TOL)
        # Rank: 1 + the tokens more likely; a near-tie within the tolerance may go either way.
        assert (
            (row > row[token] + TOL).sum() + 1
            <= entry["rank"]
            <= (row > row[token] - TOL).sum() + 1
        )
        top = entry["top"]
        assert len(top) == top_n
        vals = list(top.values())
        assert vals == sorted(vals, reverse=True)
        assert vals == pytest.approx(row.topk(top_n).values.tolist(), abs=TOL)
        for t, lp in top.items():
            assert lp == pytest.approx(row[t].item(), abs=TOL)


def test_chunked_prefill_top_n_and_n(model_dir):
    """Prompts over many 16-token steps, top 0 / 1 / 5 / 20, a 1-token prompt, and n = 3."""
    engine = _engine(model_dir, max_num_batched_tokens=16)
    prompts = _prompts(150, 37, 1, 90, 8)
    tops = [5, 0, 3, 20, 1]
    for i, (p, k) in enumerate(zip(prompts, tops, strict=True)):
        engine.add_request(str(i), p, _params(k, n=3 if i == 3 else 1))
    engine.add_request("plain", prompts[0], SamplingParams(max_tokens=2))
    outs = _run(engine)
    for i, (p, k) in enumerate(zip(prompts, tops, strict=True)):
        _check(engine.model, p, outs[str(i)].prompt_logprobs, k)
    assert len(outs["3"].outputs) == 3
    assert outs["2"].prompt_logprobs == [None]
    assert outs["plain"].prompt_logprobs is None
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.pool.num_blocks


def test_prefix_cache_hit_is_not_taken(model_dir):
    """A request sharing a cached 64-token prefix still gets every prompt token scored; it
    publishes its own blocks, which a later plain request reuses."""
    engine = _engine(model_dir, max_num_batched_tokens=32, enable_prefix_caching=True)
    shared, a, b = _prompts(64, 20, 30, seed=1)
    bm = engine.scheduler.block_manager
    engine.add_request("warm", shared + a, SamplingParams(max_tokens=2))
    _run(engine)
    hits = bm.prefix_hits
    assert hits == 0
    engine.add_request("lp", shared + b, _params(4, n=2))
    outs = _run(engine)
    _check(engine.model, shared + b, outs["lp"].prompt_logprobs, 4)
    assert len(outs["lp"].outputs) == 2
    hits = bm.prefix_hits  # the second sample may reuse the cache; the first does not
    engine.add_request("after", shared + b + a, SamplingParams(max_tokens=2))
    _run(engine)
    assert bm.prefix_hits - hits >= len(shared + b) // BLOCK * BLOCK  # "lp" published its blocks


def test_preemption_does_not_duplicate(model_dir):
    """16 blocks of 8: a short prompt decoding 100 tokens outgrows the cache while a 100-token
    prompt is prefilled 3 tokens a step; the latter is preempted half-prefilled, recomputed
    later, and each of its prompt positions is still scored once."""
    engine = _engine(model_dir, kv_blocks=16, max_num_batched_tokens=4)
    short, long = _prompts(10, 100, seed=2)
    mid_prefill = []
    preempt = engine.scheduler._preempt

    def record(seq):
        mid_prefill.append(seq.prompt_logits_from not in (None, 0))
        preempt(seq)

    engine.scheduler._preempt = record
    engine.add_request("short", short, _params(2, max_tokens=100))
    engine.add_request("long", long, _params(2))
    outs = _run(engine)
    assert engine.scheduler.num_preemptions > 0 and any(mid_prefill), mid_prefill
    _check(engine.model, short, outs["short"].prompt_logprobs, 2)
    _check(engine.model, long, outs["long"].prompt_logprobs, 2)


def test_tensor_parallel(model_dir):
    """2 ranks on CPU: the prompt rows travel with the step inputs; same values within 1e-5."""
    engine = _engine(model_dir, max_num_batched_tokens=16, tensor_parallel_size=2)
    try:
        prompts = _prompts(70, 9, seed=3)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, _params(3))
        outs = _run(engine)
    finally:
        engine.close()
    single = load_pretrained(model_dir, dtype="float32").eval()
    for i, p in enumerate(prompts):
        _check(single, p, outs[str(i)].prompt_logprobs, 3)
