"""/v1/completions: one or more prompts (text or token ids), `n` choices each; `echo` with
`max_tokens: 0` scores a prompt (its log-probabilities) without generating."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from parallm.errors import UserError
from parallm.inference.engine import CompletionOutput, RequestOutput
from parallm.inference.sampling import TokenLogprobs
from parallm.serve.common import authorize, check_model, read_body, state_of
from parallm.serve.jobs import (
    Job,
    collect,
    job_chunk,
    max_tokens_for,
    new_output,
    prompt_index,
    raise_output_error,
    start_job,
    stream_response,
    token_str,
)
from parallm.serve.prompts import check_n, off_loop, prompt_ids
from parallm.serve.protocol import CompletionRequest, parse

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = state_of(request)
    key = await authorize(state, request)
    req = parse(CompletionRequest, await read_body(state, request))
    lora = check_model(state, req.model)
    llm = state.llm
    prompts = req.prompts()
    if req.max_tokens == 0 and not req.echo:
        raise UserError("max_tokens: 0 is not valid; must be >= 1 (0 only with echo)")
    check_n(state, req.n, req.best_of)
    ids = await prompt_ids(state, prompts)
    scoring = req.max_tokens == 0  # echo the prompt (and its logprobs), generate nothing
    max_tokens = 1 if scoring else max_tokens_for(req.max_tokens, ids, req.n, key, state)
    want_prompt_lps = req.echo and req.logprobs is not None
    params = req.sampling_params(
        max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if want_prompt_lps else None,
    )
    tok = llm.tokenizer
    prompt_texts = await off_loop(sum(map(len, ids)), _echoed, tok, prompts, ids, req.echo)
    job = start_job(state, key, "completions", "cmpl", ids, params, lora)
    view = _Choices(job, req, tok, prompt_texts, scoring)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_response(job, _chunks(view, want_prompt_lps), include_usage)
    return await _response(view, request)


def _echoed(
    tok: Any, prompts: list[str | list[int]], ids: list[list[int]], echo: bool
) -> list[str]:
    """The text each prompt is echoed as (token ids decoded; nothing without `echo`)."""
    if not echo:
        return ["" for _ in prompts]
    return [p if isinstance(p, str) else tok.decode(i) for p, i in zip(prompts, ids, strict=True)]


@dataclass
class _Choices:
    """Turns engine outputs into the choices of a completion response or chunk."""

    job: Job
    req: CompletionRequest
    tok: Any
    prompt_texts: list[str]
    scoring: bool
    prompt_lps: dict[int, dict] = field(default_factory=dict)  # echoed, by prompt index

    async def prepare(self, out: RequestOutput) -> None:
        """Before `choice` for `out`: its echoed prompt's log-probabilities, made once per
        prompt and off the event loop for a long one (a decode per prompt token)."""
        p = prompt_index(out)
        if self.req.echo and self.req.logprobs is not None and p not in self.prompt_lps:
            ids = self.job.prompts[p]
            lps = out.prompt_logprobs or []
            self.prompt_lps[p] = await off_loop(len(ids), _completion_logprobs, self.tok, lps, ids)

    def choice(self, out: RequestOutput, c: CompletionOutput, final: bool) -> dict | None:
        """What the client has not seen of choice `c`; None when there is nothing it could see
        (text held back) and the request goes on."""
        job, req, tok = self.job, self.req, self.tok
        p = prompt_index(out)
        first_send = (p, c.index) not in job.choices
        choice, text, start, end = new_output(job, out, c)
        if self.scoring:  # the generated token is never shown, nor counted
            choice.tokens_sent, text, start, end = 0, "", 0, 0
            choice.finish_reason = "length"
        lps = None
        if req.logprobs is not None:
            lps = _completion_logprobs(
                tok, c.logprobs[start:end] if c.logprobs else [], c.token_ids[start:end]
            )
        if req.echo and first_send:
            text = self.prompt_texts[p] + text
            if lps is not None:
                lps = _merge_logprobs(self.prompt_lps[p], lps)
        reason = choice.finish_reason if (c.finish_reason is not None or final) else None
        shown = text or (end > start and lps is not None) or reason is not None
        if not final and not shown:
            return None
        return {"index": choice.index, "text": text, "logprobs": lps, "finish_reason": reason}


async def _chunks(view: _Choices, want_prompt_lps: bool) -> AsyncIterator[dict]:
    job = view.job
    async with aclosing(job.outputs()) as outputs:
        async for out in outputs:
            raise_output_error(out)
            if want_prompt_lps and out.prompt_logprobs is None:
                continue  # echo waits for the prompt's log-probabilities
            await view.prepare(out)
            sent = [view.choice(out, c, False) for c in out.outputs]
            sent = [c for c in sent if c is not None]
            if sent:
                yield job_chunk(job, sent)


async def _response(view: _Choices, request: Request) -> Response:
    job = view.job
    try:
        finals = await collect(job, request)
        choices = []
        for rid in job.request_ids:
            out = finals[rid]
            raise_output_error(out)
            await view.prepare(out)
            choices += [view.choice(out, c, True) for c in out.outputs]
        return JSONResponse(
            {
                "id": job.id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": job.model,
                "choices": sorted(choices, key=lambda c: c["index"]),
                "usage": job.usage(),
            }
        )
    finally:
        job.finish()


def _completion_logprobs(tok: Any, lps: list[TokenLogprobs | None], token_ids: list[int]) -> dict:
    """The legacy completions `logprobs` object for these tokens."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for i, t in enumerate(token_ids):
        s = token_str(tok, t)
        entry = lps[i] if i < len(lps) else None
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(entry["logprob"])
        top = {token_str(tok, tid): lp for tid, lp in entry["top"].items()}
        top.setdefault(s, entry["logprob"])
        tops.append(top)
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
