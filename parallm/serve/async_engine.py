"""The engine behind the HTTP server, as the endpoints see it (`EngineFrontend`), and
`AsyncEngine`: `LLMEngine` stepping in a thread of the server's process, fed from asyncio
(`parallm serve --engine-in-process`; by default the engine has a process of its own,
`parallm.serve.engine_process`, with the same frontend and the same guarantees).

The event loop never runs a model step. Requests and aborts are queued under a lock and applied
by the engine thread between two steps; each step's outputs are handed back to the event loop,
into one `asyncio.Queue` per request. So a request added or aborted while a step runs takes
effect at the next step, and an abort frees the request's KV blocks there. Other changes to the
engine (loading or unloading a LoRA adapter) are awaited with `call`, which runs them there too,
after that round's adds and aborts.

If a step raises, the engine is dead: every open request ends with `EngineDeadError`, `error`
says why, and new requests are refused. The server reports it on `/health` and answers 503.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from parallm.errors import UserError
from parallm.inference.engine import LLMEngine, RequestOutput
from parallm.inference.sampling import SamplingParams

# (request id, prompt, sampling parameters, LoRA adapter name or None for the base)
EngineRequest = tuple[str, str | list[int], SamplingParams, str | None]


class QueueFullError(Exception):
    """The waiting queue holds `max_waiting` requests already."""


class EngineDeadError(Exception):
    """The engine thread failed; no request can be served."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken by the engine thread after each step."""

    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int = 0  # of those, tokens found there

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class EngineFrontend:
    """What the server's endpoints hold of an engine, on the event loop: `add` requests, `stream`
    their outputs (one `asyncio.Queue` per request), `abort`, `call` a function where the engine
    runs, `stats` and `error`. `AsyncEngine` runs the engine in a thread of this process,
    `parallm.serve.engine_process.EngineProcess` in a process of its own; `engine` is the
    `LLMEngine` (or, from another process, its view) that the endpoints check requests with."""

    engine: Any

    def __init__(self, *, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.error: str | None = None
        self.stats = EngineStats()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def healthy(self) -> bool:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """`fn(engine)` run where the engine runs, between two steps; its result, or its
        exception. Anything but a UserError from it is the engine's failure too (it may have
        left the ranks disagreeing). EngineDeadError once the engine has failed."""
        raise NotImplementedError

    def _submit(self, requests: list[EngineRequest]) -> None:
        """Hand checked requests to the engine for its next step."""
        raise NotImplementedError

    def _pending(self) -> int:
        """Requests handed over that the engine has not taken yet (not in `stats.waiting`)."""
        raise NotImplementedError

    # -- requests (event loop side) ------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Add one request and yield its outputs until it finishes."""
        queue: asyncio.Queue = asyncio.Queue()
        self.add([(request_id, prompt, params, lora)], queue)
        async for out in self.stream([request_id], queue):
            yield out

    def add(self, requests: list[EngineRequest], queue: asyncio.Queue) -> None:
        """Queue requests (id, prompt, params, adapter) for the next step, all or none; their
        outputs will arrive in `queue`. QueueFullError or EngineDeadError if they cannot be
        taken."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        if self.stats.waiting + self._pending() + len(requests) > self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are waiting already")
        for request in requests:
            self._queues[request[0]] = queue
        self._submit(requests)

    async def stream(
        self, request_ids: list[str], queue: asyncio.Queue
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of requests that `add` queued on `queue`, in the order the steps make
        them, until all have finished. Leaving early (the client went away) aborts the rest."""
        unfinished = set(request_ids)
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            for request_id in request_ids:
                self._queues.pop(request_id, None)
            for request_id in unfinished:
                self.abort(request_id)

    def _put(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: each output into its request's queue (if it still has one)."""
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail(self, error: BaseException, calls: list[asyncio.Future]) -> None:
        """On the event loop: every open request and the `calls` waiting end with `error`."""
        for queue in set(self._queues.values()):
            queue.put_nowait(error)
        for future in calls:
            settle(future, None, error)


class AsyncEngine(EngineFrontend):
    """Runs `engine` in a daemon thread of this process."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int) -> None:
        super().__init__(max_waiting=max_waiting)
        self.engine = engine
        self.stats = engine_stats(engine)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._adds: list[EngineRequest] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[LLMEngine], Any], asyncio.Future]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="parallm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.engine.close()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # -- requests (event loop side) ------------------------------------------------------------

    def _submit(self, requests: list[EngineRequest]) -> None:
        with self._lock:
            self._adds += requests
            self._wake.notify()

    def _pending(self) -> int:
        return len(self._adds)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        if self.error is not None:
            raise EngineDeadError(self.error)
        assert self._loop is not None, "the engine thread is not running"
        future = self._loop.create_future()
        with self._lock:
            self._calls.append((fn, future))
            self._wake.notify()
        return await future

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._lock:
                    while (
                        not self._stopping
                        and not self._adds
                        and not self._aborts
                        and not self._calls
                        and not engine.has_unfinished_requests()
                    ):
                        self._wake.wait()
                    if self._stopping:
                        return
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                for request_id, prompt, params, lora in adds:
                    engine.add_request(request_id, prompt, params, lora=lora)
                for request_id in aborts:
                    engine.abort_request(request_id)
                # After the adds: a request admitted before an unload finishes on its adapter.
                while call := self._next_call():
                    self._run_call(*call)
                outputs = engine.step()
                self.stats = engine_stats(engine)
                self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 - the server must learn of any failure
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            self._fail_all(EngineDeadError(self.error))

    def _next_call(self) -> tuple[Callable[[LLMEngine], Any], asyncio.Future] | None:
        with self._lock:  # one at a time: if one fails the engine, `_fail_all` ends the rest
            return self._calls.pop(0) if self._calls else None

    def _run_call(self, fn: Callable[[LLMEngine], Any], future: asyncio.Future) -> None:
        assert self._loop is not None
        try:
            result = fn(self.engine)
        except BaseException as e:
            self._loop.call_soon_threadsafe(settle, future, None, e)
            if not isinstance(e, UserError):
                raise
        else:
            self._loop.call_soon_threadsafe(settle, future, result, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._put, outputs)

    def _fail_all(self, error: BaseException) -> None:
        if self._loop is None:
            return

        def fail() -> None:
            with self._lock:
                calls, self._calls = self._calls, []
            self._fail(error, [future for _, future in calls])

        try:
            self._loop.call_soon_threadsafe(fail)
        except RuntimeError:  # the loop is closed: the server is going down anyway
            pass


def engine_stats(engine: LLMEngine) -> EngineStats:
    """A snapshot of the engine's queues and KV cache, taken where it runs, after a step."""
    sched = engine.scheduler
    bm = sched.block_manager
    return EngineStats(
        running=sched.num_running,
        waiting=sched.num_waiting,
        kv_blocks_total=bm.num_blocks,
        kv_blocks_free=bm.num_free_blocks,
        prefix_queries=bm.prefix_queries,
        prefix_hits=bm.prefix_hits,
    )


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """On the event loop: complete a `call`'s future (unless its caller went away)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
