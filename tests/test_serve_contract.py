"""The server's contract and audit trail: /openapi.json describes every endpoint (request and
response bodies, errors, the bearer scheme, /metrics as Prometheus text), a schema fuzzer
(schemathesis) against a live server finds no 5xx and no response that breaks the description,
every request gets one access-log line (text or JSON) and an `x-request-id`, /metrics can require
a key, and the chat page sends no key from the server's environment."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lora_helpers import save_peft_adapter

from parallm.cli import main
from parallm.inference.engine import EngineConfig, LLMEngine
from parallm.serve import access_log
from parallm.serve.app import ServerState, build_app
from parallm.serve.async_engine import AsyncEngine
from parallm.serve.drain import DrainGate
from parallm.serve.keystore import KeyStore
from parallm.testing.timeouts import scaled
from tests.serve_helpers import bearer, free_port, save_chat_model, schema_fuzzer
from tests.test_serve_drain import Server

MODEL = "tiny"
CONTEXT = 128
# Requests the fuzzer makes per operation: positive (valid by the schema) and negative cases.
POSITIVE_EXAMPLES = 12
NEGATIVE_EXAMPLES = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("contract")
    save_chat_model(d / "model")
    return d / "model"


class Lines(logging.Handler):
    """The access-log lines written while it is attached."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    handler = Lines()
    access_log.logger.addHandler(handler)
    access_log.logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        access_log.logger.removeHandler(handler)


def make_state(model_dir: Path, keystore: KeyStore | None, **options) -> ServerState:
    # A short context keeps every request the fuzzer gets through short; the chat template
    # alone takes about 80 tokens of this tokenizer.
    config = EngineConfig(max_model_len=CONTEXT, enable_lora=True, max_lora_rank=8)
    engine = LLMEngine(model_dir, config)
    return ServerState(
        engine=AsyncEngine(engine, max_waiting=64),
        model_name=MODEL,
        keystore=keystore,
        max_body_bytes=1 << 20,
        **options,
    )


@contextmanager
def live(app, port: int | None = None) -> Iterator[str]:
    """`app` under uvicorn on a loopback port, in a thread of this process; yields its URL."""
    port = port or free_port()
    # The chat page's event streams end only at their next heartbeat (15 s): not waited for.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="error",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + scaled(60)
        while not server.started:
            assert thread.is_alive(), "the server stopped while starting"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(scaled(60))


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    """A live server with keys and --metrics-auth; yields (url, admin secret, user secret, the
    user key's id, an adapter directory)."""
    d = tmp_path_factory.mktemp("keyed")
    save_peft_adapter(model_dir, d / "adapter", "sql")
    store = KeyStore(str(d / "keys.db"))
    _, admin = store.create("admin", admin=True)
    user_info, user = store.create("user")
    app = build_app(make_state(model_dir, store, metrics_auth=True), log_format="json")
    with live(app) as url:
        yield url, admin, user, user_info.id, d / "adapter"
    store.close()


# -- the description -------------------------------------------------------------------------


def test_openapi_describes_bodies_errors_security_and_metrics(keyed, model_dir):
    url = keyed[0]
    doc = httpx.get(url + "/openapi.json").json()
    paths = doc["paths"]
    schemas = doc["components"]["schemas"]
    bodies = {
        ("/v1/completions", "post"): "CompletionRequest",
        ("/v1/chat/completions", "post"): "ChatCompletionRequest",
        ("/v1/admin/lora_adapters", "post"): "LoraAdapterRequest",
    }
    for (path, method), model in bodies.items():
        body = paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    assert set(schemas["CompletionRequest"]["required"]) == {"model", "prompt"}
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert {"messages", "max_completion_tokens"} <= set(
        schemas["ChatCompletionRequest"]["properties"]
    )

    for path, methods in paths.items():
        for method, op in methods.items():
            assert ("requestBody" in op) == ((path, method) in bodies), (path, method)
            responses = op["responses"]
            assert "422" not in responses  # the server answers 400 for a bad body, never 422
            for status, response in responses.items():
                assert response["headers"]["x-request-id"]["required"] is True
                if status != "200":
                    error = response["content"]["application/json"]["schema"]
                    if path == "/health":  # or {"status": "draining"}
                        error = error["anyOf"][1]
                    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
            keyed_op = path != "/health"  # --metrics-auth: /metrics needs a key here too
            assert ("security" in op) == keyed_op, path
            assert ("401" in responses) == keyed_op, path

    completions = paths["/v1/completions"]["post"]["responses"]
    assert set(completions) == {"200", "400", "401", "404", "413", "429", "503"}
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    event = completions["200"]["content"]["text/event-stream"]["itemSchema"]
    chunk = event["properties"]["data"]["anyOf"][1]["contentSchema"]["anyOf"][0]
    assert chunk == {"$ref": "#/components/schemas/CompletionChunk"}
    assert "Retry-After" in completions["429"]["headers"]
    assert "403" in paths["/v1/admin/lora_adapters"]["post"]["responses"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"} and metrics["text/plain"]["schema"]["type"] == "string"
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"

    # Without keys (--no-auth) nothing needs one, and only the admin endpoints refuse (403).
    state = make_state(model_dir, None)
    open_doc = build_app(state, log_format=None).openapi()
    state.engine.engine.close()
    assert "securitySchemes" not in open_doc["components"]
    for path, methods in open_doc["paths"].items():
        for op in methods.values():
            assert "security" not in op and "401" not in op["responses"], path
    assert "403" in open_doc["paths"]["/v1/admin/lora_adapters"]["get"]["responses"]


# -- the fuzzer -------------------------------------------------------------------------------


def test_schema_fuzzer_finds_no_server_error_and_no_undeclared_response(keyed):
    """Cases generated from /openapi.json (valid and invalid ones) against the live server, plus
    one valid case per answer the description declares (JSON, each stream, the adapter
    endpoints): every response must be declared (status, content type, headers, body schema,
    each event of a stream), no 5xx, invalid bodies refused, and keys enforced where declared."""
    url, admin, _, _, adapter = keyed
    schema, call, statuses = schema_fuzzer(url, admin)

    for case in _valid_cases(schema, str(adapter)):
        call(case)
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [(schemathesis.GenerationMode.POSITIVE, POSITIVE_EXAMPLES)]
        if len(op.body) or len(op.path_parameters):  # something to make invalid
            modes.append((schemathesis.GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES))
        for mode, examples in modes:
            strategy = op.as_strategy(generation_mode=mode)
            if mode is schemathesis.GenerationMode.POSITIVE:
                strategy = st.tuples(strategy, st.booleans()).map(_served_model)

            @given(case=strategy)
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case) -> None:
                call(case)

            fuzz()
    # Every operation answered 200 at least once: each response schema was checked.
    assert {label: 200 in seen for label, seen in statuses.items()} == dict.fromkeys(statuses, True)
    assert len(statuses) == 9
    print({label: dict(seen) for label, seen in statuses.items()})


def _served_model(case_and_flag):
    """Three of four valid generated bodies name the served model, so that they run (a random
    name only ever gets the 404)."""
    case, keep = case_and_flag
    if isinstance(case.body, dict) and "model" in case.body and not keep:
        case.body["model"] = MODEL
    return case


def _valid_cases(schema, adapter: str) -> list:
    """A request per declared 200 answer, in an order that loads the adapter before listing and
    unloading it."""
    completions = schema["/v1/completions"]["POST"]
    chat = schema["/v1/chat/completions"]["POST"]
    adapters = schema["/v1/admin/lora_adapters"]
    messages = [{"role": "user", "content": "Say hi"}]
    prompt = {"model": MODEL, "prompt": "def f", "max_tokens": 5, "logprobs": 2}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    return [
        schema["/health"]["GET"].Case(),
        schema["/metrics"]["GET"].Case(),
        schema["/v1/models"]["GET"].Case(),
        schema["/v1/models/{model_id}"]["GET"].Case(path_parameters={"model_id": MODEL}),
        completions.Case(body=prompt),
        completions.Case(body={**prompt, "echo": True, "n": 2}),
        completions.Case(body={**prompt, **usage}),
        chat.Case(body={"model": MODEL, "messages": messages, "max_tokens": 5}),
        chat.Case(body={"model": MODEL, "messages": messages, "max_tokens": 5, **usage}),
        chat.Case(
            body={"model": MODEL, "messages": messages, "max_tokens": 3, "logprobs": True}
            | {"top_logprobs": 2, "stream": True}
        ),
        adapters["POST"].Case(body={"name": "sql", "path": adapter}),
        adapters["GET"].Case(),
        completions.Case(body={**prompt, "model": "sql"}),
        schema["/v1/admin/lora_adapters/{name}"]["DELETE"].Case(path_parameters={"name": "sql"}),
    ]


def test_an_unreadable_adapter_path_is_a_400_not_a_dead_engine(keyed):
    """Found by the fuzzer: a path the OS refuses (NUL, a name too long) raised in the engine
    thread and failed the engine, so every later request got 503."""
    url, admin, _, _, _ = keyed
    for path, why in (("x\x00y", "NUL character"), ("a" * 300, "cannot be read")):
        r = httpx.post(
            url + "/v1/admin/lora_adapters", json={"name": "n", "path": path}, headers=bearer(admin)
        )
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "path"
    assert httpx.get(url + "/health").json() == {"status": "ok"}


# -- the access log ---------------------------------------------------------------------------


def test_access_log_has_one_line_per_request_with_key_model_tokens_and_id(keyed, access_lines):
    url, _, user, user_id, _ = keyed
    body = {"model": MODEL, "prompt": [5, 17, 42], "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(
        url + "/v1/completions", json=body, headers=bearer(user) | {"x-request-id": "a-1"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "a-1"
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stream": True, "n": 2}, headers=bearer(user)
    ) as stream:
        streamed_id = stream.headers["x-request-id"]
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    bad_id = "not ok\n"  # not well-formed: replaced, never copied into the log
    refused = httpx.get(url + "/v1/models", headers={"x-request-id": bad_id.strip() + "!"})
    assert refused.status_code == 401
    new_id = refused.headers["x-request-id"]
    assert len(new_id) == 32 and new_id != streamed_id

    first, streamed, unauthorized = logged(access_lines, ["a-1", streamed_id, new_id])
    assert first == first | {
        "key_id": user_id,
        "model": MODEL,
        "method": "POST",
        "path": "/v1/completions",
        "status": 200,
        "prompt_tokens": 3,
        "completion_tokens": 4,
    }
    # The stream's line is written when it ends, with every token sent (2 choices x 4).
    assert streamed["status"] == 200 and streamed["completion_tokens"] == 8
    assert streamed["prompt_tokens"] == 3 and streamed["key_id"] == user_id
    assert unauthorized == unauthorized | {"key_id": None, "model": None, "status": 401}
    assert unauthorized["prompt_tokens"] is None and unauthorized["latency_ms"] >= 0
    assert set(first) == {
        "time",
        "request_id",
        "key_id",
        "model",
        "method",
        "path",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
    }


def test_access_log_text_format_and_off(model_dir, access_lines):
    state = make_state(model_dir, None)
    with live(build_app(state, log_format="text")) as url:
        body = {"model": MODEL, "prompt": "a b", "max_tokens": 2, "ignore_eos": True}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200
        assert httpx.post(url + "/v1/completions", json={**body, "model": "x"}).status_code == 404
        # A client's path with a newline and a terminal escape stays one escaped line.
        assert httpx.get(url + "/v1/models/a%0Ab%1B[2J").status_code == 404
    line, not_found, odd_path = access_lines
    assert ' path="/v1/models/a\\nb\\u001b[2J" ' in odd_path, odd_path
    fields = dict(part.split("=", 1) for part in line.split(" "))
    assert fields["key_id"] == "-" and fields["model"] == MODEL and fields["status"] == "200"
    assert fields["completion_tokens"] == "2" and float(fields["latency_ms"]) >= 0
    assert " model=- " in not_found and " status=404 " in not_found
    access_lines.clear()
    with live(build_app(make_state(model_dir, None), log_format=None)) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 200 and r.headers["x-request-id"]
    assert access_lines == []


def test_the_drains_503s_get_an_id_and_one_line_too(model_dir, access_lines):
    """As `parallm serve` stacks them: the request log around the drain gate around the app
    (which holds a request log of its own, passing requests through): one id and one line per
    request, also for the 503 the gate answers while the server drains."""
    state = make_state(model_dir, None)
    served = access_log.RequestLog(
        DrainGate(build_app(state, log_format="json"), state), fmt="json"
    )
    with live(served) as url:
        body = {"model": MODEL, "prompt": "a b", "max_tokens": 2, "ignore_eos": True}
        answered = httpx.post(url + "/v1/completions", json=body)
        state.draining = True
        refused = httpx.post(url + "/v1/completions", json=body)
        state.draining = False
    assert answered.status_code == 200 and refused.status_code == 503
    ids = [r.headers.get_list("x-request-id") for r in (answered, refused)]
    assert [len(i) for i in ids] == [1, 1]
    ok, drained = logged(access_lines, [i[0] for i in ids])
    assert ok["status"] == 200 and ok["completion_tokens"] == 2 and ok["model"] == MODEL
    assert drained["status"] == 503 and drained["model"] is None
    assert len(access_lines) == 2


def logged(lines: list[str], ids: list[str]) -> list[dict]:
    """The access-log line of each request id, once all are written: a line is written just
    after its response has ended, so it may come a moment after the client has the response.
    Exactly one line per request."""
    deadline = time.monotonic() + scaled(30)
    while True:
        records = [json.loads(line) for line in list(lines)]
        found = Counter(r["request_id"] for r in records)
        if all(found[i] for i in ids):
            assert all(found[i] == 1 for i in ids), found
            return [next(r for r in records if r["request_id"] == i) for i in ids]
        assert time.monotonic() < deadline, f"lines of {ids} not all written: {records}"
        time.sleep(0.02)


# -- /metrics and the options -----------------------------------------------------------------


def test_metrics_auth_needs_any_valid_key_and_health_stays_open(keyed):
    url, admin, user, _, _ = keyed
    refused = httpx.get(url + "/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/metrics", headers=bearer("sk-wrong")).status_code == 401
    for secret in (user, admin):
        r = httpx.get(url + "/metrics", headers=bearer(secret))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "parallm_kv_cache_blocks" in r.text
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_parallm_serve_writes_json_lines_only_and_guards_metrics(model_dir, tmp_path):
    """The command as an operator runs it: --log-format json gives one JSON object per request
    on stderr (uvicorn's own access log is off, so no request is logged twice), --metrics-auth
    needs a key."""
    db = tmp_path / "keys.db"
    with KeyStore(str(db)) as store:
        _, secret = store.create("scraper")
    # At --log-level info uvicorn would write its own access lines, if it were on.
    server = Server(model_dir, db, "--log-format", "json", "--metrics-auth", "--log-level", "info")
    try:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers=bearer(secret)).status_code == 200
        body = {"model": MODEL, "prompt": "a b", "max_tokens": 3, "ignore_eos": True}
        headers = bearer(secret) | {"x-request-id": "job-7"}
        assert (
            httpx.post(server.url + "/v1/completions", json=body, headers=headers).status_code
            == 200
        )
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(scaled(120)) == 0
        out = server.output().splitlines()
    finally:
        server.close()
    records = [json.loads(line) for line in out if line.startswith("{")]
    others = [line for line in out if not line.startswith("{")]
    assert not [line for line in others if "HTTP/1.1" in line or "Traceback" in line], others
    # The readiness probes of the helper, then the three requests above, in order.
    mine = [r for r in records if r["path"] != "/health"]
    assert [(r["path"], r["status"]) for r in mine] == [
        ("/metrics", 401),
        ("/metrics", 200),
        ("/v1/completions", 200),
    ]
    assert mine[2]["request_id"] == "job-7" and mine[2]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--no-auth", "--metrics-auth"], "--metrics-auth: needs API keys"),
        (["--ui-api-key", "sk-x"], "--ui-api-key: only used by the chat page; add --ui"),
        (["--log-format", "xml"], "--log-format: 'xml' is not valid; valid: text, json"),
    ],
)
def test_contract_options_are_checked_before_loading(options, message, capsys):
    assert main(["serve", "--model", "no/such/dir", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"parallm: error: {message}") and err.count("\n") == 1


# -- the chat page's key ----------------------------------------------------------------------


def test_chat_page_sends_no_key_from_the_environment(model_dir, tmp_path, monkeypatch):
    """`serve --ui` with $PARALLM_API_KEY exported: a visitor who types no key is refused (401),
    not served on the operator's key; with --ui-api-key the page sends that key."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    store = KeyStore(str(tmp_path / "keys.db"))
    _, secret = store.create("operator")
    monkeypatch.setenv("PARALLM_API_KEY", secret)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    port = free_port()
    page_url = f"http://127.0.0.1:{port}"
    for page_key, expected in ((None, "server answered 401"), (secret, None)):
        app = build_app(make_state(model_dir, store), ui_server_url=page_url, ui_api_key=page_key)
        with live(app, port):
            client = Client(page_url + "/ui/", verbose=False)
            reply = client.predict("Hi", "", 4, 0.0, "", api_name="/respond")
            client.close()
        text = reply["content"] if isinstance(reply, dict) else reply
        if expected is None:
            assert isinstance(reply, str) and "server answered" not in reply
        else:
            assert text.startswith(expected), text
    store.close()


def test_parallm_ui_sends_no_key_from_the_environment(keyed, monkeypatch, capsys):
    """`parallm ui` with $PARALLM_API_KEY exported: without --api-key the page it serves has no
    key (each visitor types theirs) and its start-up check needs none; --api-key is checked
    against the server and given to the page."""
    pytest.importorskip("gradio")
    from parallm.errors import UserError
    from parallm.serve import ui

    url, _, user, _, _ = keyed
    monkeypatch.setenv("PARALLM_API_KEY", user)
    built = []

    class Page:
        def launch(self, **options) -> None:  # serving is Gradio's; the page's key is ours
            pass

    def build_ui(server_url, api_key, model=None, *, video=False):
        built.append((api_key, model))
        return Page()

    monkeypatch.setattr(ui, "build_ui", build_ui)
    args = argparse.Namespace(server=url, api_key=None, host="127.0.0.1", port=free_port())
    assert ui.main(args) == 0
    assert "does not send $PARALLM_API_KEY" in capsys.readouterr().err
    args.api_key = user
    assert ui.main(args) == 0
    assert built == [(None, None), (user, MODEL)]
    args.api_key = "sk-parallm-wrong"
    with pytest.raises(UserError, match=r"--api-key: .* refused it \(401\)"):
        ui.main(args)
