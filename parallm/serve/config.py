"""`ServerConfig`: every option of `parallm serve`, typed and validated.

Importing this module needs none of the server extra's packages, so the command line takes its
defaults from here on any install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parallm.errors import UserError

if TYPE_CHECKING:
    from parallm.inference.config import EngineConfig

DEFAULT_KEYS_DB = "~/.parallm/keys.db"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
LOG_FORMATS = ("text", "json")  # of the access log


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The options of `parallm serve`, one field each (`max_waiting` is `--max-waiting`); an
    invalid value is a UserError naming the option, the value and what is valid.

    `kv_cache_memory`: bytes, or on a GPU a fraction (0, 1] of the memory free after loading.
    `db`: the key store, a SQLite path or a SQLAlchemy URL (unused with `no_auth`).
    `ui`: also serve the chat page at /ui (needs the `ui` extra).
    `lora`: LoRA adapters served next to the model, each "NAME=DIR" (a peft directory); a
    request's `model` names one. `enable_lora` (implied by `lora`) keeps `max_loras` slots for
    adapters that admin keys load and unload while the server runs.
    `log_format`: the access log's lines (one per request, on stderr; `no_access_log` turns it
    off). `metrics_auth`: /metrics answers only requests with a valid key (any key: the metrics
    hold no secrets, and a scraper's key should not be one that can load adapters).
    `ui_api_key`: the key the chat page sends for whoever opens it without typing their own
    (never a key taken from the environment).
    `video_model`: also serve a video model directory (`parallm train`'s export for task flow)
    behind /v1/videos, next to the text model (`model` is still required); a request above
    `max_video_frames`, `max_video_pixels` (width x height) or `max_video_steps` gets a 400.
    `video_threads`: torch threads of the video worker process (default: half the cores); it
    runs on `device`, as the text engine does."""

    model: str  # model directory (HF format)
    served_model_name: str | None = None  # the name in the API; default: `model`
    host: str = "127.0.0.1"
    port: int = 8000
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # default: the model's context
    kv_cache_memory: int | float | None = None
    max_num_seqs: int = 256  # sequences per engine step
    max_num_batched_tokens: int = 2048  # tokens per engine step
    max_waiting: int = 1024  # queued requests before a 429
    max_body_bytes: int = 8 << 20  # request body limit (413 beyond)
    no_prefix_caching: bool = False
    dtype: str | None = None  # float32 | bfloat16 | float16; default: the model's
    device: str | None = None  # cpu | cuda
    attention_backend: str = "auto"  # auto | portable | flex
    db: str = DEFAULT_KEYS_DB
    no_auth: bool = False  # accept requests without a key (local use)
    ui: bool = False
    log_level: str = "warning"  # uvicorn's
    lora: tuple[str, ...] = ()  # NAME=DIR each
    enable_lora: bool = False
    max_loras: int = 4  # adapters loaded at a time
    max_lora_rank: int = 16
    # Abuse and shutdown (see `parallm.serve.jobs` and `parallm.serve.drain`).
    max_prompt_chars: int | None = None  # per prompt, before tokenizing; default: 16 x context
    max_n: int = 16  # choices per prompt (`n`, `best_of`)
    drain_timeout: float = 30.0  # seconds running requests get after SIGTERM / SIGINT
    # The HTTP contract and the audit trail (see `parallm.serve.openapi`, `.access_log`).
    log_format: str = "text"  # access-log lines: text (key=value) | json (an object per line)
    no_access_log: bool = False
    metrics_auth: bool = False  # /metrics needs a valid key
    ui_api_key: str | None = None  # the key the chat page sends when its user gives none
    # Video generation (see `parallm.serve.videos`).
    video_model: str | None = None  # a video model directory; None: no /v1/videos
    max_video_frames: int = 128
    max_video_pixels: int = 1280 * 720
    max_video_steps: int = 100
    video_threads: int | None = None  # default: half the cores, at least 1
    # torch threads of the text engine; default: OMP_NUM_THREADS if set, else `engine_threads`.
    threads: int | None = None
    # Run the text engine as a thread of the server's process, not in a process of its own
    # (`parallm.serve.engine_process`): one process less, slower under load.
    engine_in_process: bool = False

    def __post_init__(self) -> None:
        # argparse gives None (no --lora) or a list; the config holds a tuple either way.
        object.__setattr__(self, "lora", tuple(self.lora or ()))
        if not self.model:
            raise UserError("--model: '' is not valid; give a model directory")
        if self.served_model_name == "":
            raise UserError("--served-model-name: '' is not valid; give a name or leave it out")
        _check_range("port", self.port, 0, 65535)
        for name in (
            "tensor_parallel_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_waiting",
            "max_body_bytes",
            "max_loras",
            "max_lora_rank",
        ):
            _check_range(name, getattr(self, name), 1)
        if self.threads is not None:
            _check_range("threads", self.threads, 1)
        self.lora_adapters()  # each NAME=DIR well-formed, names unique and not the model's
        if self.max_model_len is not None:
            _check_range("max_model_len", self.max_model_len, 1)
        _check_range("max_n", self.max_n, 1)
        if self.max_prompt_chars is not None:
            _check_range("max_prompt_chars", self.max_prompt_chars, 1)
        timeout = self.drain_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
            raise UserError(
                f"--drain-timeout: {timeout!r} is not valid; must be seconds >= 0 (0: end the "
                "running requests at once)"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise UserError(
                f"--kv-cache-memory: {self.kv_cache_memory} is not valid; must be > 0 "
                "(bytes, or a fraction <= 1 of GPU memory)"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise UserError(
                f"--log-level: {self.log_level!r} is not valid; valid: {', '.join(LOG_LEVELS)}"
            )
        self._check_contract_options()
        self._check_video_options()

    def _check_contract_options(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise UserError(
                f"--log-format: {self.log_format!r} is not valid; valid: {', '.join(LOG_FORMATS)}"
            )
        if self.metrics_auth and self.no_auth:
            raise UserError(
                "--metrics-auth: needs API keys, but --no-auth turns them off; drop one of them"
            )
        if self.ui_api_key is not None and not self.ui:
            raise UserError("--ui-api-key: only used by the chat page; add --ui or leave it out")
        if self.ui_api_key is not None and not self.ui_api_key.strip():
            raise UserError("--ui-api-key: '' is not valid; give a key or leave it out")

    def _check_video_options(self) -> None:
        if self.video_model is not None and not self.video_model.strip():
            raise UserError("--video-model: '' is not valid; give a video model directory")
        for name in ("max_video_frames", "max_video_pixels", "max_video_steps"):
            _check_range(name, getattr(self, name), 1)
        if self.video_threads is not None:
            _check_range("video_threads", self.video_threads, 1)

    @property
    def model_name(self) -> str:
        """The model's name in the API."""
        return self.served_model_name or self.model

    def lora_adapters(self) -> dict[str, str]:
        """The `--lora` adapters, directory by name (a UserError for a malformed value, a name
        given twice or the served model's name)."""
        adapters: dict[str, str] = {}
        for value in self.lora:
            name, eq, path = value.partition("=")
            name, path = name.strip(), path.strip()
            if not eq or not name or not path or any(c.isspace() for c in name):
                raise UserError(
                    f"--lora: {value!r} is not valid; give NAME=DIR (an adapter name without "
                    "spaces, then its peft directory), e.g. --lora sql=runs/sql/adapter"
                )
            if name == self.model_name:
                raise UserError(
                    f"--lora: {name!r} is the served model's name; give the adapter another"
                )
            if name in adapters:
                raise UserError(f"--lora: the name {name!r} is given twice")
            adapters[name] = path
        if len(adapters) > self.max_loras:
            raise UserError(
                f"--max-loras: {self.max_loras} slots cannot hold the {len(adapters)} --lora "
                f"adapters; give --max-loras {len(adapters)} or more"
            )
        return adapters

    def engine_config(self) -> EngineConfig:
        """The engine's part of the options (validated by `EngineConfig` too)."""
        from parallm.inference.config import EngineConfig

        kv = self.kv_cache_memory
        if kv is not None and kv > 1:
            kv = int(kv)  # bytes; a fraction is <= 1
        return EngineConfig(
            max_model_len=self.max_model_len,
            kv_cache_memory=kv,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=not self.no_prefix_caching,
            dtype=self.dtype,
            device=self.device,
            tensor_parallel_size=self.tensor_parallel_size,
            attention_backend=self.attention_backend,
            enable_lora=self.enable_lora or bool(self.lora),
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
        )


def engine_threads(threads: int | None, environ=os.environ, cores: int | None = None) -> int | None:
    """The torch threads `parallm serve` gives its text engine: `threads` if given; None (torch's
    own choice) when OMP_NUM_THREADS is set; else the cores less one, at least 1. The HTTP event
    loop needs a core too (in its own process, or sharing the GIL with the engine thread under
    --engine-in-process): with a thread per core, each step's parallel regions wait on a thread
    the event loop or a client has taken off its core.
    Measured on 2 cores with the client on the same machine (`docs/benchmarks.md`), median
    TPOT at 4 requests/s: 24.8 ms with 2 threads, 9.5 ms with 1. vLLM's CPU backend keeps a
    core free in the same way."""
    if threads is not None:
        return threads
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (cores if cores is not None else os.cpu_count() or 1) - 1)


def _check_range(name: str, value: int, low: int, high: int | None = None) -> None:
    valid = f"in [{low}, {high}]" if high is not None else f">= {low}"
    option = f"--{name.replace('_', '-')}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{option}: {value!r} is not valid; must be an integer {valid}")
    if value < low or (high is not None and value > high):
        raise UserError(f"{option}: {value} is not valid; must be {valid}")
