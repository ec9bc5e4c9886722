"""What every endpoint checks first: the key (401; 403 for an admin endpoint without the admin
scope), the body's size (413), the model name (404: the base or a loaded adapter); and
`APIError`, an HTTP error answered with OpenAI's error body."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from parallm.serve import access_log
from parallm.serve.keystore import KeyInfo
from parallm.serve.protocol import error_body

if TYPE_CHECKING:
    from parallm.serve.state import ServerState


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def engine_dead(why: object) -> APIError:
    """The 503 of a request the failed engine cannot run."""
    return APIError(503, f"engine failed: {why}", "server_error", code="engine_dead")


def state_of(request: Request) -> ServerState:
    """The server state `build_app` attached to the app."""
    return request.app.state.parallm


async def authorize(state: ServerState, request: Request) -> KeyInfo | None:
    """The request's key (None without a key store); 401 when it is missing, unknown or
    revoked."""
    if state.keystore is None:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise APIError(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>' "
            "(create one with `parallm keys create`)",
            code="invalid_api_key",
        )
    key = await asyncio.to_thread(state.keystore.authenticate, secret.strip())
    if key is None:
        raise APIError(401, "incorrect API key: unknown or revoked", code="invalid_api_key")
    access_log.note(key_id=key.id)
    return key


async def read_body(state: ServerState, request: Request) -> bytes:
    """The body, read no further than the server's limit (413 beyond it)."""
    limit = state.max_body_bytes
    too_big = APIError(
        413, f"body: larger than the server's limit of {limit} bytes", code="body_too_large"
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def authorize_admin(state: ServerState, request: Request) -> KeyInfo:
    """The request's key if it has the admin scope; 401 without a valid key, 403 without the
    scope, and 403 on a server without keys (--no-auth), whose admin endpoints are off."""
    if state.keystore is None:
        raise APIError(
            403,
            "admin endpoints are off on a server started with --no-auth; start it with a key "
            "database and use a key made by `parallm keys create --admin`",
            "permission_error",
            code="admin_disabled",
        )
    key = await authorize(state, request)
    assert key is not None
    if not key.admin:
        raise APIError(
            403,
            f"key {key.id} has no admin scope; use a key made by `parallm keys create --admin`",
            "permission_error",
            code="insufficient_scope",
        )
    return key


def check_model(state: ServerState, name: str) -> str | None:
    """The LoRA adapter `name` selects (None: the base model); 404 unless it is the model this
    server serves or one of its loaded adapters."""
    if name == state.model_name:
        access_log.note(model=name)
        return None
    if name in state.llm.adapters.by_name:
        access_log.note(model=name)
        return name
    served = ", ".join(repr(n) for n in [state.model_name, *state.llm.adapters.by_name])
    raise APIError(
        404,
        f"model: {name!r} does not exist; this server serves {served}",
        param="model",
        code="model_not_found",
    )
