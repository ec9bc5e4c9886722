"""Graceful shutdown of `parallm serve`, as an orchestrator (Kubernetes, systemd) expects it.

The first SIGTERM or SIGINT starts a drain instead of uvicorn's own shutdown (which closes the
port at once, gives running requests 5 s, cancels the rest with a traceback each and re-raises
the signal, so the process ends with status 143 rather than 0):

1. The port stays open: every new request but /health and /metrics is answered 503 with
   `Retry-After` (and `Connection: close`), and /health answers 503 `{"status": "draining"}`,
   so a load balancer takes the server out of rotation while it finishes.
2. The requests already running go on, up to `--drain-timeout` seconds.
3. Then each job still running is cut (`jobs.Job.cut`): a stream ends with an OpenAI-shaped
   error event and [DONE] after what it has sent (and its usage chunk, if asked for), a
   non-streaming request gets a 503, and usage is recorded once with the tokens delivered; no
   new job may start.
   Video jobs (`parallm.serve.videos`) fail at the drain's start: their polls get 503, so
   their videos could never be fetched.
4. Then uvicorn's own shutdown runs (close the port and the idle connections, the app's
   lifespan end: the usage records are written, the engine stops) and `serve` returns 0.

A second signal cuts the running jobs at once; a third leaves at once (uvicorn's force exit).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from parallm.serve.jobs import draining_error
from parallm.serve.state import ServerState

# Answered while draining: /health says so, /metrics shows the drain's last figures.
OPEN_PATHS = ("/health", "/metrics")
# Jobs end within a step or two of being cut; this bounds the wait for other requests (an
# adapter being loaded, say) before uvicorn's own shutdown takes over.
AFTER_CUT_S = 10.0
_POLL_S = 0.05


class DrainGate:
    """ASGI middleware: counts the API requests (`/v1/...`) in flight, and while the server
    drains answers every new request but `OPEN_PATHS` with 503. Other requests (the chat page's
    long-lived event streams, such as its heartbeat) are not waited for: `end_others` ends them
    at the end of the drain, so that uvicorn's shutdown finds nothing to cancel (it would log a
    traceback for each)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state
        self.in_flight = 0
        self._others: set[asyncio.Task] = set()
        self._ending = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            await draining_error().response()(scope, receive, send)
            return
        if not scope["path"].startswith("/v1/"):
            await self._other(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _other(self, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        started = complete = False

        async def tracked(message: dict) -> None:
            nonlocal started, complete
            started = started or message["type"] == "http.response.start"
            complete = message["type"] == "http.response.body" and not message.get("more_body")
            await send(message)

        self._others.add(task)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self._ending:
                raise
            if not started:  # ended before it answered: as a request arriving now would be
                await draining_error().response()(scope, receive, send)
            elif not complete:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._others.discard(task)

    def end_others(self) -> int:
        """End the requests that are not API requests (see the class); how many there were."""
        self._ending = True
        for task in self._others:
            task.cancel()
        return len(self._others)


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose first SIGTERM / SIGINT drains (see the module) before its own
    shutdown. `gate` wraps the app it serves; `timeout` is `--drain-timeout`."""

    def __init__(self, config: uvicorn.Config, gate: DrainGate, timeout: float) -> None:
        super().__init__(config)
        self.gate, self.timeout = gate, timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._drain: asyncio.Task | None = None
        self._cut_now = False

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread, between two bytecodes of the event loop's thread):
        hands the signal to the loop. Unlike uvicorn's, it never re-raises the signal later."""
        self._signals += 1
        if self._loop is None or not self.started:
            self.should_exit = True  # nothing is served yet: stop as uvicorn would
        elif self._signals >= 3:
            self.force_exit = self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

    def _on_signal(self, name: str) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit(name))
        else:
            _say(f"{name} again: ending the running requests now")
            self._cut_now = True

    async def _drain_then_exit(self, name: str) -> None:
        state = self.state
        state.draining = True
        if state.videos is not None:  # its polls get 503 now: no video could be fetched
            ended = state.videos.fail_all("the server is shutting down", "server_shutting_down")
            _say(f"{name}: ended {ended} video job(s) (queued or running)")
        _say(
            f"{name}: draining; {self.gate.in_flight} running request(s) may take up to "
            f"{self.timeout:g} s (--drain-timeout), new ones get 503"
        )
        if not await self._until_idle(self.timeout):
            jobs = list(state.jobs.values())
            state.cut = True
            why = f"the server is shutting down; its drain timeout ({self.timeout:g} s) ended this"
            for job in jobs:
                job.cut(why)
            _say(f"drain timeout: ended {len(jobs)} running request(s)")
            await self._until_idle(AFTER_CUT_S, cuttable=False)
        else:
            _say("drained: no request is running")
        self.gate.end_others()
        self.should_exit = True  # uvicorn's main loop sees it within 0.1 s and shuts down

    @property
    def state(self) -> ServerState:
        return self.gate.state

    async def _until_idle(self, timeout: float, *, cuttable: bool = True) -> bool:
        """True once no API request is in flight; False after `timeout` seconds (or at a
        second signal)."""
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        while self.gate.in_flight:
            if self._loop.time() >= deadline or (cuttable and self._cut_now):
                return False
            await asyncio.sleep(_POLL_S)
        return True


def _say(message: str) -> None:
    print(f"parallm serve: {message}", file=sys.stderr, flush=True)
