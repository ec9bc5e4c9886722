"""One API request as a job of engine requests (one per prompt), shared by /v1/completions and
/v1/chat/completions: the checks and the key's charge before queueing, what has been sent of each
choice, the final outputs of a non-streaming request, the SSE stream of a streaming one, and the
usage and metrics recorded once when it ends, however it ends, under the model the request named
(the base or a LoRA adapter). The prompts come checked and tokenized (`parallm.serve.prompts`).

A job that the server's drain cuts (`Job.cut`) ends like a failed one: a stream with an error
event and [DONE], a waiting request with a 503.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from parallm.errors import UserError
from parallm.inference.engine import CompletionOutput, RequestOutput
from parallm.inference.sampling import SamplingParams
from parallm.serve import access_log
from parallm.serve.async_engine import EngineDeadError, QueueFullError
from parallm.serve.common import APIError, engine_dead
from parallm.serve.keystore import KeyInfo
from parallm.serve.prompts import check_admission
from parallm.serve.protocol import error_body

if TYPE_CHECKING:
    from parallm.serve.state import ServerState


class ServerDraining(Exception):
    """The server is shutting down and its drain timeout ended this job before it finished."""


@dataclass
class Choice:
    """One choice (one sequence) as sent so far."""

    index: int
    prompt_tokens: int  # the prompt's tokens, counted on the first choice of each prompt only
    text_sent: int = 0  # characters of the output's text sent
    tokens_sent: int = 0  # output token ids sent (logprobs go with them)
    finish_reason: str | None = None
    first_token_at: float | None = None


@dataclass
class Job:
    """An API request's engine requests, with what has been sent of each choice."""

    state: ServerState
    key: KeyInfo | None
    endpoint: str
    id: str
    params: SamplingParams
    prompts: list[list[int]]
    reserved: int  # tokens reserved in the key's tpm window
    lora: str | None = None  # the adapter the request named; None: the base model
    arrival: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    choices: dict[tuple[int, int], Choice] = field(default_factory=dict)
    recorded: bool = False

    @property
    def model(self) -> str:
        """The model name the request gave: the base's or the adapter's."""
        return self.lora or self.state.model_name

    @property
    def request_ids(self) -> list[str]:
        return [f"{self.id}-{i}" for i in range(len(self.prompts))]

    def choice(self, out: RequestOutput, c: CompletionOutput) -> Choice:
        p = prompt_index(out)
        found = self.choices.get((p, c.index))
        if found is None:
            n = self.params.n
            tokens = len(self.prompts[p]) if c.index == 0 else 0
            found = self.choices[(p, c.index)] = Choice(p * n + c.index, tokens)
        return found

    def outputs(self) -> AsyncIterator[RequestOutput]:
        return self.state.engine.stream(self.request_ids, self.queue)

    def cut(self, why: str) -> None:
        """End the job where it stands (the server's drain timeout): its outputs end with
        `ServerDraining`, so a stream sends an error event and [DONE] after what it has sent,
        and a waiting request answers 503; its engine requests are aborted as it ends."""
        self.queue.put_nowait(ServerDraining(why))

    def finish(self) -> None:
        """Record usage and metrics once, whatever ended the request."""
        if self.recorded:
            return
        self.recorded = True
        self.state.jobs.pop(self.id, None)
        access_log.note_usage(self.usage())
        state = self.state
        now = time.monotonic()
        for c in self.choices.values():
            ttft = None if c.first_token_at is None else c.first_token_at - self.arrival
            state.metrics.finished(
                model=self.model,
                reason=c.finish_reason or "abort",
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.tokens_sent,
                ttft=ttft,
                e2e=now - self.arrival,
            )
        if self.key is not None:
            usage = self.usage()
            prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
            state.limiter.commit(self.key.id, prompt + completion, self.reserved)
            assert state.keystore is not None
            state.in_background(
                state.keystore.record_usage,
                self.key.id,
                request_id=self.id,
                model=self.model,
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


def prompt_index(out: RequestOutput) -> int:
    """Which prompt of its job an engine request ("<job id>-<index>") serves."""
    return int(out.request_id.rsplit("-", 1)[1])


# -- a job ----------------------------------------------------------------------------------------


def start_job(
    state: ServerState,
    key: KeyInfo | None,
    endpoint: str,
    id_prefix: str,
    ids: list[list[int]],
    params: SamplingParams,
    lora: str | None,
) -> Job:
    """Check every prompt's `max_tokens` against the context (the prompts are token ids that
    `prompts.prompt_ids` or `prompts.encode_prompt` checked, off the event loop for long ones), charge the key,
    queue the engine requests (through the adapter `lora`, None for the base). 503 once the
    server's drain has ended the running jobs."""
    if state.cut:
        raise draining_error()
    for p in ids:
        check_admission(state.llm, len(p), params.max_tokens)
    reserved = sum(len(p) for p in ids) + len(ids) * params.n * params.max_tokens
    if key is not None:
        _check_fits(key, reserved, ids, params)
        _charge(state, key, reserved)
    job_id = f"{id_prefix}-{uuid.uuid4().hex}"
    job = Job(state, key, endpoint, job_id, params, ids, reserved, lora)
    try:
        state.engine.add(
            [(rid, p, params, lora) for rid, p in zip(job.request_ids, ids, strict=True)],
            job.queue,
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
        raise engine_dead(e) from e
    state.jobs[job.id] = job
    return job


def draining_error() -> APIError:
    """The 503 of a request the shutting-down server does not take (`Retry-After`: another
    server, or this one restarted, may take it)."""
    return APIError(
        503,
        "the server is shutting down; retry the request",
        "server_error",
        code="server_shutting_down",
        headers={"Retry-After": "1", "Connection": "close"},
    )


def _check_fits(key: KeyInfo, reserved: int, ids: list[list[int]], params: SamplingParams) -> None:
    """400 naming the limit when the request could never fit the key's tokens per minute (a 429
    would promise a retry that can never succeed)."""
    if key.tpm is None or reserved <= key.tpm:
        return
    prompt = sum(len(p) for p in ids)
    raise UserError(
        f"max_tokens: the request may use {reserved} tokens ({prompt} prompt + "
        f"{len(ids) * params.n} choices x max_tokens {params.max_tokens}), over key {key.id}'s "
        f"limit of {key.tpm} tokens per minute (tpm); lower max_tokens or n, or shorten the prompt",
        param="max_tokens",
    )


def _charge(state: ServerState, key: KeyInfo, reserved: int) -> None:
    """Reserve `reserved` tokens in the key's tpm window and one request in its rpm window;
    429 when either is full."""
    wait = state.limiter.check(key, reserved)  # over the whole tpm: `_check_fits` answered 400
    if wait is not None:
        raise APIError(
            429,
            f"rate limit of key {key.id} reached (rpm {key.rpm}, tpm {key.tpm}); "
            f"retry in {math.ceil(wait)} s",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


def max_tokens_for(
    requested: int | None, ids: list[list[int]], n: int, key: KeyInfo | None, state: ServerState
) -> int:
    """None: as many as the context leaves after the longest prompt and, for a key with a
    tokens-per-minute limit, as many as its whole window leaves once the prompts are paid for
    (`n` choices each), so that leaving max_tokens out never makes a request that cannot fit;
    at least 1, so that a too long prompt gets the prompt's error, not max_tokens'."""
    if requested is not None:
        return requested
    most = state.llm.max_model_len - max(len(p) for p in ids)
    if key is not None and key.tpm is not None:
        most = min(most, (key.tpm - sum(len(p) for p in ids)) // (len(ids) * n))
    return max(1, most)


# -- a non-streaming job --------------------------------------------------------------------------


async def collect(job: Job, request: Request) -> dict[str, RequestOutput]:
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
        raise engine_dead(e) from e
    except ServerDraining as e:
        raise APIError(
            503, str(e), "server_error", code="server_shutting_down", headers={"Retry-After": "1"}
        ) from e
    finally:
        task.cancel()
    return finals


def raise_output_error(out: RequestOutput) -> None:
    if out.error is not None:  # checked before queueing; a request can still fail in the engine
        raise APIError(400, out.error, code="request_failed")


def new_output(job: Job, out: RequestOutput, c: CompletionOutput) -> tuple[Choice, str, int, int]:
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


def token_str(tok: Any, token_id: int) -> str:
    """One token as text, special tokens included (for logprobs)."""
    return tok.decode([token_id], skip_special_tokens=False)


# -- a streaming job ------------------------------------------------------------------------------


# Characters that `str.splitlines` (and so httpx's and many SSE clients' line readers) treat as
# line breaks but JSON leaves unescaped: a token decoding to one would cut its event in two.
_LINE_BREAKS = {ch: f"\\u{ord(ch):04x}" for ch in ("\x85", "\u2028", "\u2029")}


def sse(payload: dict | str) -> str:
    """One Server-Sent Event: `data: <JSON>` (UTF-8, with line-breaking characters escaped)."""
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    data = json.dumps(payload, ensure_ascii=False)
    for ch, escaped in _LINE_BREAKS.items():
        data = data.replace(ch, escaped)
    return f"data: {data}\n\n"


def job_chunk(job: Job, choices: list[dict], *, usage: dict | None = None) -> dict:
    """A streamed chunk of `job` carrying `choices` (and `usage`)."""
    chat = job.endpoint == "chat"
    chunk = {
        "id": job.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


class _JobStream(StreamingResponse):
    """A stream that closes its job however the response ends, even when the client left
    before the first byte (then the body is never iterated)."""

    def __init__(self, job: Job, content: AsyncIterator[str]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


def stream_response(job: Job, chunks: AsyncIterator[dict], include_usage: bool) -> Response:
    """`chunks` as server-sent events, then the usage (when asked for) and [DONE]; an error
    after the stream began is sent as an event carrying the error body."""

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
        except ServerDraining as e:  # what was sent stands; the client learns why it ends here
            if include_usage:  # what it is billed: before the error, which ends most clients
                yield sse(job_chunk(job, [], usage=job.usage()))
            yield sse(error_body(str(e), "server_error", code="server_shutting_down"))
            yield sse("[DONE]")
        except APIError as e:
            yield sse(error_body(e.message, e.type, e.param, e.code))
        finally:
            job.finish()

    return _JobStream(job, body())
