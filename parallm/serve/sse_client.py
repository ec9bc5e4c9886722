"""Reading the server's answers from the client side (the chat page, `parallm bench serve`):
one server-sent-event line's payload and an OpenAI-shaped error body's message."""

from __future__ import annotations

import json


def parse_sse(line: str) -> dict | str | None:
    """The payload of one server-sent-event line: a JSON object, "[DONE]", or None (blank,
    comment or other field)."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    return data if data == "[DONE]" else json.loads(data)


def error_message(body: str | bytes, limit: int = 500) -> str:
    """The message of an error body `{"error": {"message": ...}}`; otherwise the body's first
    `limit` characters, or "no message" when it is empty."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return text[:limit] or "no message"
