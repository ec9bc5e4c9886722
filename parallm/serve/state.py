"""`ServerState`: what the endpoints of one server share."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from parallm.inference.engine import LLMEngine
from parallm.serve.async_engine import EngineFrontend
from parallm.serve.keystore import KeyStore
from parallm.serve.metrics import Metrics
from parallm.serve.ratelimit import RateLimiter

if TYPE_CHECKING:
    from parallm.serve.engine_process import EngineView
    from parallm.serve.video_jobs import VideoService


@dataclass
class ServerState:
    """What the endpoints share: the engine, the served name, the key store (None: no keys
    asked), the body limit, the model's directory, the request bounds, the shutdown state, the
    per-key rate limiter, the metrics and the video model (None: none served)."""

    engine: EngineFrontend
    model_name: str
    keystore: KeyStore | None  # None: --no-auth
    max_body_bytes: int
    model_path: str | None = None  # the `root` of the base model's card
    metrics_auth: bool = False  # /metrics needs a valid key (--metrics-auth)
    max_prompt_chars: int | None = None  # per prompt, before tokenizing; None: 16 x context
    max_n: int = 16  # largest `n` / `best_of`
    videos: VideoService | None = None  # --video-model: /v1/videos
    # Shutting down (`parallm.serve.drain`): new requests get 503 and /health says so while
    # the running jobs (by id) finish; once `cut`, no job may start any more.
    draining: bool = False
    cut: bool = False
    jobs: dict[str, Any] = field(default_factory=dict)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)
    _background: set[asyncio.Future] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.model_name)

    @property
    def llm(self) -> LLMEngine | EngineView:
        """The engine to check requests with: itself, or its view from an engine process."""
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
