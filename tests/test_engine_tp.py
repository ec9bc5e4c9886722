"""The serving engine with tensor parallelism on 2 CPU processes (gloo).

Greedy tokens equal `transformers`' greedy `generate`; seeded sampling equals one process (same
tokens, log-probabilities within 1e-5: the sums of the row-parallel layers run in another
order); a size that does not fit the model is a `UserError` before any process starts; closing
the LLM ends its workers, and so does killing the driver; and under an existing process group of 2 (as torchrun makes) the same
`LLM(...)` call serves from rank 1 without spawning.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_models import greedy_reference, save_hf_model_with_tokenizer

from parallm.errors import UserError
from parallm.inference.llm import LLM
from parallm.inference.sampling import SamplingParams
from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled

LENGTHS = [1, 5, 17, 40, 64, 99, 128, 150, 200, 33]
MAX_TOKENS = [12, 3, 20, 7, 16, 1, 9, 14, 5, 11]
ENGINE = dict(block_size=8, max_num_batched_tokens=64)  # chunked prefill: several step shapes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Qwen3 model (q/k norms over sharded heads; 8 heads, 2 KV heads) and its greedy tokens."""
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("engine_tp")
    ref, tok = save_hf_model_with_tokenizer("qwen3", d)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    expected = [greedy_reference(ref, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    return d, prompts, expected


@pytest.fixture(scope="module")
def llm_tp(model_dir):
    with LLM(model_dir[0], tensor_parallel_size=2, **ENGINE) as llm:
        yield llm


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def test_greedy_equals_transformers(model_dir, llm_tp):
    _, prompts, expected = model_dir
    assert [p.name for p in llm_tp.engine.tp.procs] == ["parallm-tp-worker-1"]
    assert llm_tp.engine.runner.pool.k[0].shape[1] == 1  # this rank caches 1 of the 2 KV heads
    outs = llm_tp.generate(prompts, [_greedy(m) for m in MAX_TOKENS])
    assert all(o.error is None for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == expected
    bm = llm_tp.engine.scheduler.block_manager
    assert bm.num_free_blocks == llm_tp.engine.runner.pool.num_blocks


def test_seeded_sampling_equals_one_process(model_dir, llm_tp):
    d, prompts, _ = model_dir
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=11, n=2, logprobs=3)
    got = llm_tp.generate(prompts[:4], params)
    with LLM(d, **ENGINE) as single:
        want = single.generate(prompts[:4], params)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g.outputs, w.outputs, strict=True):
            assert a.token_ids == b.token_ids
            assert [x["token_id"] for x in a.logprobs] == [x["token_id"] for x in b.logprobs]
            lp_a = torch.tensor([x["logprob"] for x in a.logprobs])
            lp_b = torch.tensor([x["logprob"] for x in b.logprobs])
            torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "size, message",
    [
        (3, "tensor_parallel_size: 3 must divide the model's n_heads=8"),
        (4, "tensor_parallel_size: 4 must divide the model's n_kv_heads=2"),
        (0, "tensor_parallel_size: 0 is not valid"),
    ],
)
def test_bad_size_is_a_user_error(model_dir, size, message):
    before = multiprocessing.active_children()
    with pytest.raises(UserError, match=message):
        LLM(model_dir[0], tensor_parallel_size=size)
    assert multiprocessing.active_children() == before  # refused before starting any worker


def test_close_ends_the_workers(llm_tp):
    """Runs last on the module's LLM (its fixture's close is then a no-op)."""
    procs = llm_tp.engine.tp.procs
    assert all(p.is_alive() for p in procs)
    llm_tp.close()
    assert all(p.exitcode == 0 for p in procs)  # stopped cleanly, not killed
    assert multiprocessing.active_children() == []
    with pytest.raises(RuntimeError, match="closed"):
        llm_tp.generate([5, 6, 7], _greedy(2))


def _in_process_group(rank: int, world_size: int, d, prompts: list[list[int]]):
    with LLM(d, tensor_parallel_size=world_size, **ENGINE) as llm:
        assert multiprocessing.active_children() == []  # the group's ranks serve; none spawned
        if not llm.is_driver:
            return None
        return [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(6))]


def test_existing_process_group_is_reused(model_dir, tmp_path):
    d, prompts, expected = model_dir
    pick = [0, 2, 3]  # max_tokens >= 6, so greedy's first 6 tokens are known
    got = run_distributed(
        _in_process_group, 2, tmp_path, d, [prompts[i] for i in pick], timeout_s=scaled(120)
    )
    assert got == [[expected[i][:6] for i in pick], None]


DRIVER = """
import os, signal, sys
from parallm.inference.llm import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2)
print(*(p.pid for p in llm.engine.tp.procs), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: the workers are on their own
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait for a reaper in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_exit_when_the_driver_dies(model_dir):
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(model_dir[0])], capture_output=True, text=True
    )
    assert run.returncode == -9, run.stderr
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 1
    deadline = time.monotonic() + scaled(30)
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:  # do not leave an orphan behind a failed test
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived their killed driver"
