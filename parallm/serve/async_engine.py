"""The engine behind the HTTP server: `LLMEngine` stepping in its own thread, fed from asyncio.

The event loop never runs a model step. Requests and aborts are queued under a lock and applied
by the engine thread between two steps; each step's outputs are handed back to the event loop,
into one `asyncio.Queue` per request. So a request added or aborted while a step runs takes
effect at the next step, and an abort frees the request's KV blocks there.

If a step raises, the engine is dead: every open request ends with `EngineDeadError`, `error`
says why, and new requests are refused. The server reports it on `/health` and answers 503.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass

from parallm.inference.engine import LLMEngine, RequestOutput
from parallm.inference.sampling import SamplingParams


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


class AsyncEngine:
    """Runs `engine` in a daemon thread; `generate` streams one request's outputs."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.error: str | None = None
        self.stats = self._snapshot()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._adds: list[tuple[str, str | list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
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

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Add one request and yield its outputs until it finishes."""
        queue: asyncio.Queue = asyncio.Queue()
        self.add([(request_id, prompt, params)], queue)
        async for out in self.stream([request_id], queue):
            yield out

    def add(
        self, requests: list[tuple[str, str | list[int], SamplingParams]], queue: asyncio.Queue
    ) -> None:
        """Queue requests (id, prompt, params) for the next step, all or none; their outputs
        will arrive in `queue`. QueueFullError or EngineDeadError if they cannot be taken."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        with self._lock:
            if self.stats.waiting + len(self._adds) + len(requests) > self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are waiting already")
            for request in requests:
                self._queues[request[0]] = queue
            self._adds += requests
            self._wake.notify()

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

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

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
                        and not engine.has_unfinished_requests()
                    ):
                        self._wake.wait()
                    if self._stopping:
                        return
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                for request_id, prompt, params in adds:
                    engine.add_request(request_id, prompt, params)
                for request_id in aborts:
                    engine.abort_request(request_id)
                outputs = engine.step()
                self.stats = self._snapshot()
                self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 - the server must learn of any failure
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            self._fail_all(EngineDeadError(self.error))

    def _snapshot(self) -> EngineStats:
        sched = self.engine.scheduler
        bm = sched.block_manager
        return EngineStats(
            running=sched.num_running,
            waiting=sched.num_waiting,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
        )

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        assert self._loop is not None

        def put() -> None:  # on the event loop: the queues are not thread-safe
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

        self._loop.call_soon_threadsafe(put)

    def _fail_all(self, error: BaseException) -> None:
        if self._loop is None:
            return

        def put() -> None:
            for queue in set(self._queues.values()):
                queue.put_nowait(error)

        try:
            self._loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed: the server is going down anyway
            pass
