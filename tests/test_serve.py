"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client, raw
HTTP and curl: outputs against `transformers` on the same weights, streaming against
non-streaming, errors, metrics, disconnects."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest
import torch

from parallm.testing.timeouts import scaled
from tests.hf_models import greedy_reference
from tests.serve_helpers import running_server, save_chat_model

MODEL = "tiny"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "model"
    ref, tok = save_chat_model(d)
    return d, ref, tok


@pytest.fixture(scope="module")
def server(model):
    with running_server(model[0], "--no-auth", "--served-model-name", MODEL) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str) -> float:
    """One unlabelled-or-single-series sample of /metrics."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_idle(url: str, timeout: float = 20) -> None:
    """Until nothing runs or waits and every KV block is back in the pool."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        running = metric(url, "parallm_num_requests_running")
        waiting = metric(url, "parallm_num_requests_waiting")
        free = metric(url, "parallm_kv_cache_free_blocks")
        total = metric(url, "parallm_kv_cache_blocks")
        if running == waiting == 0 and free == total:
            return
        assert time.monotonic() < deadline, (running, waiting, free, total)
        time.sleep(0.1)


PROMPTS = [[5, 17, 42], [9] * 30, list(range(3, 60)), [100]]


def test_models_and_health(client, server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completions_equal_transformers_greedy(client, model):
    _, ref, tok = model
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPTS,
        max_tokens=9,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for prompt, choice in zip(PROMPTS, out.choices, strict=True):
        expected = greedy_reference(ref, prompt, 9)
        assert choice.text == tok.decode(expected, skip_special_tokens=True)
        assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == sum(len(p) for p in PROMPTS)
    assert out.usage.completion_tokens == 9 * len(PROMPTS)


def test_chat_equals_transformers_and_stream_equals_whole(client, model):
    _, ref, tok = model
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f"}]
    whole = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    prompt = tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )
    expected = tok.decode(greedy_reference(ref, prompt, 12), skip_special_tokens=True)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == 12

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


SAMPLED = dict(
    model=MODEL,
    prompt="def add(a, b):",
    max_tokens=10,
    temperature=1.0,
    seed=7,
    n=2,
    extra_body={"ignore_eos": True},
)


def test_async_streaming_completions_with_n_and_seed(server):
    async def run() -> tuple[list[str], list[str], str]:
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0)

        async def sampled() -> list[str]:
            stream = await client.completions.create(**SAMPLED, stream=True)
            texts = ["", ""]
            async for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] += c.text
            return texts

        first, second = await asyncio.gather(sampled(), sampled())
        whole = await client.completions.create(**SAMPLED)
        await client.close()
        return first, second, [c.text for c in whole.choices]

    first, second, whole = asyncio.run(run())
    assert first == second == whole  # same seed, same samples, streamed or not
    assert first[0] != first[1]  # sample i uses seed + i


def test_echo_logprobs_are_the_models_prompt_logprobs(client, model):
    """What evaluation harnesses use for log-likelihood: echo + logprobs, max_tokens 0 or 1."""
    _, ref, tok = model
    prompt = [1, 40, 41, 77, 120, 3, 9]
    for max_tokens in (0, 1):
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0
        )
        lp = out.choices[0].logprobs
        with torch.no_grad():
            logits = ref(torch.tensor([prompt])).logits[0].log_softmax(-1)
        expected = [None] + [logits[i - 1, t].item() for i, t in enumerate(prompt) if i > 0]
        got = lp.token_logprobs[: len(prompt)]
        assert got[0] is None
        assert got[1:] == pytest.approx(expected[1:], abs=1e-4)
        assert lp.tokens[: len(prompt)] == [tok.decode([t]) for t in prompt]
        assert len(lp.top_logprobs[1]) >= 2
        assert out.choices[0].text.startswith(tok.decode(prompt))
        assert len(lp.tokens) == len(prompt) + max_tokens
        assert out.usage.completion_tokens == max_tokens


def test_curl_sse_framing(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps(
        {"model": MODEL, "prompt": "for x in", "max_tokens": 6, "stream": True, "temperature": 0}
    )
    out = subprocess.run(
        [
            "curl",
            "-sN",
            "-i",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            server + "/v1/completions",
        ],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=True,
    ).stdout
    head, _, events = out.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/event-stream" in head.lower()
    frames = events.strip("\n").split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


BAD = [
    # (body or raw bytes, status, param, words in the message)
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens", "-3"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens", "max_model_len"),
    ({"model": MODEL, "prompt": [7] * 600, "max_tokens": 1}, 400, "prompt", "600 tokens"),
    ({"model": MODEL, "prompt": [7, 99999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    ({"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n", ">= 1"),
    ({"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs", "[0, 20]"),
    ({"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus", "unknown field"),
    ({"model": MODEL}, 400, "prompt", "required"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    (b'{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
]


@pytest.mark.parametrize("body,status,param,words", BAD)
def test_bad_requests_get_openai_errors(server, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server + "/v1/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err


def test_more_bad_input(server, client):
    chat = {"model": MODEL, "messages": []}
    r = httpx.post(server + "/v1/chat/completions", json=chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "for x " * 400}]}
    r = httpx.post(server + "/v1/chat/completions", json=long_chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "max_model_len=512" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", content=b"x" * (9 << 20))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    # ... and the server still serves.
    assert (
        client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens
        >= 1
    )


def test_metrics_count_exactly(server, client):
    names = ["parallm_prompt_tokens_total", "parallm_generation_tokens_total"]
    before = [metric(server, n) for n in names]
    count = metric(server, "parallm_time_to_first_token_seconds_count")
    out = client.completions.create(
        model=MODEL, prompt=[[3, 4, 5], [6, 7]], max_tokens=5, extra_body={"ignore_eos": True}
    )
    after = [metric(server, n) for n in names]
    assert after[0] - before[0] == out.usage.prompt_tokens == 5
    assert after[1] - before[1] == out.usage.completion_tokens == 10
    assert metric(server, "parallm_time_to_first_token_seconds_count") == count + 2
    text = httpx.get(server + "/metrics").text
    for name in (
        "parallm_kv_cache_usage_perc",
        "parallm_prefix_cache_hit_rate",
        "parallm_time_per_output_token_seconds_bucket",
        "parallm_e2e_request_latency_seconds_sum",
    ):
        assert name in text


def test_prefix_cache_hits_are_counted(server, client):
    prompt = list(range(10, 90))  # five full blocks of 16
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    hits = metric(server, "parallm_prefix_cache_hits_tokens")
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert metric(server, "parallm_prefix_cache_hits_tokens") - hits == 64  # 4 blocks; the last
    # block is recomputed so the request has a token to compute
    assert 0 < metric(server, "parallm_prefix_cache_hit_rate") < 1


def test_disconnect_aborts_and_frees_blocks(server):
    wait_idle(server)
    generated = metric(server, "parallm_generation_tokens_total")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "stream": True, "extra_body": None}
    body = {k: v for k, v in body.items() if v is not None} | {"ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=scaled(60)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got == 3:
                break
    wait_idle(server)  # aborted at a next step: nothing runs, every block is free again
    sent = metric(server, "parallm_generation_tokens_total") - generated
    assert 3 <= sent < 400


def test_chat_logprobs_and_stop(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "for x"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 8
    for item in content:
        assert len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    text = out.choices[0].message.content
    stop = text[2:4]
    cut = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "for x"}],
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_tensor_parallel_server_equals_transformers(model):
    d, ref, tok = model
    with running_server(
        d, "--no-auth", "--served-model-name", MODEL, "--tensor-parallel-size", "2"
    ) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[:2],
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    for prompt, choice in zip(PROMPTS[:2], out.choices, strict=True):
        assert choice.text == tok.decode(greedy_reference(ref, prompt, 6), skip_special_tokens=True)


def test_sse_event_survives_readers_that_split_lines_like_str_splitlines():
    """httpx's `aiter_lines` (and other SSE clients) break lines where `str.splitlines` does, at
    U+0085, U+2028 and U+2029 too, which JSON leaves unescaped: a token decoding to one of them
    once cut a streamed chunk in two."""
    from parallm.serve.jobs import sse

    text = "a\u2028b\x85c\u2029d\ne\r\u00e9"
    lines = [line for line in sse({"text": text}).splitlines() if line]
    assert len(lines) == 1
    assert json.loads(lines[0].removeprefix("data: "))["text"] == text
