"""/v1/admin/lora_adapters: list (GET), load (POST {"name", "path"}) and unload (DELETE
.../{name}) LoRA adapters while the server runs, for keys with the admin scope only (401 without
a valid key, 403 without the scope). A server started with --no-auth has no admin keys, so
there these endpoints answer 403: anyone who reaches its port could otherwise make it read any
directory it can.

`path` is a peft adapter directory on the server's file system. Loading runs between two engine
steps and either loads the adapter whole or not at all (400 naming what is wrong: the directory,
a base model or rank that does not match, a name taken, no free slot). Unloading is graceful: the
name is gone at once (requests naming it get 404), the requests already admitted finish on the
adapter (`in_flight` in the answer), and its slot takes another adapter once they have.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request

from parallm.errors import UserError
from parallm.inference.engine import LLMEngine
from parallm.serve.async_engine import EngineDeadError
from parallm.serve.common import APIError, authorize_admin, engine_dead, read_body, state_of
from parallm.serve.protocol import LoraAdapterRequest, parse
from parallm.serve.system import model_card

router = APIRouter()
PATH = "/v1/admin/lora_adapters"


@router.get(PATH)
async def list_adapters(request: Request) -> dict:
    """The loaded adapters, and those unloaded that still finish requests."""
    state = state_of(request)
    await authorize_admin(state, request)
    adapters = state.llm.adapters
    loaded = [
        {**model_card(state, name), "in_flight": adapters.by_name[name].in_flight}
        for name in list(adapters.by_name)
    ]
    draining = [
        {"id": a.name, "root": a.path, "in_flight": a.in_flight, "unloaded": True}
        for a in adapters.draining()
    ]
    return {"object": "list", "data": loaded + draining}


@router.post(PATH)
async def load_adapter(request: Request) -> dict:
    state = state_of(request)
    await authorize_admin(state, request)
    req = parse(LoraAdapterRequest, await read_body(state, request))
    if not state.llm.lora_enabled:
        raise APIError(
            400,
            "this server has no adapter slots; start it with --enable-lora (or --lora NAME=DIR)",
            code="lora_disabled",
        )
    if req.name == state.model_name:
        raise UserError(f"name: {req.name!r} is the served model's name; choose another")
    try:
        await state.engine.call(partial(_add_lora, name=req.name, path=req.path))
    except EngineDeadError as e:
        raise engine_dead(e) from e
    return model_card(state, req.name)


def _add_lora(engine: LLMEngine, *, name: str, path: str) -> None:
    """Load the adapter (where the engine runs: module-level, so that it pickles to an engine
    process); a path the OS cannot read (too long, no permission) is the request's error, not
    the engine's failure."""
    try:
        engine.add_lora(name, path, field="path")
    except OSError as e:
        raise UserError(f"path: {path!r} cannot be read: {e.strerror or e}") from None


def _remove_lora(engine: LLMEngine, *, name: str) -> int:
    """Unload the adapter where the engine runs; its requests still in flight."""
    return engine.remove_lora(name).in_flight


@router.delete(PATH + "/{name:path}")
async def unload_adapter(name: str, request: Request) -> dict:
    state = state_of(request)
    await authorize_admin(state, request)
    if name == state.model_name:
        raise UserError(f"name: {name!r} is the base model, which cannot be unloaded")
    try:
        in_flight = await state.engine.call(partial(_remove_lora, name=name))
    except EngineDeadError as e:
        raise engine_dead(e) from e
    except UserError as e:
        raise APIError(404, str(e), "not_found_error", param="name", code="model_not_found") from e
    return {"id": name, "object": "model", "deleted": True, "in_flight": in_flight}
