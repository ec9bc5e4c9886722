"""A tiny chat model on disk and a live `parallm serve` process around it, for the server tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from parallm.bench.serve import stop as stop_server
from parallm.testing.timeouts import scaled
from parallm.tokenizer import Tokenizer
from tests.hf_models import save_hf_model_with_tokenizer

# ChatML, as Qwen's models use it: the template comes from the model directory, as in real use.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_chat_model(path: Path, name: str = "llama3", seed: int = 0):
    """A random `transformers` model with a BPE tokenizer and a chat template in `path`;
    returns (model, tokenizer)."""
    ref, _ = save_hf_model_with_tokenizer(name, path, seed)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return ref, Tokenizer.from_dir(path)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def schema_fuzzer(url: str, secret: str):
    """(schema, call, statuses) for fuzzing a live server against its /openapi.json with
    schemathesis: `call(case)` sends a case with `secret` and validates the response against the
    description; `statuses[operation label]` counts the status codes seen. A schema-valid
    request may get a 400 (the schema cannot say everything the server checks, e.g. a prompt
    longer than the context): that is declared, not a failure."""
    from collections import Counter

    import schemathesis

    config = schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"bearerAuth": {"bearer": secret}}},
            "checks": {"positive_data_acceptance": {"enabled": False}},
        }
    )
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    statuses: dict[str, Counter] = {}

    def call(case) -> None:
        response = case.call_and_validate(headers=bearer(secret))
        statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1

    return schema, call, statuses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    model_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> Iterator[str]:
    """`parallm serve --model model_dir --port P *args` as a subprocess; yields its base URL
    (``http://127.0.0.1:P``) once `/health` answers 200, and stops it afterwards. The server's
    output goes to a log file that is printed if it fails to start."""
    port = free_port()
    cmd = [sys.executable, "-m", "parallm.cli", "serve", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *args]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + scaled(timeout)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_read(log.name)}")
            try:
                if httpx.get(url + "/health", timeout=scaled(5)).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not up after {scaled(timeout):.0f} s:\n{_read(log.name)}"
                )
            time.sleep(0.2)
        yield url
    finally:
        stop_server(proc)  # SIGTERM, SIGKILL after 30 s
        log.close()
        os.unlink(log.name)


def _read(path: str) -> str:
    return Path(path).read_text()[-5000:]
