"""The engine in its own process (`parallm.serve.engine_process`): outputs rebuilt from deltas
equal the engine's own, step by step; over the pipe, the same tokens as the engine in this
process; aborts free the KV cache; calls return values and user errors; a full queue, a load
error, a killed engine and a closed pipe are met as the server needs."""

from __future__ import annotations

import asyncio
import copy
import os
import pickle
import signal
import time
from functools import partial
from operator import attrgetter

import pytest

from parallm.errors import UserError
from parallm.inference.config import EngineConfig
from parallm.inference.engine import CompletionOutput, LLMEngine, RequestOutput
from parallm.inference.sampling import SamplingParams
from parallm.serve.admin import _remove_lora
from parallm.serve.async_engine import EngineDeadError, QueueFullError
from parallm.serve.engine_process import EngineProcess, OutputAssembler, OutputDeltas
from parallm.testing.timeouts import scaled
from tests.serve_helpers import save_chat_model

CONFIG = EngineConfig(dtype="float32", max_num_batched_tokens=64, kv_cache_memory=4 << 20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_process") / "model"
    save_chat_model(d)
    return d


def test_outputs_rebuilt_from_deltas_equal_the_engines_step_by_step(model_dir):
    """Every step's outputs (n = 2, sampled, token and prompt log-probabilities, a stop string,
    an error) rebuilt on the other side of a pickle equal the engine's, field by field."""
    engine = LLMEngine(model_dir, CONFIG)
    engine.add_request(
        "a",
        "the quick brown fox",
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, logprobs=2, prompt_logprobs=1),
    )
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=9, stop=["e"], temperature=0))
    engine.add_request("c", [5, 6, 7], SamplingParams(max_tokens=10**6))  # finishes with an error
    deltas, assembler = OutputDeltas(), OutputAssembler()
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            expected = copy.deepcopy(out)  # the engine's token lists grow in place
            got = assembler.apply(pickle.loads(pickle.dumps(deltas.encode(out))))
            assert got == expected
        steps += 1
    assert steps > 5
    assert not deltas.sent and not assembler.live  # nothing kept of finished requests


def test_text_that_does_not_extend_the_last_is_sent_whole():
    deltas, assembler = OutputDeltas(), OutputAssembler()
    for text, finished in (("ab", False), ("abc", False), ("xy", True)):
        out = RequestOutput("r", None, [1], [CompletionOutput(0, text, [1], None)], finished)
        assert assembler.apply(deltas.encode(out)).outputs[0].text == text


def _collect(engine, request_id, prompt, params):
    async def run():
        last = None
        async for out in engine.generate(request_id, prompt, params):
            last = out
        return last

    return run()


async def _until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def test_engine_process_serves_like_the_engine_in_this_process(model_dir):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 42], list(range(3, 40)), "hello there, how are you"]
    local = LLMEngine(model_dir, CONFIG)
    for i, p in enumerate(prompts):
        local.add_request(str(i), p, greedy)
    expected = {rid: out.outputs[0] for rid, out in local.run_to_completion().items()}

    ep = EngineProcess(str(model_dir), CONFIG, threads=1, max_waiting=4)
    ep.spawn()
    ep.wait_loaded()
    assert ep.engine.max_model_len == local.max_model_len
    assert ep.engine.check_request("hello", greedy) == local.check_request("hello", greedy)
    with pytest.raises(UserError) as e:
        ep.engine.check_request([5], SamplingParams(max_tokens=10**6))
    assert e.value.param == "max_tokens"
    os.kill(ep._process.pid, signal.SIGTERM)  # ignored: the server drains first, then stops it

    async def main():
        ep.start()
        outs = await asyncio.gather(
            *(_collect(ep, str(i), p, greedy) for i, p in enumerate(prompts))
        )
        for i, out in enumerate(outs):
            assert out.finished and out.outputs[0].token_ids == expected[str(i)].token_ids
            assert out.outputs[0].text == expected[str(i)].text
        # A client that leaves mid-stream: its request is aborted and its blocks come back.
        long = SamplingParams(max_tokens=local.max_model_len - 20, ignore_eos=True)
        stream = ep.generate("long", [9] * 20, long)
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        assert not out.finished
        await stream.aclose()
        await _until(
            lambda: (
                ep.stats.running == ep.stats.waiting == 0
                and ep.stats.kv_blocks_free == ep.stats.kv_blocks_total
            ),
            "the aborted request's blocks came back",
        )
        assert ep.stats.kv_blocks_total > 0
        # Calls run where the engine is: a value, and a user's error with its field.
        assert await ep.call(attrgetter("max_model_len")) == local.max_model_len
        with pytest.raises(UserError) as e:
            await ep.call(partial(_remove_lora, name="nope"))
        assert e.value.param == "name"
        with pytest.raises(QueueFullError):
            ep.add([(f"q{i}", [5], greedy, None) for i in range(5)], asyncio.Queue())
        # The engine process killed: open streams, new requests and calls all fail as dead.
        stream = ep.generate("doomed", [9] * 20, long)
        assert not (await stream.__anext__()).finished
        os.kill(ep._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not ep.healthy and "exited" in ep.error
        with pytest.raises(EngineDeadError):
            ep.add([("late", [5], greedy, None)], asyncio.Queue())
        with pytest.raises(EngineDeadError):
            await ep.call(attrgetter("max_model_len"))

    try:
        asyncio.run(main())
    finally:
        ep.stop()


def test_a_load_error_is_the_engines_user_error(model_dir):
    ep = EngineProcess(
        str(model_dir), EngineConfig(dtype="float32", max_model_len=10**7), max_waiting=4
    )
    ep.spawn()
    with pytest.raises(UserError, match="^max_model_len: 10000000 exceeds"):
        ep.wait_loaded()
    assert ep._process is None  # ended


def test_the_engine_process_ends_when_the_server_is_gone(model_dir):
    ep = EngineProcess(str(model_dir), CONFIG, threads=1, max_waiting=4)
    ep.spawn()
    ep.wait_loaded()
    process = ep._process
    ep._conn.close()  # as the server's exit closes it
    process.join(scaled(60))
    assert process.exitcode == 0
