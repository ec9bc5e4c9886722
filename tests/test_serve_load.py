"""The server with API keys: 401s, exact usage records, rpm / tpm limits, a full queue, a failed
engine, and a bounded load test (200 concurrent streams, 30% of them leaving mid-stream)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import openai
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from parallm.inference.engine import EngineConfig, LLMEngine
from parallm.serve.app import ServerState, build_app
from parallm.serve.async_engine import AsyncEngine
from parallm.serve.keystore import KeyStore
from parallm.testing.timeouts import scaled
from tests.pg_helpers import postgres_url
from tests.serve_helpers import running_server, save_chat_model
from tests.test_serve import MODEL, wait_idle


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_keys") / "model"
    save_chat_model(d)
    return d


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    """(server URL, key database path)."""
    db = tmp_path_factory.mktemp("keys") / "keys.db"
    KeyStore(str(db)).close()  # the schema, before the server opens it
    with running_server(model_dir, "--db", str(db), "--served-model-name", MODEL) as url:
        yield url, db


def new_key(db, name: str, **limits) -> tuple[str, str]:
    with KeyStore(str(db)) as store:
        info, secret = store.create(name, **limits)
    return info.id, secret


@pytest.fixture(scope="module")
def keyed_postgresql(model_dir):
    """(server URL, key database URL) of a server whose keys are in PostgreSQL."""
    with postgres_url() as db:
        if db is None:
            pytest.skip("no PostgreSQL: install Debian's postgresql (.ci/run does)")
        KeyStore(db).close()
        with running_server(model_dir, "--db", db, "--served-model-name", MODEL) as url:
            yield url, db


def usage_rows(db, key_id: str) -> dict[str, tuple[int, int]]:
    """The usage table's rows of `key_id`, read straight from the database (a path or a URL)."""
    engine = sa.create_engine(str(db) if "://" in str(db) else f"sqlite:///{db}")
    query = sa.text(
        "SELECT request_id, prompt_tokens, completion_tokens FROM api_usage WHERE key_id = :k"
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(query, {"k": key_id}).fetchall()
    finally:
        engine.dispose()
    return {r[0]: (r[1], r[2]) for r in rows}


def wait_rows(db, key_id: str, count: int, timeout: float = 30) -> dict[str, tuple[int, int]]:
    deadline = time.monotonic() + scaled(timeout)
    while len(rows := usage_rows(db, key_id)) < count:
        assert time.monotonic() < deadline, f"{len(rows)} of {count} usage rows"
        time.sleep(0.1)
    return rows


@pytest.mark.parametrize("server", ["keyed", "keyed_postgresql"])
def test_keys_are_required_and_usage_is_exact(server, request):
    url, db = request.getfixturevalue(server)
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="pk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(url + "/health").status_code == 200  # no key needed
    key_id, secret = new_key(db, "exact")
    client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
    a = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=4)
    b = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    rows = wait_rows(db, key_id, 2)
    assert rows[a.id] == (a.usage.prompt_tokens, a.usage.completion_tokens)
    assert rows[b.id] == (b.usage.prompt_tokens, b.usage.completion_tokens)
    with KeyStore(str(db)) as store:
        (summary,) = store.usage(key_id=key_id)
        assert summary.requests == 2
        assert summary.total_tokens == a.usage.total_tokens + b.usage.total_tokens
        store.revoke(key_id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.models.list()


def test_rpm_and_tpm_limits_answer_429(keyed):
    url, db = keyed
    _, secret = new_key(db, "rpm", rpm=2)
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    statuses = [httpx.post(url + "/v1/completions", json=body, headers=headers) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert 0 < int(statuses[2].headers["Retry-After"]) <= 60
    assert statuses[2].json()["error"]["code"] == "rate_limit_exceeded"

    _, secret = new_key(db, "tpm", tpm=40)
    headers = {"Authorization": f"Bearer {secret}"}
    ok = {"model": MODEL, "prompt": [3] * 10, "max_tokens": 20}  # reserves 30, uses 30
    assert httpx.post(url + "/v1/completions", json=ok, headers=headers).status_code == 200
    r = httpx.post(url + "/v1/completions", json=ok, headers=headers)
    assert r.status_code == 429 and "Retry-After" in r.headers
    huge = {"model": MODEL, "prompt": "x", "max_tokens": 100}  # over the whole limit
    r = httpx.post(url + "/v1/completions", json=huge, headers=headers)
    # It could never fit the key's tpm: a 400 naming the limit, not a 429 to retry.
    assert r.status_code == 400 and "tokens per minute" in r.json()["error"]["message"]


def test_load_with_disconnects(keyed):
    """200 concurrent streams, 60 of which leave after two chunks: no 5xx, all KV blocks back,
    each usage record equal to the tokens streamed to the client."""
    url, db = keyed
    key_id, secret = new_key(db, "load")
    rng = random.Random(0)
    jobs = []
    for i in range(200):
        prompt = [rng.randrange(3, 270) for _ in range(rng.randint(4, 40))]
        leave = i % 10 < 3
        # Those who leave ask for 4x more (32-96 tokens), so that whether they leave before
        # their last token does not hang on how fast this machine streams 8-24 tokens.
        jobs.append((prompt, rng.randint(8, 24) * (4 if leave else 1), leave))

    async def one(client: httpx.AsyncClient, prompt, max_tokens, leave) -> dict:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "logprobs": 0,  # each chunk names its tokens: the client counts what it received
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        seen = {"status": None, "tokens": 0, "usage": None, "done": False, "id": None}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            seen["status"] = r.status_code
            if r.status_code != 200:
                return seen
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    seen["done"] = True
                    break
                chunk = json.loads(line[6:])
                seen["id"] = chunk["id"]
                if chunk.get("usage"):
                    seen["usage"] = chunk["usage"]
                for c in chunk["choices"]:
                    seen["tokens"] += len(c["logprobs"]["tokens"])
                chunks += 1
                if leave and chunks == 2:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(
            base_url=url, headers=headers, limits=limits, timeout=scaled(300)
        ) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    results = asyncio.run(run())
    assert [r["status"] for r in results] == [200] * 200
    wait_idle(url)
    rows = wait_rows(db, key_id, 200)
    cut_short = 0
    for (prompt, max_tokens, leave), seen in zip(jobs, results, strict=True):
        recorded_prompt, recorded = rows[seen["id"]]
        assert recorded_prompt == len(prompt)
        if leave:
            assert not seen["done"] and 1 <= seen["tokens"] <= recorded <= max_tokens
            cut_short += recorded < max_tokens
        else:
            assert seen["done"] and seen["tokens"] == recorded == max_tokens
            assert seen["usage"]["completion_tokens"] == recorded
    assert cut_short > 30  # most who left were aborted before their last token
    print(f"{cut_short} of 60 streams left were aborted before their last token")


def test_full_queue_answers_429(model_dir):
    args = ("--no-auth", "--served-model-name", MODEL, "--max-num-seqs", "1", "--max-waiting", "1")
    with running_server(model_dir, *args) as url:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 300, "ignore_eos": True}

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=scaled(120)) as client:
                return await asyncio.gather(
                    *(client.post("/v1/completions", json=body) for _ in range(4))
                )

        answers = asyncio.run(run())
        codes = sorted(r.status_code for r in answers)
        assert codes.count(200) in (1, 2) and codes.count(429) == 4 - codes.count(200)
        for r in answers:
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["usage"]["completion_tokens"] == 300
        wait_idle(url)


def test_a_failed_engine_is_reported_not_hidden(model_dir):
    engine = LLMEngine(model_dir, EngineConfig())

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    state = ServerState(
        engine=AsyncEngine(engine, max_waiting=8),
        model_name=MODEL,
        keystore=None,
        max_body_bytes=1 << 20,
    )
    with TestClient(build_app(state)) as client:
        assert client.get("/health").status_code == 200
        engine.step = broken_step
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and "illegal memory access" in r.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "illegal memory access" in health.text
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "y"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
