"""The serving engine's greedy tokens equal `transformers`' greedy `generate` on the same weights.

Ten prompts of 1 to 200 tokens with different `max_tokens`, some sharing long prefixes, run as
one continuous batch: with prefix caching and chunked prefill on and off, and with a KV cache so
small that sequences are preempted and recomputed.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import greedy_reference, save_hf_model_with_tokenizer

from parallm.inference.engine import EngineConfig, LLMEngine
from parallm.inference.llm import LLM
from parallm.inference.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

LENGTHS = [1, 5, 17, 40, 64, 99, 128, 150, 200, 33]
MAX_TOKENS = [12, 3, 20, 7, 16, 1, 9, 14, 5, 11]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    ref, tok = save_hf_model_with_tokenizer("mistral", d)  # sliding window 7 too
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, tok.vocab_size, (130,), generator=g).tolist()
    prompts = []
    for i, n in enumerate(LENGTHS):
        if i in (6, 7):  # long prompts sharing a 130-token prefix with each other
            prompts.append((shared + torch.randint(3, 200, (n,), generator=g).tolist())[:n])
        else:
            prompts.append(torch.randint(3, tok.vocab_size, (n,), generator=g).tolist())
    expected = [greedy_reference(ref, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    return d, prompts, expected


@pytest.mark.parametrize(
    "prefix, chunked, kv_blocks",
    [(True, True, None), (False, False, None), (True, True, 32), (False, True, 32)],
    ids=["prefix+chunked", "plain", "preempt+prefix", "preempt"],
)
def test_greedy_equals_transformers(model_dir, prefix, chunked, kv_blocks):
    d, prompts, expected = model_dir
    engine = LLMEngine(
        d,
        EngineConfig(
            block_size=8,
            max_num_batched_tokens=64 if chunked else 256,
            enable_prefix_caching=prefix,
            enable_chunked_prefill=chunked,
            kv_cache_memory=None if kv_blocks is None else _bytes_for_blocks(d, kv_blocks, 8),
        ),
    )
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), prompt, p)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                got[out.request_id] = out.outputs[0].token_ids
                assert out.outputs[0].finish_reason == "length"
    assert [got[str(i)] for i in range(len(prompts))] == expected
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == engine.runner.pool.num_blocks  # every block back in the pool
    if prefix and kv_blocks is None:
        assert bm.prefix_hits > 0
    if kv_blocks is not None:  # 32 blocks of 8 hold a quarter of the batch: preemption happened
        assert engine.scheduler.num_preemptions > 0


def _bytes_for_blocks(d, blocks: int, block_size: int) -> int:
    import parallm
    from parallm.inference.paged_attention import KVPool

    args = parallm.models.hf.read_args(d)
    return blocks * KVPool.bytes_per_block(args, block_size, args.n_kv_heads, torch.float32)


def test_llm_api_text_seeds_and_bad_requests(model_dir):
    d, prompts, _ = model_dir
    llm = LLM(d, dtype="float32")
    sampled = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=3, n=2)
    outs = llm.generate(
        ["def add(a, b):", prompts[2], [], [10**6]],
        [sampled, SamplingParams(max_tokens=4, temperature=0), sampled, sampled],
    )
    assert (
        len(outs[0].outputs) == 2 and outs[0].outputs[0].token_ids != outs[0].outputs[1].token_ids
    )
    assert outs[0].outputs[0].text == llm.tokenizer.decode(
        outs[0].outputs[0].token_ids, skip_special_tokens=True
    )
    assert outs[2].error and "empty" in outs[2].error
    assert outs[3].error and "outside the vocabulary" in outs[3].error
    again = llm.generate("def add(a, b):", sampled)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in outs[0].outputs]
    too_long = llm.generate([list(range(3, 200)) * 3], SamplingParams(max_tokens=4))[0]
    assert too_long.error is not None and "591" in too_long.error  # never silently truncated
    assert too_long.outputs[0].token_ids == []


def test_stop_strings_logprobs_abort_and_length_errors(model_dir):
    d, prompts, _ = model_dir
    engine = LLMEngine(d, EngineConfig(block_size=8))
    free = engine.scheduler.block_manager.num_free_blocks
    # Greedy text of one prompt, then a stop string taken from the middle of it.
    engine.add_request(
        "full", prompts[3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    )
    full = engine.run_to_completion()["full"].outputs[0]
    text = full.text
    assert len(text) > 6, text
    stop = text[3:6]
    engine.add_request(
        "stop",
        prompts[3],
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]),
    )
    engine.add_request(
        "lp", prompts[3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    )
    engine.add_request("gone", prompts[5], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("long", prompts[0], SamplingParams(max_tokens=10_000))
    first = {o.request_id: o for o in engine.step() if o.finished}  # errors come back at once
    engine.abort_request("gone")
    outs = {**first, **engine.run_to_completion()}
    stopped = outs["stop"].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]
    assert outs["gone"].outputs[0].finish_reason == "abort"
    assert outs["long"].error and "10000" in outs["long"].error.replace(",", "")
    lp = outs["lp"].outputs[0]
    model = engine.model
    with torch.no_grad():
        ref = model(torch.tensor([prompts[3] + lp.token_ids]))[0].float().log_softmax(-1)
    n = len(prompts[3])
    for i, entry in enumerate(lp.logprobs):
        token = lp.token_ids[i]
        assert entry["token_id"] == token
        assert entry["logprob"] == pytest.approx(ref[n - 1 + i, token].item(), abs=1e-4)
        assert len(entry["top"]) == 2
    assert engine.scheduler.block_manager.num_free_blocks == free


def test_bench_infer_writes_its_report_into_a_new_directory(tmp_path, capsys):
    """`bench infer --model DIR --out NEW` once ran the whole workload, then failed to save its
    report because nothing had created NEW."""
    import json

    from parallm.cli import main
    from tests.hf_models import save_hf_model_with_tokenizer

    save_hf_model_with_tokenizer("llama3", tmp_path / "model")
    out = tmp_path / "new" / "report-dir"
    argv = ["bench", "infer", "--model", str(tmp_path / "model"), "--num-requests", "2"]
    argv += ["--input-len", "4", "--output-len", "3", "--no-hf", "--rounds", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_requests"] == 2 and report["parallm"]["seconds"] > 0
