"""The engine in a process of its own, behind the server's event loop (`parallm serve`'s default).

Why a process: in the server's process the engine thread shares the GIL with the event loop, so
every HTTP chunk the loop writes delays a model step and every step's eager ops delay the loop;
measured on a 2-core machine, the served time per output token was twice the offline engine's
step. vLLM splits its API server from its engine core the same way. Here the engine process runs
`LLMEngine` steps back to back on its own core(s), and the server's process tokenizes, checks,
streams and keeps the keys.

The protocol is a `multiprocessing` pipe of tuples. To the engine: `("add", requests)`,
`("abort", request_id)`, `("call", call_id, fn)` (`fn(engine)` between two steps; it must
pickle: a module-level function or a `functools.partial` of one) and `("stop",)`; they are
applied in the order sent, before the next step. From it: `("ready", EngineFacts, stats)` once loaded
(or `("error", message, param)` for a user's error and `("crash", message)` for anything else,
and it exits); then per step `("step", deltas, stats, taken, adapters)`, per call `("result",
call_id, value, error, adapters)`, and `("dead", message)` if a step failed (it exits then).

A step's outputs travel as deltas (`OutputDeltas`): the text, token ids and log-probabilities
added since the request's previous output, its prompt once. `OutputAssembler` on the server's
side rebuilds the cumulative `RequestOutput`s the in-process engine gives, so the endpoints do
not know where the engine runs. The engine process ignores SIGINT and SIGTERM (the server drains
first, then says stop) and ends when its pipe closes (the server exited, however it did).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from parallm.errors import UserError
from parallm.inference.adapters import AdapterRegistry
from parallm.inference.config import EngineConfig
from parallm.inference.engine import CompletionOutput, LLMEngine, RequestChecks, RequestOutput
from parallm.inference.scheduler import SchedulerConfig
from parallm.serve.async_engine import (
    EngineDeadError,
    EngineFrontend,
    EngineRequest,
    engine_stats,
    settle,
)
from parallm.serve.child import end_child
from parallm.tokenizer import Tokenizer

# A load that answers neither ready nor error in this time has hung (minutes of weights are fine).
LOAD_TIMEOUT_S = 3600.0
STOP_TIMEOUT_S = 60.0  # for the engine process to end its step and exit when told to


@dataclass(frozen=True)
class EngineFacts:
    """What the server's process needs of the loaded engine to check requests without it."""

    vocab_size: int
    max_model_len: int
    scheduler_config: SchedulerConfig
    lora_enabled: bool
    adapters: AdapterRegistry

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineFacts:
        return cls(
            vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            scheduler_config=engine.scheduler_config,
            lora_enabled=engine.lora_enabled,
            adapters=engine.adapters,
        )


class EngineView(RequestChecks):
    """The server's stand-in for an `LLMEngine` in another process: the same request checks
    (`RequestChecks`), tokenizer and limits, and the adapters as the engine last reported them."""

    def __init__(self, facts: EngineFacts, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = facts.vocab_size
        self.max_model_len = facts.max_model_len
        self.scheduler_config = facts.scheduler_config
        self.lora_enabled = facts.lora_enabled
        self.adapters = facts.adapters


# -- outputs as deltas ------------------------------------------------------------------------


@dataclass
class _Sent:
    """What has been sent of one request: per completion, its text and counts."""

    texts: list[str]
    tokens: list[int]
    logprobs: list[int]
    prompt_logprobs: bool = False


class OutputDeltas:
    """In the engine process: each `RequestOutput` as what changed since the request's last."""

    def __init__(self) -> None:
        self.sent: dict[str, _Sent] = {}

    def encode(self, out: RequestOutput) -> tuple:
        sent = self.sent.get(out.request_id)
        head = None
        if sent is None:
            head = (out.prompt, out.prompt_token_ids)
            sent = _Sent([], [], [])
        completions = []
        for c in out.outputs:
            i = c.index
            if i == len(sent.texts):
                sent.texts.append("")
                sent.tokens.append(0)
                sent.logprobs.append(0)
            # Text only grows (held-back characters are not in it yet); if not, send it whole.
            keep = len(sent.texts[i]) if c.text.startswith(sent.texts[i]) else 0
            lps = None if c.logprobs is None else c.logprobs[sent.logprobs[i] :]
            completions.append(
                (i, keep, c.text[keep:], c.token_ids[sent.tokens[i] :], c.finish_reason, lps)
            )
            sent.texts[i], sent.tokens[i] = c.text, len(c.token_ids)
            sent.logprobs[i] = len(c.logprobs or ())
        prompt_lps = None
        if out.prompt_logprobs is not None and not sent.prompt_logprobs:
            prompt_lps, sent.prompt_logprobs = out.prompt_logprobs, True
        if out.finished:
            self.sent.pop(out.request_id, None)
        else:
            self.sent[out.request_id] = sent
        return (out.request_id, head, completions, out.finished, out.error, prompt_lps)


class OutputAssembler:
    """In the server's process: the cumulative `RequestOutput` of each delta."""

    def __init__(self) -> None:
        self.live: dict[str, RequestOutput] = {}

    def apply(self, delta: tuple) -> RequestOutput:
        request_id, head, completions, finished, error, prompt_lps = delta
        last = self.live.get(request_id)
        if last is None:
            assert head is not None, f"request {request_id}: a delta before its first output"
            last = RequestOutput(request_id, head[0], head[1], [])
        outputs = list(last.outputs)
        for i, keep, text, tokens, reason, lps in completions:
            if i == len(outputs):
                outputs.append(CompletionOutput(i, "", [], None, None if lps is None else []))
            prev = outputs[i]
            # The lists grow in place, as the engine's own outputs' do: no copy per step.
            prev.token_ids.extend(tokens)
            if lps is not None:
                prev.logprobs.extend(lps)
            outputs[i] = CompletionOutput(
                i, prev.text[:keep] + text, prev.token_ids, reason, prev.logprobs
            )
        out = RequestOutput(
            request_id,
            last.prompt,
            last.prompt_token_ids,
            outputs,
            finished=finished,
            error=error,
            prompt_logprobs=prompt_lps if prompt_lps is not None else last.prompt_logprobs,
        )
        if finished:
            self.live.pop(request_id, None)
        else:
            self.live[request_id] = out
        return out


# -- the engine process -----------------------------------------------------------------------


def load_engine(
    model: str, config: EngineConfig, adapters: dict[str, str], threads: int | None
) -> LLMEngine:
    """`LLMEngine(model, config)` on `threads` torch threads (None: torch's choice) with the
    `--lora` adapters loaded, or its error and nothing left running."""
    if threads is not None:
        torch.set_num_threads(threads)
    engine = LLMEngine(model, config)
    try:
        for name, path in adapters.items():
            engine.add_lora(name, path, field=f"--lora {name}")
    except BaseException:
        engine.close()
        raise
    return engine


def run(
    conn: Connection,
    model: str,
    config: EngineConfig,
    adapters: dict[str, str],
    threads: int | None,
) -> None:
    """The engine process's main: load, say ready, then step until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = load_engine(model, config, adapters, threads)
    except UserError as e:
        _tell(conn, ("error", str(e), e.param))
        return
    except Exception as e:  # a bug or a broken install: the server exits with it
        traceback.print_exc()
        _tell(conn, ("crash", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ready", EngineFacts.of(engine), engine_stats(engine)))
        _EngineLoop(conn, engine).run()
    finally:
        engine.close()


def _tell(conn: Connection, message: tuple) -> None:
    """Send a last word to the server, if it is still there to hear it."""
    try:
        conn.send(message)
    except OSError:
        pass


class _EngineLoop:
    """Steps the engine while it has requests; a thread takes the server's messages meanwhile,
    so that the server never waits on a full pipe while a step runs."""

    def __init__(self, conn: Connection, engine: LLMEngine) -> None:
        self.conn, self.engine = conn, engine
        self.deltas = OutputDeltas()
        self.inbox: list[tuple] = []
        self.wake = threading.Condition()
        self.taken = 0  # requests added to the engine so far
        threading.Thread(target=self._receive, name="parallm-engine-inbox", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server is gone
                message = ("stop",)
            with self.wake:
                self.inbox.append(message)
                self.wake.notify()
            if message[0] == "stop":
                return

    def run(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):  # the server is gone: nobody to tell
            pass

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self.wake:
                while not self.inbox and not engine.has_unfinished_requests():
                    self.wake.wait()
                inbox, self.inbox = self.inbox, []
            for message in inbox:
                if message[0] == "stop":
                    return
                self._apply(message)
            try:
                outputs = engine.step()
            except BaseException as e:
                traceback.print_exc()
                self.conn.send(("dead", f"{type(e).__name__}: {e}"))
                raise
            deltas = [self.deltas.encode(out) for out in outputs]
            adapters = engine.adapters if engine.lora_enabled else None
            self.conn.send(("step", deltas, engine_stats(engine), self.taken, adapters))

    def _apply(self, message: tuple) -> None:
        kind, engine = message[0], self.engine
        if kind == "add":
            for request_id, prompt, params, lora in message[1]:
                engine.add_request(request_id, prompt, params, lora=lora)
            self.taken += len(message[1])
        elif kind == "abort":
            engine.abort_request(message[1])
        elif kind == "call":
            call_id, fn = message[1], message[2]
            try:
                value = fn(engine)
            except UserError as e:
                self.conn.send(("result", call_id, None, (str(e), e.param), engine.adapters))
            except BaseException as e:  # the engine's failure: it may be half-changed
                traceback.print_exc()
                self.conn.send(("dead", f"{type(e).__name__}: {e}"))
                raise
            else:
                self.conn.send(("result", call_id, value, None, engine.adapters))


# -- the server's side --------------------------------------------------------------------------


class EngineProcess(EngineFrontend):
    """`LLMEngine(model, config)` in a spawned process, with the `--lora` adapters loaded there.

    `spawn()` starts it (the model loads while the caller goes on), `wait_loaded()` blocks
    until it has (a UserError with the engine's message if it could not); `start()` (in the
    event loop) takes its messages; `stop()` ends it. If it fails or exits, every open request
    ends with `EngineDeadError` and `error` says why.
    """

    def __init__(
        self,
        model: str,
        config: EngineConfig,
        *,
        adapters: dict[str, str] | None = None,
        threads: int | None = None,
        max_waiting: int,
    ) -> None:
        super().__init__(max_waiting=max_waiting)
        self.model, self.config = model, config
        self.adapters, self.threads = adapters or {}, threads
        self.engine: EngineView | None = None
        self._process: Any = None
        self._conn: Connection | None = None
        self._assembler = OutputAssembler()
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._handed = 0  # requests sent; the engine reports how many it has taken
        self._taken = 0

    # -- life cycle ----------------------------------------------------------------------------

    def spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        ours, theirs = ctx.Pipe()
        # Not a daemon: with tensor parallelism the engine starts worker processes of its own.
        self._process = ctx.Process(
            target=run,
            args=(theirs, self.model, self.config, self.adapters, self.threads),
            name="parallm-engine",
        )
        self._process.start()
        theirs.close()
        self._conn = ours

    def wait_loaded(self) -> None:
        """Block until the engine has loaded; the server's view of it is `engine` then."""
        assert self._conn is not None, "spawn() first"
        try:
            if not self._conn.poll(LOAD_TIMEOUT_S):
                message: tuple = ("crash", f"no answer in {LOAD_TIMEOUT_S:.0f} s")
            else:
                message = self._conn.recv()
        except (EOFError, OSError):
            message = ("crash", f"the engine process exited ({self._exit_code()}) while loading")
        except BaseException:
            self._end_process()
            raise
        if message[0] == "ready":
            try:  # the engine read it already: no error of the directory's is left for this
                tokenizer = Tokenizer.from_dir(self.model)
            except BaseException:
                self.stop()
                raise
            self.engine = EngineView(message[1], tokenizer)
            self.stats = message[2]
            return
        self._end_process()
        if message[0] == "error":
            raise UserError(message[1], param=message[2])
        raise RuntimeError(f"the engine process failed to load {self.model}: {message[1]}")

    def start(self) -> None:
        assert self._conn is not None and self.engine is not None, "wait_loaded() first"
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def stop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(("stop",))
            except OSError:  # gone already
                pass
        self._end_process()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._process is not None and self._process.is_alive()

    def _exit_code(self) -> int | None:
        if self._process is None:
            return None
        self._process.join(5)
        return self._process.exitcode

    def _end_process(self) -> None:
        end_child(self._process, self._conn, self._loop, wait=STOP_TIMEOUT_S, terminate=False)
        self._process = self._conn = None

    # -- requests (event loop side) ------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        if self.error is not None:
            raise EngineDeadError(self.error)
        assert self._conn is not None, "the engine process is not running"
        try:
            self._conn.send(message)
        except OSError as e:  # the process is gone; its EOF tells the loop soon
            raise EngineDeadError(f"the engine process is gone ({e})") from e

    def _submit(self, requests: list[EngineRequest]) -> None:
        self._send(("add", requests))
        self._handed += len(requests)

    def _pending(self) -> int:
        return self._handed - self._taken

    def abort(self, request_id: str) -> None:
        if self.error is None:  # a dead engine has ended every request already
            try:
                self._send(("abort", request_id))
            except EngineDeadError:
                pass

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        if self.error is not None:
            raise EngineDeadError(self.error)
        assert self._loop is not None, "the engine process is not started"
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self._loop.create_future()
        try:
            self._send(("call", call_id, fn))
        except BaseException:
            del self._calls[call_id]
            raise
        return await future

    # -- the engine's messages (event loop) ----------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while self._conn is not None and self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._died(f"the engine process exited ({self._exit_code()})")

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, deltas, self.stats, self._taken, adapters = message
            self._set_adapters(adapters)
            self._put([self._assembler.apply(delta) for delta in deltas])
        elif kind == "result":
            _, call_id, value, error, adapters = message
            self._set_adapters(adapters)
            future = self._calls.pop(call_id)
            settle(future, value, None if error is None else UserError(error[0], param=error[1]))
        elif kind == "dead":
            self._died(message[1])

    def _set_adapters(self, adapters: AdapterRegistry | None) -> None:
        if adapters is not None and self.engine is not None:
            self.engine.adapters = adapters

    def _died(self, why: str) -> None:
        if self.error is not None:
            return
        self.error = why
        print(f"parallm serve: the engine failed: {why}", file=sys.stderr, flush=True)
        calls, self._calls = list(self._calls.values()), {}
        self._fail(EngineDeadError(why), calls)
        if self._conn is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
