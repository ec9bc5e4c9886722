"""/v1/chat/completions: the messages rendered with the model's chat template, `n` choices."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from parallm.errors import UserError
from parallm.inference.engine import CompletionOutput
from parallm.serve.common import authorize, check_model, read_body, state_of
from parallm.serve.jobs import (
    Job,
    collect,
    job_chunk,
    max_tokens_for,
    new_output,
    raise_output_error,
    start_job,
    stream_response,
    token_str,
)
from parallm.serve.prompts import check_n, check_prompt_chars, encode_prompt, off_loop
from parallm.serve.protocol import ChatCompletionRequest, parse

if TYPE_CHECKING:
    from parallm.serve.state import ServerState

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    key = await authorize(state, request)
    body = await read_body(state, request)
    req = parse(ChatCompletionRequest, body)
    lora = check_model(state, req.model)
    tok = state.llm.tokenizer
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise UserError("max_completion_tokens: give it or max_tokens, not both")
    check_n(state, req.n)
    messages = req.rendered_messages()
    chars = sum(len(m["content"]) for m in messages)
    check_prompt_chars(state, chars, "messages", "the messages' content")
    # By the body's size: fields besides the content (a message's name, ...) reach the template.
    prompt = await off_loop(len(body), _render, state, req, messages)
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_tokens = max_tokens_for(requested, [prompt], req.n, key, state)
    top = req.top_logprobs or 0
    params = req.sampling_params(max_tokens, logprobs=top if req.logprobs else None)
    try:
        job = start_job(state, key, "chat", "chatcmpl", [prompt], params, lora)
    except UserError as e:  # the prompt is the messages here
        raise UserError(str(e), param="messages" if e.param == "prompt" else e.param) from e
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_response(job, _chunks(job, req, tok), include_usage)
    return await _response(job, req, tok, request)


def _render(state: ServerState, req: ChatCompletionRequest, messages: list[dict]) -> list[int]:
    """The prompt's token ids: the messages through the model's chat template (in a worker
    thread for large messages; the rendered text is bounded by --max-prompt-chars too)."""
    tok = state.llm.tokenizer
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
    except jinja2.TemplateError as e:
        raise UserError(f"messages: the model's chat template failed on them: {e}") from e
    check_prompt_chars(state, len(text), "messages", "the rendered prompt")
    try:
        return encode_prompt(state.llm, text, add_special_tokens=False)
    except UserError as e:  # the prompt is the messages here
        raise UserError(str(e), param="messages" if e.param == "prompt" else e.param) from e


def _content_logprobs(
    tok: Any, req: ChatCompletionRequest, c: CompletionOutput, start: int, end: int
) -> dict | None:
    """The chat `logprobs` object of tokens [start, end) of choice `c` (None unless asked)."""
    if not req.logprobs:
        return None
    top = req.top_logprobs or 0
    lps = c.logprobs or []
    items = []
    for t, entry in zip(c.token_ids[start:end], lps[start:end], strict=False):
        s = token_str(tok, t)
        tops = [
            {"token": (ts := token_str(tok, tid)), "logprob": lp, "bytes": list(ts.encode())}
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


async def _chunks(job: Job, req: ChatCompletionRequest, tok: Any) -> AsyncIterator[dict]:
    """The role first, for every choice; then each choice's new text as it comes."""
    first = {"role": "assistant", "content": ""}
    yield job_chunk(
        job,
        [
            {"index": i, "delta": first, "logprobs": None, "finish_reason": None}
            for i in range(job.params.n)
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
                        "logprobs": _content_logprobs(tok, req, c, start, end),
                        "finish_reason": reason,
                    }
                )
            if sent:
                yield job_chunk(job, sent)


async def _response(job: Job, req: ChatCompletionRequest, tok: Any, request: Request) -> Response:
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
                    "logprobs": _content_logprobs(tok, req, c, 0, end),
                    "finish_reason": choice.finish_reason,
                }
            )
        return JSONResponse(
            {
                "id": job.id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": job.model,
                "choices": choices,
                "usage": job.usage(),
            }
        )
    finally:
        job.finish()
