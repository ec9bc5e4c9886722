"""The server under abuse: a multi-megabyte prompt is tokenized off the event loop (while it is,
/health answers within a second) and text over --max-prompt-chars is refused before tokenizing;
`n` is bounded by --max-n; a request that can never fit its key's limits gets 400 naming the
limit, and every 429 that a retry could pass carries `Retry-After`."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from parallm.cli import main
from parallm.inference.engine import EngineConfig, LLMEngine
from parallm.serve.app import ServerState, build_app
from parallm.serve.async_engine import AsyncEngine
from parallm.serve.keystore import KeyStore
from parallm.testing.timeouts import scaled
from tests.serve_helpers import running_server, save_chat_model

MODEL = "tiny"
CONTEXT = 512  # the test model's max_position_embeddings
HEALTH_BOUND_S = 1.0  # the bound: /health answers within a second under abuse


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("abuse") / "model"
    save_chat_model(d)
    return d


@pytest.fixture(scope="module")
def engine(model_dir):
    llm = LLMEngine(model_dir, EngineConfig())
    yield llm
    llm.close()


def app_client(engine: LLMEngine, keystore: KeyStore | None = None, **bounds) -> TestClient:
    """An in-process server on the shared engine (its thread starts and stops with the client)."""
    state = ServerState(
        engine=AsyncEngine(engine, max_waiting=8),
        model_name=MODEL,
        keystore=keystore,
        max_body_bytes=1 << 20,
        **bounds,
    )
    return TestClient(build_app(state))


def error_of(r: httpx.Response) -> dict:
    return r.json()["error"]


def test_a_multi_megabyte_prompt_never_stalls_health(model_dir):
    """2 MB prompts (a completion and a chat message, one after the other) are tokenized in a
    worker thread: meanwhile every /health answers within a second, and each big request gets
    its 400 naming the context."""
    big = "def f(x):\n    return x + 1\n" * (2_000_000 // 28)  # 2 MB, ~1.3 M tokens
    bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": big, "max_tokens": 4}, "prompt"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": big}], "max_tokens": 4},
            "messages",
        ),
    ]
    args = ("--no-auth", "--served-model-name", MODEL)
    args += ("--max-prompt-chars", "4000000", "--max-body-bytes", str(8 << 20))

    async def abuse(url: str) -> tuple[list[float], list[tuple[httpx.Response, str, int]]]:
        latencies: list[float] = []
        answers = []
        done = asyncio.Event()
        timeout = httpx.Timeout(scaled(300))
        async with (
            httpx.AsyncClient(base_url=url, timeout=timeout) as poller,
            httpx.AsyncClient(base_url=url, timeout=timeout) as sender,
        ):

            async def poll() -> None:
                while not done.is_set():
                    start = time.perf_counter()
                    r = await poller.get("/health")
                    latencies.append(time.perf_counter() - start)
                    assert r.status_code == 200
                    await asyncio.sleep(0.02)

            polling = asyncio.create_task(poll())
            for path, body, param in bodies:
                # Encoded here, before the clock matters: the client's own json.dumps of 3 MB
                # would hold this loop (and the poller) for a while.
                content = json.dumps(body).encode()
                before = len(latencies)
                r = await sender.post(
                    path, content=content, headers={"content-type": "application/json"}
                )
                answers.append((r, param, len(latencies) - before))
            done.set()
            await polling
        return latencies, answers

    with running_server(model_dir, *args) as url:
        latencies, answers = asyncio.run(abuse(url))
    for r, param, polls in answers:
        assert r.status_code == 400, r.text
        err = error_of(r)
        assert err["param"] == param and f"max_model_len={CONTEXT}" in err["message"]
        assert polls >= 3, f"only {polls} /health answers while a big request ran"
    assert max(latencies) < HEALTH_BOUND_S, sorted(latencies)[-5:]


def test_prompt_chars_are_bounded_before_tokenizing(engine):
    over = CONTEXT * 16 + 1  # the default: 16 characters per token of context
    with app_client(engine) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * over})
        assert r.status_code == 400
        err = error_of(r)
        assert err["param"] == "prompt"
        assert f"{over} characters" in err["message"] and "--max-prompt-chars" in err["message"]
        assert f"limit of {CONTEXT * 16}" in err["message"]
        # The second of several prompts is named; the limit is per prompt.
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "x" * over]})
        assert r.status_code == 400 and "prompt 1 has" in error_of(r)["message"]
    with app_client(engine, max_prompt_chars=100) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "y" * 101})
        assert r.status_code == 400 and "limit of 100 (--max-prompt-chars)" in r.text
        messages = [{"role": "user", "content": "z" * 60}, {"role": "user", "content": "z" * 41}]
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert r.status_code == 400 and error_of(r)["param"] == "messages"
        assert "101 characters" in error_of(r)["message"]
        # Under the limit in content, over it once the template has added its markers.
        messages = [{"role": "user", "content": "z" * 90}]
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert r.status_code == 400 and "the rendered prompt has" in error_of(r)["message"]
        r = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "y" * 100, "max_tokens": 2}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_n_and_best_of_are_bounded(engine):
    with app_client(engine, max_n=3) as client:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "n": 4}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400
        assert error_of(r)["param"] == "n"
        assert error_of(r)["message"].startswith("n: 4 is over this server's limit of 3")
        assert "--max-n" in error_of(r)["message"]
        r = client.post("/v1/completions", json={**body, "best_of": 4})
        assert r.status_code == 400 and error_of(r)["param"] == "n"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 9}
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and error_of(r)["param"] == "n" and "--max-n" in r.text
        r = client.post("/v1/completions", json={**body, "n": 3, "best_of": 3})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_a_request_that_can_never_fit_gets_400_and_every_429_a_retry_after(engine, tmp_path):
    db = tmp_path / "keys.db"
    store = KeyStore(str(db))
    _, tpm_secret = store.create("tpm", tpm=40)
    _, rpm_secret = store.create("rpm", rpm=1)
    try:
        with app_client(engine, keystore=store) as client:
            tpm = {"Authorization": f"Bearer {tpm_secret}"}
            # 3 prompt tokens + 2 choices x 20 = 43 > 40: never, so 400 naming the limit.
            never = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 20, "n": 2}
            r = client.post("/v1/completions", json=never, headers=tpm)
            assert r.status_code == 400 and "Retry-After" not in r.headers
            err = error_of(r)
            assert err["param"] == "max_tokens"
            assert (
                "may use 43 tokens" in err["message"] and "40 tokens per minute" in err["message"]
            )
            # Over the context: 400 naming max_model_len, not the key.
            r = client.post(
                "/v1/completions", json={**never, "n": 1, "max_tokens": CONTEXT}, headers=tpm
            )
            assert r.status_code == 400 and f"max_model_len={CONTEXT}" in error_of(r)["message"]
            # 3 + 30 = 33 fits once, not twice in a minute: the second is a 429 to retry.
            fits = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True}
            assert client.post("/v1/completions", json=fits, headers=tpm).status_code == 200
            r = client.post("/v1/completions", json=fits, headers=tpm)
            assert r.status_code == 429 and error_of(r)["code"] == "rate_limit_exceeded"
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            # Without max_tokens a chat answer may use what the window leaves after its prompt
            # (not the whole context, which this key could never pay for): a fresh key, 200.
            _, small_secret = store.create("small", tpm=CONTEXT // 2)
            small = {"Authorization": f"Bearer {small_secret}"}
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            r = client.post(
                "/v1/chat/completions", json={**chat, "ignore_eos": True}, headers=small
            )
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT // 2

            rpm = {"Authorization": f"Bearer {rpm_secret}"}
            one = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            assert client.post("/v1/chat/completions", json=one, headers=rpm).status_code == 200
            r = client.post("/v1/chat/completions", json=one, headers=rpm)
            assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    finally:
        store.close()


@pytest.mark.parametrize(
    ("option", "value", "needles"),
    [
        ("--max-n", "0", ("--max-n: 0", ">= 1")),
        ("--max-prompt-chars", "0", ("--max-prompt-chars: 0", ">= 1")),
        ("--drain-timeout", "-1", ("--drain-timeout: -1", "seconds >= 0")),
        ("--drain-timeout", "nan", ("--drain-timeout: nan", "seconds >= 0")),
    ],
)
def test_the_options_are_checked_before_anything_loads(option, value, needles, capsys):
    assert main(["serve", "--model", "no/such/dir", option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not valid" in err
    for needle in needles:
        assert needle in err, (needle, err)
