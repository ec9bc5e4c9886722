"""`parallm serve`'s ASGI app: the OpenAI-compatible HTTP API (FastAPI) around `AsyncEngine`.

A request goes: key (401) -> body size (413) -> JSON and types (400) -> model name (404; the
base model or a loaded LoRA adapter) ->
sampling values, prompt length and `max_tokens` against the context (400, checked before it is
queued, so a stream never starts for a request that cannot run) -> the key's rpm / tpm (429) ->
the waiting queue (429 when full) -> the engine (503 once it has failed).

Usage is metered per choice as the client saw it: the prompt tokens of each prompt and every
completion token sent (all of them for a finished request; for a stream the client left, those
sent before it left). It is recorded against the key and charged to its tpm window when the
request ends, however it ends.

Every request gets an id (`x-request-id`, the client's own when well-formed) and one line in the
access log once its response has ended (`access_log`); /openapi.json describes each endpoint
from the table in `openapi`.

The endpoints live in one module per group: `system` (/health, /metrics, /v1/models),
`completions`, `chat`, `admin` (loading and unloading LoRA adapters, admin keys only), `videos`
(OpenAI's video API, with --video-model); `common` holds the checks they share and `jobs` a
request's engine requests. `parallm.serve.server` runs the app under uvicorn.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from parallm.errors import UserError
from parallm.serve import access_log, admin, chat, completions, openapi, system, videos
from parallm.serve.common import APIError
from parallm.serve.state import ServerState

__all__ = ["ServerState", "build_app"]


def build_app(
    state: ServerState,
    *,
    ui_server_url: str | None = None,
    ui_api_key: str | None = None,
    log_format: str | None = "text",
) -> FastAPI:
    """The API around `state`; with `ui_server_url` (this server's own address) also the chat
    page at /ui, which sends `ui_api_key` when its user gives no key (None: it sends none). Each
    request gets an id (the `x-request-id` header) and, unless `log_format` is None, a line in
    the access log (`access_log.LOG_FORMATS`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        if state.videos is not None:
            state.videos.start(partial(videos.job_ended, state))
        try:
            yield
        finally:
            if state.videos is not None:
                state.videos.stop()  # fails what is left (recording its usage) first
            if state._background:
                await asyncio.wait(list(state._background), timeout=10)
            state.engine.stop()

    app = FastAPI(title="parallm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.parallm = state
    _add_error_handlers(app)
    for group in (system, completions, chat, admin):
        app.include_router(group.router)
    if state.videos is not None:
        app.include_router(videos.router)
    openapi.install(app, state)
    if log_format is not None:
        access_log.configure(log_format)
    app.add_middleware(access_log.RequestLog, fmt=log_format)
    if ui_server_url is not None:
        from parallm.serve.ui import mount_ui

        mount_ui(app, ui_server_url, ui_api_key, video=state.videos is not None)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered with OpenAI's error body: a UserError is a 400 naming its field,
    an unknown route a 404, a bug a 500 (its traceback on stderr)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return APIError(400, str(exc), param=exc.param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, kind).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc)
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()
