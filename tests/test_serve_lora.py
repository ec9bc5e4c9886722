"""`parallm serve --lora NAME=DIR`, live on loopback: a request's `model` picks the base or an
adapter, concurrent requests for the base and two adapters each get `peft`'s greedy text,
/v1/models lists the adapters under the base, usage and metrics are per adapter, admin keys
load and unload adapters while the server runs (others get 401 / 403), and bad adapters or
`--lora` values are one line and exit 2 before the server starts. The key store's admin scope
reaches databases made before it existed.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import nullcontext

import httpx
import openai
import pytest
import sqlalchemy as sa
from lora_helpers import save_peft_adapter

from parallm.serve.keystore import KeyStore, format_keys
from parallm.testing.timeouts import scaled
from tests.hf_models import greedy_reference, save_hf_model
from tests.pg_helpers import postgres_url
from tests.serve_helpers import free_port, running_server, save_chat_model

pytest.importorskip("peft")

MODEL = "tiny"
PROMPT = [5, 17, 42, 9, 100, 7]
MAX_TOKENS = 8
PATIENCE_S = 300  # how long to wait for what the server does after answering (usage rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_lora")
    ref, tok = save_chat_model(d / "base")
    peft_models = {name: save_peft_adapter(d / "base", d / name, name) for name in ("sql", "poet")}
    expected = {MODEL: _text(tok, ref, PROMPT, MAX_TOKENS)}
    for name, model in peft_models.items():
        expected[name] = _text(tok, model, PROMPT, MAX_TOKENS)
    assert len(set(expected.values())) == 3  # the adapters change the text
    return d, tok, peft_models, expected


def _text(tok, model, prompt: list[int], max_tokens: int) -> str:
    """The text the server sends for `transformers`' (or `peft`'s) greedy tokens."""
    return tok.decode(greedy_reference(model, prompt, max_tokens), skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    d = setup[0]
    db = tmp_path_factory.mktemp("keys") / "keys.db"
    with KeyStore(str(db)) as store:
        user = store.create("user")
        admin = store.create("admin", admin=True)
    args = ["--db", str(db), "--served-model-name", MODEL, "--max-loras", "3"]
    args += ["--max-lora-rank", "8", "--lora", f"sql={d / 'sql'}", "--lora", f"poet={d / 'poet'}"]
    with running_server(d / "base", *args) as url:
        yield url, db, user, admin


def _client(url: str, key: tuple) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key[1], max_retries=0)


def _complete(client: openai.OpenAI, model: str, max_tokens: int = MAX_TOKENS):
    return client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )


def test_models_lists_the_adapters_under_the_base(server, setup):
    url, _, user, _ = server
    d = setup[0]
    cards = {m["id"]: m for m in _client(url, user).models.list().model_dump()["data"]}
    assert list(cards) == [MODEL, "sql", "poet"]
    assert cards[MODEL]["parent"] is None
    assert cards["sql"]["parent"] == MODEL and cards["sql"]["root"] == str((d / "sql").resolve())
    assert _client(url, user).models.retrieve("poet").id == "poet"


def test_concurrent_requests_for_the_base_and_two_adapters(server, setup):
    url, _, user, _ = server
    _, tok, peft_models, expected = setup

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=user[1], max_retries=0)
        kw = dict(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        outs = await asyncio.gather(
            *(
                client.completions.create(model=m, **kw, extra_body={"ignore_eos": True})
                for m in [MODEL, "sql", "poet"] * 3
            )
        )
        await client.close()
        return outs

    for out in asyncio.run(run()):
        assert out.choices[0].text == expected[out.model], out.model
    messages = [{"role": "user", "content": "def f"}]
    chat = _client(url, user).chat.completions.create(
        model="poet",
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    prompt = tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )
    want = _text(tok, peft_models["poet"], prompt, 6)
    assert chat.model == "poet" and chat.choices[0].message.content == want


def test_unknown_model_is_404(server):
    url, _, user, _ = server
    with pytest.raises(openai.NotFoundError) as e:
        _complete(_client(url, user), "sq1")
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'tiny', 'sql', 'poet'" in err["message"]


def _metric(url: str, name: str, model: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'{name}{{model_name="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_usage_and_metrics_are_per_adapter(server, capsys):
    from parallm.cli import main

    url, db, _, _ = server
    with KeyStore(str(db)) as store:
        key = store.create("metered")
    client = _client(url, key)
    before = {m: _metric(url, "parallm_generation_tokens_total", m) for m in (MODEL, "sql")}
    for model in ("sql", "sql", MODEL):
        assert _complete(client, model).usage.completion_tokens == MAX_TOKENS
    for model, count in ((MODEL, 1), ("sql", 2)):
        got = _metric(url, "parallm_generation_tokens_total", model) - before[model]
        assert got == count * MAX_TOKENS
    deadline = time.monotonic() + scaled(PATIENCE_S)
    with KeyStore(str(db)) as store:
        while sum(s.requests for s in store.usage(key_id=key[0].id)) < 3:
            assert time.monotonic() < deadline, "usage rows not recorded"
            time.sleep(0.1)
        rows = {s.model: s for s in store.usage(key_id=key[0].id, by_model=True)}
    assert set(rows) == {MODEL, "sql"}
    assert (rows["sql"].requests, rows["sql"].completion_tokens) == (2, 2 * MAX_TOKENS)
    assert rows["sql"].prompt_tokens == 2 * len(PROMPT)
    assert (rows[MODEL].requests, rows[MODEL].completion_tokens) == (1, MAX_TOKENS)
    assert main(["keys", "usage", "--by-model", "--db", str(db)]) == 0
    table = capsys.readouterr().out
    assert "MODEL" in table.splitlines()[0]
    assert any("metered" in line and " sql " in line for line in table.splitlines())


def test_admin_keys_load_and_unload_adapters(server, setup):
    url, _, user, admin = server
    d, _, _, expected = setup
    admin_url = url + "/v1/admin/lora_adapters"

    def post(body: dict, key: tuple | None = admin) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key[1]}"} if key else {}
        return httpx.post(admin_url, json=body, headers=headers, timeout=scaled(120))

    def delete(name: str, key: tuple | None = admin) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key[1]}"} if key else {}
        return httpx.delete(f"{admin_url}/{name}", headers=headers, timeout=scaled(120))

    body = {"name": "verse", "path": str(d / "poet")}
    assert post(body, key=None).status_code == 401
    r = post(body, key=user)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert delete("sql", key=user).status_code == 403
    r = post(body)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "verse" and r.json()["parent"] == MODEL
    assert _complete(_client(url, user), "verse").choices[0].text == expected["poet"]
    bad = [
        ({"name": "x", "path": str(d / "nowhere")}, "path", "not a LoRA adapter directory"),
        ({"name": MODEL, "path": str(d / "sql")}, "name", "served model's name"),
        ({"name": "sql", "path": str(d / "sql")}, "name", "loaded already"),
        ({"name": "x", "path": str(d / "sql")}, "max_loras", "all 3 adapter slots"),
        ({"name": "x"}, "path", "required"),
    ]
    for payload, param, needle in bad:
        r = post(payload)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert needle in r.json()["error"]["message"]

    # Unload while a stream through it runs: the stream still gets all of verse's tokens.
    long_tokens = 120
    body = {"model": "verse", "prompt": PROMPT, "max_tokens": long_tokens, "temperature": 0}
    body |= {"stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {user[1]}"}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        r = delete("verse")
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        assert r.json()["in_flight"] in (0, 1)  # 0 if the stream had already ended
        for line in [first, *lines]:
            if line.startswith("data: {"):
                text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
    want = _text(setup[1], setup[2]["poet"], PROMPT, long_tokens)
    assert text == want
    with pytest.raises(openai.NotFoundError):
        _complete(_client(url, user), "verse")
    assert delete("verse").status_code == 404
    r = delete(MODEL)
    assert r.status_code == 400 and "cannot be unloaded" in r.json()["error"]["message"]
    deadline = time.monotonic() + scaled(PATIENCE_S)
    auth = {"Authorization": f"Bearer {admin[1]}"}
    while any(a.get("unloaded") for a in httpx.get(admin_url, headers=auth).json()["data"]):
        assert time.monotonic() < deadline, "the unloaded adapter's slot was never freed"
        time.sleep(0.1)
    # Its slot takes another adapter, whose requests get its own KV blocks.
    assert post({"name": "verse", "path": str(d / "sql")}).status_code == 200
    assert _complete(_client(url, user), "verse").choices[0].text == expected["sql"]
    assert [m.id for m in _client(url, user).models.list().data] == [MODEL, "sql", "poet", "verse"]


def test_admin_endpoints_are_off_without_keys(setup):
    from fastapi.testclient import TestClient

    from parallm.inference.engine import EngineConfig, LLMEngine
    from parallm.serve.app import ServerState, build_app
    from parallm.serve.async_engine import AsyncEngine

    d = setup[0]
    engine = LLMEngine(d / "base", EngineConfig(enable_lora=True, max_lora_rank=8))
    state = ServerState(
        engine=AsyncEngine(engine, max_waiting=8),
        model_name=MODEL,
        keystore=None,
        max_body_bytes=1 << 20,
    )
    with TestClient(build_app(state)) as client:
        r = client.post("/v1/admin/lora_adapters", json={"name": "x", "path": str(d / "sql")})
        assert r.status_code == 403 and "--no-auth" in r.json()["error"]["message"]
        assert client.delete("/v1/admin/lora_adapters/x").status_code == 403
    assert engine.adapters.by_name == {}


def test_bad_lora_options_exit_2_before_the_server_starts(setup, tmp_path, capsys):
    from parallm.cli import main

    d = setup[0]
    save_hf_model("llama3", tmp_path / "other", hidden_size=32)
    save_peft_adapter(tmp_path / "other", tmp_path / "other-adapter", "sql")
    capsys.readouterr()  # transformers' progress bars
    base = ["serve", "--model", str(d / "base"), "--no-auth", "--port", str(free_port())]
    base += ["--served-model-name", MODEL]
    cases = [
        (["--lora", "sql"], "give NAME=DIR"),
        (["--lora", f"{MODEL}={d / 'sql'}"], "served model's name"),
        (["--lora", f"a={d / 'sql'}", "--lora", f"a={d / 'poet'}"], "given twice"),
        (["--lora", f"a={d / 'nowhere'}"], "--lora a:"),
        (["--lora", f"a={tmp_path / 'other-adapter'}"], "--lora a:"),
        (["--lora", f"a={d / 'poet'}", "--max-lora-rank", "4"], "r=8 exceeds max_lora_rank=4"),
        (["--lora", f"a={d / 'sql'}", "--max-loras", "0"], "--max-loras: 0"),
    ]
    for extra, needle in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("parallm: error: ") and "\n" not in err, err
        assert needle in err, (needle, err)


# -- the admin scope in the key store ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_admin_scope_reaches_an_older_key_database(kind, tmp_path):
    with postgres_url() if kind == "postgresql" else nullcontext() as pg:
        if kind == "postgresql" and pg is None:
            pytest.skip(
                "no PostgreSQL server (install postgresql or set PARALLM_TEST_POSTGRES_URL)"
            )
        url = pg or str(tmp_path / "old.db")
        secret = _old_database(url)
        with KeyStore(url) as store:
            old = store.authenticate(secret)
            assert old is not None and not old.admin
            info, admin_secret = store.create("ops", admin=True)
            assert store.authenticate(admin_secret).admin
            assert "admin" in format_keys(store.list())
        with KeyStore(url) as store:  # opening it again finds the column
            assert [k.admin for k in store.list()] == [False, True]


def _old_database(url: str) -> str:
    """A key database as parallm made it before keys had scopes, with one key; its secret."""
    from datetime import UTC, datetime

    from parallm.serve.keystore import KEY_PREFIX, _digest

    engine = sa.create_engine(url if "://" in url else f"sqlite:///{url}")
    meta = sa.MetaData()
    keys = sa.Table(
        "api_keys",
        meta,
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
    )
    meta.create_all(engine)
    secret = KEY_PREFIX + "old-key-secret"
    with engine.begin() as conn:
        conn.execute(
            sa.insert(keys).values(
                id="key_old",
                name="old",
                secret_hash=_digest(secret),
                prefix=secret[:15],
                created_at=datetime(2025, 1, 1, tzinfo=UTC).replace(tzinfo=None),
            )
        )
    engine.dispose()
    return secret
