"""`parallm serve`: the OpenAI-compatible HTTP API (FastAPI + uvicorn) around `AsyncEngine`.

A request goes: key (401) -> body size (413) -> JSON and types (400) -> model name (404) ->
sampling values, prompt length and `max_tokens` against the context (400, checked before it is
queued, so a stream never starts for a request that cannot run) -> the key's rpm / tpm (429) ->
the waiting queue (429 when full) -> the engine (503 once it has failed).

Usage is metered per choice as the client saw it: the prompt tokens of each prompt and every
completion token sent (all of them for a finished request; for a stream the client left, those
sent before it left). It is recorded against the key and charged to its tpm window when the
request ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from parallm.errors import UserError
from parallm.inference.engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from parallm.inference.sampling import SamplingParams, TokenLogprobs
from parallm.serve.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from parallm.serve.keystore import KeyInfo, KeyStore
from parallm.serve.metrics import Metrics
from parallm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    parse,
)
from parallm.serve.ratelimit import RateLimiter


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


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    keystore: KeyStore | None  # None: --no-auth
    max_body_bytes: int
    limiter: RateLimiter = field(default_factory=RateLimiter)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)
    _background: set[asyncio.Future] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.model_name)

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine

    def in_background(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run a blocking call (the key store) in a thread without awaiting it: also from a
        `finally` of a cancelled stream, where awaiting is not possible."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._background.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            print(f"parallm serve: recording usage failed: {future.exception()}", file=sys.stderr)


# -- the app -----------------------------------------------------------------------------------


def build_app(state: ServerState, *, ui_server_url: str | None = None) -> FastAPI:
    """The API around `state`; with `ui_server_url` (this server's own address) also the chat
    page at /ui."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            if state._background:
                await asyncio.wait(list(state._background), timeout=10)
            state.engine.stop()

    app = FastAPI(title="parallm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.parallm = state

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
        import traceback

        traceback.print_exception(exc)
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    @app.get("/health")
    async def health() -> Response:
        if state.engine.healthy:
            return JSONResponse({"status": "ok"})
        why = state.engine.error or "the engine is not running"
        return APIError(503, f"engine failed: {why}", "server_error", code="engine_dead").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            state.metrics.render(state.engine.stats),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        await authorize(state, request)
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        await authorize(state, request)
        check_model(state, model_id)
        return model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        key = await authorize(state, request)
        req = parse(CompletionRequest, await read_body(state, request))
        check_model(state, req.model)
        return await run_completion(state, request, key, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        key = await authorize(state, request)
        req = parse(ChatCompletionRequest, await read_body(state, request))
        check_model(state, req.model)
        return await run_chat(state, request, key, req)

    if ui_server_url is not None:
        from parallm.serve.ui import mount_ui

        mount_ui(app, ui_server_url, None)
    return app


def model_card(state: ServerState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "parallm",
        "max_model_len": state.llm.max_model_len,
    }


async def authorize(state: ServerState, request: Request) -> KeyInfo | None:
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
    return key


async def read_body(state: ServerState, request: Request) -> bytes:
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


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(
            404,
            f"model: {name!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


# -- one API request: several engine requests ----------------------------------------------------


@dataclass
class _Choice:
    """One choice (one sequence) as sent so far."""

    index: int
    prompt_tokens: int  # the prompt's tokens, counted on the first choice of each prompt only
    text_sent: int = 0  # characters of the output's text sent
    tokens_sent: int = 0  # output token ids sent (logprobs go with them)
    finish_reason: str | None = None
    first_token_at: float | None = None


@dataclass
class _Job:
    """An API request's engine requests, with what has been sent of each choice."""

    state: ServerState
    key: KeyInfo | None
    endpoint: str
    id: str
    params: SamplingParams
    prompts: list[list[int]]
    reserved: int  # tokens reserved in the key's tpm window
    arrival: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    choices: dict[tuple[int, int], _Choice] = field(default_factory=dict)
    recorded: bool = False

    @property
    def request_ids(self) -> list[str]:
        return [f"{self.id}-{i}" for i in range(len(self.prompts))]

    def choice(self, out: RequestOutput, c: CompletionOutput) -> _Choice:
        p = int(out.request_id.rsplit("-", 1)[1])
        found = self.choices.get((p, c.index))
        if found is None:
            n = self.params.n
            tokens = len(self.prompts[p]) if c.index == 0 else 0
            found = self.choices[(p, c.index)] = _Choice(p * n + c.index, tokens)
        return found

    def outputs(self) -> AsyncIterator[RequestOutput]:
        return self.state.engine.stream(self.request_ids, self.queue)

    def finish(self) -> None:
        """Record usage and metrics once, whatever ended the request."""
        if self.recorded:
            return
        self.recorded = True
        state = self.state
        now = time.monotonic()
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.tokens_sent for c in self.choices.values())
        for c in self.choices.values():
            ttft = None if c.first_token_at is None else c.first_token_at - self.arrival
            state.metrics.finished(
                reason=c.finish_reason or "abort",
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.tokens_sent,
                ttft=ttft,
                e2e=now - self.arrival,
            )
        if self.key is not None:
            state.limiter.commit(self.key.id, prompt + completion, self.reserved)
            assert state.keystore is not None
            state.in_background(
                state.keystore.record_usage,
                self.key.id,
                request_id=self.id,
                model=state.model_name,
                prompt_tokens=prompt,
                completion_tokens=completion,
                endpoint=self.endpoint,
            )

    def close(self) -> None:
        """Abort whatever still runs (a client that left before the stream began) and finish."""
        for request_id in self.request_ids:
            self.state.engine.abort(request_id)
        self.finish()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.tokens_sent for c in self.choices.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def start_job(
    state: ServerState,
    key: KeyInfo | None,
    endpoint: str,
    id_prefix: str,
    prompts: list[str | list[int]],
    params: SamplingParams,
) -> _Job:
    """Check every prompt against the context, charge the key, queue the engine requests."""
    llm = state.llm
    ids = [llm.check_request(p, params) for p in prompts]
    reserved = sum(len(p) for p in ids) + len(ids) * params.n * params.max_tokens
    if key is not None:
        try:
            wait = state.limiter.check(key, reserved)
        except UserError as e:
            raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from e
        if wait is not None:
            raise APIError(
                429,
                f"rate limit of key {key.id} reached (rpm {key.rpm}, tpm {key.tpm}); "
                f"retry in {math.ceil(wait)} s",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
    job = _Job(state, key, endpoint, f"{id_prefix}-{uuid.uuid4().hex}", params, ids, reserved)
    try:
        state.engine.add(
            [(rid, p, params) for rid, p in zip(job.request_ids, ids, strict=True)], job.queue
        )
    except (QueueFullError, EngineDeadError) as e:
        if key is not None:
            state.limiter.commit(key.id, 0, reserved)
        if isinstance(e, QueueFullError):
            raise APIError(
                429,
                f"server busy: {e}; retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from e
        raise APIError(503, f"engine failed: {e}", "server_error", code="engine_dead") from e
    return job


async def collect(job: _Job, request: Request) -> dict[str, RequestOutput]:
    """The final output of each engine request of a non-streaming job; stops (and aborts) if
    the client goes away while it waits."""
    finals: dict[str, RequestOutput] = {}

    async def run() -> None:
        async for out in job.outputs():
            if out.finished:
                finals[out.request_id] = out

    task = asyncio.ensure_future(run())
    try:
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        await task
    except EngineDeadError as e:
        raise APIError(503, f"engine failed: {e}", "server_error", code="engine_dead") from e
    finally:
        task.cancel()
    return finals


def raise_output_error(out: RequestOutput) -> None:
    if out.error is not None:  # checked before queueing; a request can still fail in the engine
        raise APIError(400, out.error, code="request_failed")


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _JobStream(StreamingResponse):
    """A stream that closes its job however the response ends, even when the client left
    before the first byte (then the body is never iterated)."""

    def __init__(self, job: _Job, content: AsyncIterator[str]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


def stream_response(job: _Job, chunks: AsyncIterator[dict], include_usage: bool) -> Response:
    async def body() -> AsyncIterator[str]:
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield sse(chunk)
            if include_usage:
                yield sse(job_chunk(job, [], usage=job.usage()))
            yield sse("[DONE]")
        except EngineDeadError as e:
            err = error_body(f"engine failed: {e}", "server_error", code="engine_dead")
            yield sse(err)
        except APIError as e:
            yield sse(error_body(e.message, e.type, e.param, e.code))
        finally:
            job.finish()

    return _JobStream(job, body())


def job_chunk(job: _Job, choices: list[dict], *, usage: dict | None = None) -> dict:
    chat = job.endpoint == "chat"
    chunk = {
        "id": job.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": job.state.model_name,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def new_output(job: _Job, out: RequestOutput, c: CompletionOutput) -> tuple[_Choice, str, int, int]:
    """What a choice has that was not sent yet: (choice, text, first new token, end)."""
    choice = job.choice(out, c)
    text = c.text[choice.text_sent :]
    start, end = choice.tokens_sent, len(c.token_ids)
    if end > start and choice.first_token_at is None:
        choice.first_token_at = time.monotonic()
    choice.text_sent = len(c.text)
    choice.tokens_sent = end
    if c.finish_reason is not None:
        choice.finish_reason = _finish_reason(c.finish_reason)
    return choice, text, start, end


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "abort"


def max_tokens_for(requested: int | None, prompts_longest: int, state: ServerState) -> int:
    """None: as many as the context leaves (at least 1, so that a too long prompt gets the
    prompt's error, not max_tokens')."""
    if requested is not None:
        return requested
    return max(1, state.llm.max_model_len - prompts_longest)


# -- /v1/completions --------------------------------------------------------------------------


async def run_completion(
    state: ServerState, request: Request, key: KeyInfo | None, req: CompletionRequest
) -> Response:
    llm = state.llm
    prompts = req.prompts()
    if req.max_tokens == 0 and not req.echo:
        raise UserError("max_tokens: 0 is not valid; must be >= 1 (0 only with echo)")
    scoring = req.max_tokens == 0  # echo the prompt (and its logprobs), generate nothing
    longest = max(len(llm.check_request(p, SamplingParams(max_tokens=1))) for p in prompts)
    max_tokens = 1 if scoring else max_tokens_for(req.max_tokens, longest, state)
    want_prompt_lps = req.echo and req.logprobs is not None
    params = req.sampling_params(
        max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if want_prompt_lps else None,
    )
    job = start_job(state, key, "completions", "cmpl", prompts, params)
    tok = llm.tokenizer
    prompt_texts = [
        p if isinstance(p, str) else tok.decode(ids)
        for p, ids in zip(prompts, job.prompts, strict=True)
    ]

    def choice_dict(out: RequestOutput, c: CompletionOutput, final: bool) -> dict | None:
        p = int(out.request_id.rsplit("-", 1)[1])
        first_send = (p, c.index) not in job.choices
        choice, text, start, end = new_output(job, out, c)
        if scoring:  # the generated token is never shown, nor counted
            choice.tokens_sent, text, start, end = 0, "", 0, 0
            choice.finish_reason = "length"
        lps = None
        if req.logprobs is not None:
            lps = _completion_logprobs(
                tok, c.logprobs[start:end] if c.logprobs else [], c.token_ids[start:end]
            )
        if req.echo and first_send:
            text = prompt_texts[p] + text
            if lps is not None:
                prompt_lps = _completion_logprobs(
                    tok, out.prompt_logprobs or [], job.prompts[p], prompt=True
                )
                lps = _merge_logprobs(prompt_lps, lps)
        reason = choice.finish_reason if (c.finish_reason is not None or final) else None
        shown = text or (end > start and lps is not None) or reason is not None
        if not final and not shown:
            return None  # nothing the client can see (text held back)
        return {"index": choice.index, "text": text, "logprobs": lps, "finish_reason": reason}

    if req.stream:

        async def chunks() -> AsyncIterator[dict]:
            async with aclosing(job.outputs()) as outputs:
                async for out in outputs:
                    raise_output_error(out)
                    if want_prompt_lps and out.prompt_logprobs is None:
                        continue  # echo waits for the prompt's log-probabilities
                    sent = [choice_dict(out, c, False) for c in out.outputs]
                    sent = [c for c in sent if c is not None]
                    if sent:
                        yield job_chunk(job, sent)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_response(job, chunks(), include_usage)

    try:
        finals = await collect(job, request)
        choices = []
        for rid in job.request_ids:
            out = finals[rid]
            raise_output_error(out)
            choices += [choice_dict(out, c, True) for c in out.outputs]
        return JSONResponse(
            {
                "id": job.id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": state.model_name,
                "choices": sorted(choices, key=lambda c: c["index"]),
                "usage": job.usage(),
            }
        )
    finally:
        job.finish()


def _token_str(tok: Any, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(
    tok: Any, lps: list[TokenLogprobs | None], token_ids: list[int], *, prompt: bool = False
) -> dict:
    """The legacy completions `logprobs` object for these tokens."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for i, t in enumerate(token_ids):
        s = _token_str(tok, t)
        entry = lps[i] if i < len(lps) else None
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(entry["logprob"])
        top = {_token_str(tok, tid): lp for tid, lp in entry["top"].items()}
        top.setdefault(s, entry["logprob"])
        tops.append(top)
    del prompt
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _merge_logprobs(first: dict, second: dict) -> dict:
    shift = sum(len(t) for t in first["tokens"])
    return {
        "tokens": first["tokens"] + second["tokens"],
        "token_logprobs": first["token_logprobs"] + second["token_logprobs"],
        "top_logprobs": first["top_logprobs"] + second["top_logprobs"],
        "text_offset": first["text_offset"] + [o + shift for o in second["text_offset"]],
    }


# -- /v1/chat/completions -----------------------------------------------------------------------


async def run_chat(
    state: ServerState, request: Request, key: KeyInfo | None, req: ChatCompletionRequest
) -> Response:
    llm = state.llm
    tok = llm.tokenizer
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise UserError("max_completion_tokens: give it or max_tokens, not both")
    try:
        text = tok.apply_chat_template(
            req.rendered_messages(), add_generation_prompt=req.add_generation_prompt
        )
    except jinja2.TemplateError as e:
        raise UserError(f"messages: the model's chat template failed on them: {e}") from e
    prompt = tok.encode(text, add_special_tokens=False)
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_tokens = max_tokens_for(requested, len(prompt), state)
    top = req.top_logprobs or 0
    params = req.sampling_params(max_tokens, logprobs=top if req.logprobs else None)
    try:
        job = start_job(state, key, "chat", "chatcmpl", [prompt], params)
    except UserError as e:  # the prompt is the messages here
        raise UserError(str(e), param="messages" if e.param == "prompt" else e.param) from e

    def content_logprobs(c: CompletionOutput, start: int, end: int) -> dict | None:
        if not req.logprobs:
            return None
        lps = c.logprobs or []
        items = []
        for t, entry in zip(c.token_ids[start:end], lps[start:end], strict=False):
            s = _token_str(tok, t)
            tops = [
                {"token": (ts := _token_str(tok, tid)), "logprob": lp, "bytes": list(ts.encode())}
                for tid, lp in entry["top"].items()
            ][:top]
            items.append(
                {
                    "token": s,
                    "logprob": entry["logprob"],
                    "bytes": list(s.encode()),
                    "top_logprobs": tops,
                }
            )
        return {"content": items}

    if req.stream:

        async def chunks() -> AsyncIterator[dict]:
            n = params.n
            yield job_chunk(
                job,
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ],
            )
            async with aclosing(job.outputs()) as outputs:
                async for out in outputs:
                    raise_output_error(out)
                    sent = []
                    for c in out.outputs:
                        choice, delta, start, end = new_output(job, out, c)
                        reason = choice.finish_reason if c.finish_reason is not None else None
                        if not delta and (end == start or not req.logprobs) and reason is None:
                            continue  # nothing the client can see (text held back)
                        sent.append(
                            {
                                "index": choice.index,
                                "delta": {"content": delta} if delta else {},
                                "logprobs": content_logprobs(c, start, end),
                                "finish_reason": reason,
                            }
                        )
                    if sent:
                        yield job_chunk(job, sent)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_response(job, chunks(), include_usage)

    try:
        out = (await collect(job, request))[job.request_ids[0]]
        raise_output_error(out)
        choices = []
        for c in out.outputs:
            choice, _, start, end = new_output(job, out, c)
            choices.append(
                {
                    "index": choice.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": content_logprobs(c, 0, end),
                    "finish_reason": choice.finish_reason,
                }
            )
        return JSONResponse(
            {
                "id": job.id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": state.model_name,
                "choices": choices,
                "usage": job.usage(),
            }
        )
    finally:
        job.finish()


# -- parallm serve -----------------------------------------------------------------------------


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"--host: {host!r} does not resolve ({e.strerror})") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise UserError(f"--port: {port} on {host} cannot be used ({e.strerror})") from e


def serve(args: argparse.Namespace) -> int:
    """Load the model (errors exit 2 before the port is bound), then run uvicorn until stopped."""
    import uvicorn

    for name, low, high in (
        ("port", 0, 65535),
        ("max_waiting", 1, None),
        ("max_body_bytes", 1, None),
    ):
        value = getattr(args, name)
        if value < low or (high is not None and value > high):
            valid = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise UserError(f"--{name.replace('_', '-')}: {value} is not valid; must be {valid}")
    _check_port_free(args.host, args.port)  # before minutes of loading, not after
    kv = args.kv_cache_memory
    if kv is not None and kv > 1:
        kv = int(kv)
    config = EngineConfig(
        max_model_len=args.max_model_len,
        kv_cache_memory=kv,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        dtype=args.dtype,
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        attention_backend=args.attention_backend,
    )
    keystore = None if args.no_auth else KeyStore(args.db)
    engine = LLMEngine(args.model, config)
    if not engine.is_driver:  # a torchrun rank > 0 has served rank 0's steps and is done
        return 0
    state = ServerState(
        engine=AsyncEngine(engine, max_waiting=args.max_waiting),
        model_name=args.served_model_name or args.model,
        keystore=keystore,
        max_body_bytes=args.max_body_bytes,
    )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    own = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    app = build_app(state, ui_server_url=f"http://{own}:{args.port}" if args.ui else None)
    print(
        f"parallm serve: {state.model_name} on http://{args.host}:{args.port}"
        + (" (no auth)" if keystore is None else ""),
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    if keystore is not None:
        keystore.close()
    return 1 if state.engine.error else 0
