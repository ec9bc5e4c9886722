"""/health (no key), /metrics (a key only with --metrics-auth), /v1/models and /v1/models/{id}
(key checked): the base model, then each loaded LoRA adapter with the base as its `parent` (as
vLLM lists them), then the video model (`--video-model`) if one is served."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from parallm.serve.common import authorize, check_model, engine_dead, state_of

if TYPE_CHECKING:
    from parallm.serve.state import ServerState

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    engine = state_of(request).engine
    if state_of(request).draining:  # shutting down (parallm.serve.drain): out of rotation
        return JSONResponse({"status": "draining"}, 503, headers={"Retry-After": "1"})
    if engine.healthy:
        return JSONResponse({"status": "ok"})
    return engine_dead(engine.error or "the engine is not running").response()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    if state.metrics_auth:
        await authorize(state, request)
    return Response(
        state.metrics.render(state.engine.stats),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = state_of(request)
    await authorize(state, request)
    adapters = list(state.llm.adapters.by_name)
    cards = [model_card(state, None), *(model_card(state, name) for name in adapters)]
    if state.videos is not None:
        cards.append(video_card(state))
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    state = state_of(request)
    await authorize(state, request)
    if state.videos is not None and model_id == state.videos.name:
        return video_card(state)
    return model_card(state, check_model(state, model_id))


def video_card(state: ServerState) -> dict:
    """The card of the video model: what `POST /v1/videos` takes as `model`."""
    videos = state.videos
    return {
        "id": videos.name,
        "object": "model",
        "created": state.created,
        "owned_by": "parallm",
        "root": videos.model,
        "parent": None,
    }


def model_card(state: ServerState, adapter: str | None) -> dict:
    """The card of the base model (None) or of a loaded adapter: its `root` is where it was
    loaded from, its `parent` the base model."""
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "parallm",
        "root": state.model_path or state.model_name,
        "parent": None,
        "max_model_len": state.llm.max_model_len,
    }
    loaded = state.llm.adapters.by_name.get(adapter) if adapter is not None else None
    if loaded is not None:
        card.update(id=loaded.name, root=loaded.path, parent=state.model_name)
    return card
