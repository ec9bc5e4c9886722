"""/health and /metrics (no key), /v1/models and /v1/models/{id} (key checked)."""

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
    if engine.healthy:
        return JSONResponse({"status": "ok"})
    return engine_dead(engine.error or "the engine is not running").response()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    return Response(
        state.metrics.render(state.engine.stats),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = state_of(request)
    await authorize(state, request)
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    state = state_of(request)
    await authorize(state, request)
    check_model(state, model_id)
    return _model_card(state)


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "parallm",
        "max_model_len": state.llm.max_model_len,
    }
