"""One access-log line per HTTP request, and the request id every response carries.

`RequestLog` is a pure ASGI middleware (streams pass through untouched). For each request it
takes the client's `x-request-id` when it is well-formed (1 to 128 of letters, digits and
`-_.:`), or makes one, returns it as the response's `x-request-id` header, and once the response
has ended (for a stream: when its last event is sent or the client left) writes one line:
request id, key id, model, method, path, status, prompt and completion tokens, latency in ms.

The handlers add what only they know (the key, the model, the tokens billed) through `note`,
which writes into the record of the request being handled: the record travels in a context
variable, which asyncio copies into the tasks a request starts (a stream's body among them).

Lines go to the `parallm.access` logger, on stderr by default: `text` is `key=value` pairs,
`json` one JSON object per line. Either way one request is one line: what a client sent (its path)
is escaped, never written raw.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from parallm.serve.config import LOG_FORMATS

HEADER = "x-request-id"
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,128}")

logger = logging.getLogger("parallm.access")


@dataclass
class AccessRecord:
    """What one line says about one request; None where it does not apply (no key, no model)."""

    time: str
    request_id: str
    key_id: str | None
    model: str | None
    method: str
    path: str
    status: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar(
    "parallm_access_record", default=None
)


def note(**facts: Any) -> None:
    """Set fields (`key_id`, `model`, `prompt_tokens`, `completion_tokens`) of the current
    request's line; nothing outside a request or without the middleware."""
    record = _current.get()
    if record is None:
        return
    for name, value in facts.items():
        assert hasattr(record, name), name
        setattr(record, name, value)


def note_usage(usage: dict) -> None:
    """The tokens an OpenAI `usage` object bills, on the current request's line."""
    note(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `x-request-id` if well-formed, else a new one."""
    for name, value in headers:
        if name.lower() == HEADER.encode():
            given = value.decode("latin-1")
            if _WELL_FORMED.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def format_line(record: AccessRecord, fmt: str) -> str:
    """One line: JSON, or `key=value` pairs (`-` for none; values with spaces quoted)."""
    fields = asdict(record)
    if fields["latency_ms"] is not None:
        fields["latency_ms"] = round(fields["latency_ms"], 1)
    if fmt == "json":  # ASCII: no character of a client's path can break the line
        return json.dumps(fields)
    return " ".join(f"{name}={_text_value(v)}" for name, v in fields.items())


def _text_value(value: Any) -> str:
    """The value as is, or JSON-quoted when it is empty or holds a space, a quote, `=` or a
    character that is not printable (a client's path may hold a newline or a terminal escape)."""
    if value is None:
        return "-"
    text = str(value)
    plain = text and all(c.isprintable() and c not in ' "=' for c in text)
    return text if plain else json.dumps(text)


def configure(fmt: str) -> None:
    """Send `parallm.access` lines to stderr, once, unless the logger has handlers already."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}; valid: {', '.join(LOG_FORMATS)}")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # one line, not also a root logger's


class RequestLog:
    """ASGI middleware: the request id header on every HTTP response, and (with `fmt`, one of
    `LOG_FORMATS`) the request's access-log line once its response has ended. Nested, the
    outermost one does this and the inner ones pass requests through: `build_app` puts one in
    the app, and `parallm serve` one around everything it serves (the drain's 503s too)."""

    def __init__(self, app: Any, *, fmt: str | None = "text") -> None:
        self.app = app
        self.fmt = fmt

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _current.get() is not None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        record = AccessRecord(
            time=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            request_id=request_id(scope.get("headers", [])),
            key_id=None,
            model=None,
            method=scope["method"],
            path=scope["path"],
            status=None,
            prompt_tokens=None,
            completion_tokens=None,
            latency_ms=None,
        )
        header = (HEADER.encode(), record.request_id.encode())

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        token = _current.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500  # answered by the server's error middleware
            raise
        finally:
            _current.reset(token)
            record.latency_ms = (time.perf_counter() - start) * 1000
            if self.fmt is not None:
                logger.info(format_line(record, self.fmt))
