"""`parallm serve` shutting down with streams in flight: after SIGTERM (or SIGINT) new requests
get 503 with `Retry-After` and /health says draining; running streams finish within
--drain-timeout, or are ended then with an error event and [DONE]; usage is recorded with
exactly the tokens each client received; the server exits 0 without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from parallm.serve.keystore import KeyStore
from parallm.testing.timeouts import scaled
from parallm.tokenizer import train_bpe_tokenizer
from tests.hf_models import CODE_TEXTS, save_hf_model
from tests.serve_helpers import free_port
from tests.test_serve import metric
from tests.test_serve_load import usage_rows

MODEL = "tiny"
CONTEXT = 4096  # long enough that a stream outlasts a short drain on any machine
PROMPT = [5, 17, 42, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("drain") / "model"
    tok = train_bpe_tokenizer(iter(CODE_TEXTS), vocab_size=280)
    save_hf_model("llama3", d, 0, vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT)
    tok.save(d)
    return d


class Server:
    """`parallm serve` as a subprocess with a key database, its stderr in a file, in a process
    group of its own (with its tensor-parallel workers), as a terminal would start it."""

    def __init__(self, model_dir: Path, db: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "parallm.cli", "serve", "--model", str(model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--db", str(db)]
        cmd += ["--served-model-name", MODEL, "--kv-cache-memory", str(32 << 20), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + scaled(180)
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=scaled(5)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not up:\n{self.output()}"
            time.sleep(0.2)

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait(self) -> int:
        try:
            return self.proc.wait(scaled(120))
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


class Stream(threading.Thread):
    """One streamed completion read in its own thread: the tokens received (each chunk names
    its tokens through `logprobs`), the events after the SIGTERM, how it ended."""

    def __init__(self, url: str, secret: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.secret, self.max_tokens = url, secret, max_tokens
        self.started = threading.Event()
        self.signalled_at: float | None = None  # set by the test when it sends the signal
        self.id: str | None = None
        self.tokens = 0
        self.after_signal = 0  # chunks with tokens received after the signal
        self.finish_reason: str | None = None
        self.error: dict | None = None
        self.usage: dict | None = None
        self.done = False
        self.status: int | None = None

    def run(self) -> None:
        body = {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": self.max_tokens,
            "stream": True,
            "logprobs": 0,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {self.secret}"}
        with httpx.stream(
            "POST", self.url + "/v1/completions", json=body, headers=headers, timeout=None
        ) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    self.error = event["error"]
                    continue
                self.id = event["id"]
                self.usage = event.get("usage") or self.usage
                for c in event["choices"]:
                    self.tokens += len(c["logprobs"]["tokens"])
                    self.finish_reason = c["finish_reason"] or self.finish_reason
                    self.after_signal += self.signalled_at is not None
                self.started.set()
        self.started.set()  # also when it failed before its first chunk


def start_streams(url: str, secret: str, count: int, max_tokens: int) -> list[Stream]:
    streams = [Stream(url, secret, max_tokens) for _ in range(count)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(scaled(120)) and s.status == 200, s.status
    return streams


def signal_server(server: Server, sig: int, streams: list[Stream], *, group: bool = False) -> None:
    """`sig` to the server (`group`: to its whole process group, as a terminal's Ctrl-C)."""
    now = time.monotonic()
    for s in streams:
        s.signalled_at = now
    if group:
        os.killpg(server.proc.pid, sig)
    else:
        server.proc.send_signal(sig)


def new_key(db: Path, name: str) -> tuple[str, str]:
    with KeyStore(str(db)) as store:
        info, secret = store.create(name)
    return info.id, secret


def tokens_per_second(url: str, secret: str) -> float:
    """This machine's decode speed now, on one request of 32 tokens (after one of 2, so that
    what the first request sets up is not counted)."""
    speed = 0.0
    for tokens in (2, 32):
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True}
        start = time.monotonic()
        r = httpx.post(
            url + "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=scaled(120),
        )
        assert r.status_code == 200
        speed = tokens / (time.monotonic() - start)
    return speed


def assert_clean_exit(server: Server) -> str:
    code = server.proc.wait(scaled(120))
    out = server.output()
    assert code == 0, out
    assert "Traceback" not in out and "Cancel" not in out, out
    return out


def test_drain_lets_running_streams_finish_and_refuses_new_requests(model_dir, tmp_path):
    """Ctrl-C (SIGINT to the process group: the server and its tensor-parallel worker) with a
    long --drain-timeout: while four streams finish, /health is 503 draining and a new request
    503 with Retry-After; then each stream ends with its finish_reason and [DONE], each usage
    row holds its tokens, and the server exits 0 (the worker kept serving its shard)."""
    db = tmp_path / "keys.db"
    key_id, secret = new_key(db, "drain")
    args = ("--drain-timeout", str(scaled(600)), "--tensor-parallel-size", "2")
    server = Server(model_dir, db, *args)
    try:
        # Streams of about 4 s at the speed measured: still running when the signal lands,
        # however fast the machine, and done long before the drain timeout, however slow.
        max_tokens = int(
            min(CONTEXT - len(PROMPT), max(64, 4 * tokens_per_second(server.url, secret)))
        )
        streams = start_streams(server.url, secret, 4, max_tokens)
        signal_server(server, signal.SIGINT, streams, group=True)
        health = httpx.get(server.url + "/health", timeout=scaled(30))
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        headers = {"Authorization": f"Bearer {secret}"}
        late = httpx.post(
            server.url + "/v1/completions", json=body, headers=headers, timeout=scaled(30)
        )
        assert late.status_code == 503 and late.headers["Retry-After"] == "1"
        assert late.json()["error"]["code"] == "server_shutting_down"
        for s in streams:
            s.join(scaled(300))
        out = assert_clean_exit(server)
        assert "draining" in out and "drained" in out
        rows = usage_rows(db, key_id)
        assert len(rows) == 2 + len(streams)  # the speed probes and the streams; not the 503
        for s in streams:
            assert s.done and s.error is None and s.finish_reason == "length"
            assert s.tokens == max_tokens and s.after_signal > 0
            assert rows[s.id] == (len(PROMPT), max_tokens)
            assert s.usage["completion_tokens"] == max_tokens
    finally:
        server.close()


def test_drain_timeout_ends_streams_with_an_error_event_and_bills_what_was_sent(
    model_dir, tmp_path
):
    """SIGTERM with --drain-timeout 1 while four streams and one non-streaming request ask for
    far more than a second's tokens: each stream ends with an error event and [DONE], the other
    request gets a 503, usage holds exactly what each client received, and the server exits 0
    without a traceback."""
    db = tmp_path / "keys.db"
    key_id, secret = new_key(db, "cut")
    server = Server(model_dir, db, "--drain-timeout", "1")
    try:
        long = CONTEXT - len(PROMPT)
        streams = start_streams(server.url, secret, 4, long)
        whole: dict = {}

        def non_streaming() -> None:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": long, "ignore_eos": True}
            headers = {"Authorization": f"Bearer {secret}"}
            r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=None)
            whole.update(status=r.status_code, body=r.json())

        waiting = threading.Thread(target=non_streaming, daemon=True)
        waiting.start()
        deadline = time.monotonic() + scaled(60)
        while metric(server.url, "parallm_num_requests_running") < 5:
            assert time.monotonic() < deadline, "the non-streaming request never started"
            time.sleep(0.05)
        signal_server(server, signal.SIGTERM, streams)
        for s in [*streams, waiting]:
            s.join(scaled(120))
        out = assert_clean_exit(server)
        assert "drain timeout: ended 5 running request(s)" in out
        rows = usage_rows(db, key_id)
        for s in streams:
            assert s.done and s.finish_reason is None and 0 < s.tokens < long
            assert s.error["code"] == "server_shutting_down" and s.error["type"] == "server_error"
            assert rows[s.id] == (len(PROMPT), s.tokens)
            # The stream's last chunk before the error told the client the same.
            assert s.usage == {
                "prompt_tokens": len(PROMPT),
                "completion_tokens": s.tokens,
                "total_tokens": len(PROMPT) + s.tokens,
            }
        assert whole["status"] == 503
        assert whole["body"]["error"]["code"] == "server_shutting_down"
        (cut,) = [row for rid, row in rows.items() if rid not in {s.id for s in streams}]
        assert cut == (len(PROMPT), 0)  # it received no completion token
    finally:
        server.close()


def test_the_drain_ends_other_long_lived_streams_quietly(caplog):
    """The chat page's event streams (its heartbeat never ends by itself) are not API requests:
    the drain does not wait for them, and ends them itself at its end, so uvicorn's shutdown
    finds nothing to cancel (it logs 'Cancel 1 running task(s)' and a traceback for each)."""
    import asyncio
    from types import SimpleNamespace

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from parallm.serve.drain import DrainGate, DrainingServer

    async def beats():
        while True:
            yield b"data: beat\n\n"
            await asyncio.sleep(0.05)

    app = Starlette(routes=[Route("/ui/heartbeat", lambda request: StreamingResponse(beats()))])
    state = SimpleNamespace(draining=False, cut=False, jobs={}, videos=None)
    gate = DrainGate(app, state)
    port = free_port()
    config = uvicorn.Config(gate, host="127.0.0.1", port=port, timeout_graceful_shutdown=1)
    server = DrainingServer(config, gate, timeout=scaled(30))
    thread = threading.Thread(target=server.run)  # not the main thread: no signal handlers
    thread.start()
    deadline = time.monotonic() + scaled(60)
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    beats_seen = 0
    with httpx.stream("GET", f"http://127.0.0.1:{port}/ui/heartbeat", timeout=scaled(60)) as r:
        for line in r.iter_lines():
            beats_seen += line == "data: beat"
            if beats_seen == 2:
                server.handle_exit(signal.SIGTERM, None)  # what the SIGTERM handler calls
        # the loop ends when the server ends the stream: cleanly, with no read error
    thread.join(scaled(60))
    assert not thread.is_alive() and beats_seen >= 2
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, [r.getMessage() for r in errors]
    assert not any("Cancel" in r.getMessage() for r in caplog.records)
