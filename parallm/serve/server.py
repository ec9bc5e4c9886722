"""`parallm serve`: check the options, the port and the adapters, load the model and the
adapters, run the app under uvicorn until a signal, then drain (`parallm.serve.drain`)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import uvicorn

from parallm.errors import UserError
from parallm.extras import import_extra
from parallm.inference.config import EngineConfig
from parallm.inference.lora import check_servable, servable_modules
from parallm.models.hf import read_family
from parallm.models.peft_format import read_adapter
from parallm.serve.access_log import RequestLog
from parallm.serve.app import ServerState, build_app
from parallm.serve.async_engine import AsyncEngine, EngineFrontend
from parallm.serve.config import ServerConfig, engine_threads
from parallm.serve.drain import DrainGate, DrainingServer
from parallm.serve.engine_process import EngineProcess, load_engine
from parallm.serve.keystore import KeyStore
from parallm.serve.video_jobs import VideoLimits, VideoService


def serve(config: ServerConfig) -> int:
    """Load the model (errors exit 2 before the port is bound), then run uvicorn until SIGTERM
    or SIGINT, and drain; 0 once drained, 1 when the engine failed while serving."""
    engine_config = config.engine_config()  # its errors before anything starts
    if config.ui:
        import_extra("parallm.serve.ui", command="serve --ui", extra="ui")
    _check_port_free(config.host, config.port)  # before minutes of loading, not after
    # A directory that is no model fails before any process starts.
    _, model_args = read_family(config.model)
    adapters = _check_adapters(config, model_args)
    keystore = None if config.no_auth else KeyStore(config.db)
    videos = _load_videos(config)  # its own process: loads while the text model does
    try:
        engine = _load_engine(config, engine_config, adapters)
    except BaseException:
        if videos is not None:
            videos.stop()
        raise
    if videos is not None:
        try:
            videos.wait_loaded()
        except BaseException:
            engine.stop()
            raise
    state = ServerState(
        engine=engine,
        model_name=config.model_name,
        keystore=keystore,
        max_body_bytes=config.max_body_bytes,
        model_path=config.model,
        max_prompt_chars=config.max_prompt_chars,
        max_n=config.max_n,
        metrics_auth=config.metrics_auth,
        videos=videos,
    )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    own = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    app = build_app(
        state,
        ui_server_url=f"http://{own}:{config.port}" if config.ui else None,
        ui_api_key=config.ui_api_key,
        log_format=None if config.no_access_log else config.log_format,
    )
    print(
        f"parallm serve: {state.model_name} on http://{config.host}:{config.port}"
        + (" (no auth)" if keystore is None else ""),
        file=sys.stderr,
        flush=True,
    )
    gate = DrainGate(app, state)
    # Outermost, so that the drain's 503s also get a request id and an access-log line.
    served = RequestLog(gate, fmt=None if config.no_access_log else config.log_format)
    # After the drain only idle connections are left: timeout_graceful_shutdown bounds the rest.
    uv_config = uvicorn.Config(
        served,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,  # the app writes its own (parallm.serve.access_log)
        timeout_graceful_shutdown=5,
    )
    DrainingServer(uv_config, gate, config.drain_timeout).run()
    if keystore is not None:
        keystore.close()
    return 1 if state.engine.error else 0


def _load_engine(
    config: ServerConfig, engine_config: EngineConfig, adapters: dict[str, str]
) -> EngineFrontend:
    """The text engine, loaded with its adapters: in a process of its own (the default), or
    in this one (`--engine-in-process`). With tensor_parallel_size N it starts N - 1 workers."""
    threads = engine_threads(config.threads)
    if not config.engine_in_process:
        process = EngineProcess(
            config.model,
            engine_config,
            adapters=adapters,
            threads=threads,
            max_waiting=config.max_waiting,
        )
        process.spawn()
        process.wait_loaded()
        return process
    engine = load_engine(config.model, engine_config, adapters, threads)
    return AsyncEngine(engine, max_waiting=config.max_waiting)


def _load_videos(config: ServerConfig) -> VideoService | None:
    """The video model's worker process, started (it loads the model in the background)."""
    if config.video_model is None:
        return None
    import_extra("av", command="serve --video-model", extra="video")
    limits = VideoLimits(
        max_frames=config.max_video_frames,
        max_pixels=config.max_video_pixels,
        max_steps=config.max_video_steps,
    )
    videos = VideoService(
        config.video_model,
        limits=limits,
        max_queued=config.max_waiting,
        device=config.device,
        threads=config.video_threads,
    )
    videos.spawn()
    return videos


def _check_adapters(config: ServerConfig, args: Any) -> dict[str, str]:
    """The `--lora` adapters, each read and checked against the model's config `args` (no
    weights loaded yet): a bad one fails in seconds, not after the model has loaded."""
    adapters = config.lora_adapters()
    if adapters:
        modules = set(servable_modules(args))
        for name, path in adapters.items():
            field = f"--lora {name}"
            adapter = read_adapter(path, args, field=field)
            check_servable(adapter, modules=modules, max_rank=config.max_lora_rank, field=field)
    return adapters


def _check_port_free(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"--host: {host!r} does not resolve ({e.strerror})") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise UserError(f"--port: {port} on {host} cannot be used ({e.strerror})") from e
