"""A request's prompts before its job starts: the bounds checked first (`--max-n`, and
`--max-prompt-chars` before any tokenizing), then token ids checked against the context and
the vocabulary, made off the event loop when the input is large.

A multi-megabyte prompt never holds the event loop: tokenizing (with `tokenizers`' batch call,
which releases the GIL), rendering a chat template and decoding an echoed prompt run in a small
pool of lower-priority threads once the input is larger than a few thousand characters; and a
prompt of millions of tokens is refused by its count, without a Python list of its ids.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from parallm.errors import UserError
from parallm.inference.sampling import SamplingParams

if TYPE_CHECKING:
    from parallm.inference.engine import LLMEngine
    from parallm.serve.state import ServerState

T = TypeVar("T")

# Characters (or token ids) handled on the event loop: tokenizing 4096 characters takes a few
# milliseconds; anything larger goes to the pool, so that one large request never holds the
# others, and a few large ones never take the threads the key store's lookups run in.
INLINE_CHARS = 4096


def _lower_priority() -> None:
    """A pool thread's start: a lower CPU priority than the event loop's and the engine's
    threads (Linux schedules threads by their own nice value), so that on a busy machine a
    large prompt's tokenizing waits for them rather than they for it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux: the same priority
        pass


_PREP_POOL = ThreadPoolExecutor(4, thread_name_prefix="parallm-prep", initializer=_lower_priority)
# The default of --max-prompt-chars: characters per token of context. Text averages 3-5, code a
# little more; only prompts of long runs of spaces or symbols come near 16 per token.
CHARS_PER_TOKEN = 16


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, on the event loop for an input of at most `INLINE_CHARS` characters (or
    token ids), else in the worker pool (the loop serves other requests meanwhile)."""
    if size <= INLINE_CHARS:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_PREP_POOL, fn, *args)


_PROMPT_ONLY = SamplingParams(max_tokens=1)  # a prompt's own checks; max_tokens' come later


def encode_prompt(llm: LLMEngine, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """`text`'s token ids, checked as a prompt: not empty, in the vocabulary, fitting the
    context (else a UserError naming `prompt`).

    Tokenized with a batch call, as `tokenizers` releases the GIL in those (not in its single
    `encode`): the event loop runs while a worker tokenizes megabytes. The fast one (tokenizers
    >= 0.20) skips the offsets, a third of the time; and the count comes before the ids, so a
    prompt of millions of tokens is refused without making a Python list of them."""
    if not text:  # as the engine has it: an empty prompt, not a lone BOS
        return llm.check_request([], _PROMPT_ONLY)
    backend = llm.tokenizer.backend
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encoding = batch([text], add_special_tokens=add_special_tokens)[0]
    check_admission(llm, len(encoding), 1)
    return llm.check_request(encoding.ids, _PROMPT_ONLY)


def check_admission(llm: LLMEngine, tokens: int, max_tokens: int) -> None:
    """A UserError unless a prompt of `tokens` tokens and `max_tokens` fit the context (no
    pass over the ids: the engine's own check, by length only)."""
    found = llm.admission_error(tokens, max_tokens) if tokens else None
    if found is not None:
        raise UserError(found[1], param=found[0])


def prompt_char_limit(state: ServerState) -> int:
    """--max-prompt-chars, by default `CHARS_PER_TOKEN` per token of the context."""
    return state.max_prompt_chars or CHARS_PER_TOKEN * state.llm.max_model_len


def check_prompt_chars(state: ServerState, chars: int, param: str, what: str) -> None:
    """400 naming `param` when a prompt of `chars` characters is over --max-prompt-chars."""
    limit = prompt_char_limit(state)
    if chars > limit:
        default = "" if state.max_prompt_chars else f" ({CHARS_PER_TOKEN} per token of context)"
        raise UserError(
            f"{param}: {what} has {chars} characters, over this server's limit of {limit}"
            f"{default} (--max-prompt-chars); shorten it",
            param=param,
        )


def check_n(state: ServerState, n: int, best_of: int | None = None) -> None:
    """400 naming `n` or `best_of` when it asks for more choices than --max-n."""
    for name, value in (("n", n), ("best_of", best_of)):
        if value is not None and value > state.max_n:
            raise UserError(
                f"{name}: {value} is over this server's limit of {state.max_n} choices per "
                f"prompt (--max-n); give at most {state.max_n}",
                param=name,
            )


async def prompt_ids(state: ServerState, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt's token ids, checked against the context (a UserError naming `prompt`); text
    over --max-prompt-chars is refused before it is tokenized, large inputs are tokenized off
    the event loop."""
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_prompt_chars(state, len(p), "prompt", "the prompt" if i == 0 else f"prompt {i}")
    size = sum(len(p) for p in prompts)
    return await off_loop(size, _prompt_ids, state.llm, prompts)


def _prompt_ids(llm: LLMEngine, prompts: list[str | list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(encode_prompt(llm, p))
        else:  # the length first: millions of ids are refused without a pass over them
            check_admission(llm, len(p), 1)
            out.append(llm.check_request(p, _PROMPT_ONLY))
    return out
