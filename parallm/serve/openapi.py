"""What `/openapi.json` says about each endpoint, in one place.

The handlers read raw bodies (to stop reading at the body limit, 413) and build their answers as
plain dicts, so FastAPI can infer neither request nor response bodies. Each operation is described
here instead, from the pydantic models of `protocol`: its request body, its 200 answer (JSON, the
events of a stream, or Prometheus text), the errors it can answer (all in OpenAI's error shape)
and whether it needs a key (a bearer token). The description follows the server's options: without
keys (--no-auth) nothing needs one, and /metrics needs one only with --metrics-auth.

The test suite runs a schema fuzzer against this description: a response it does not declare is a
failure, so the contract stays accurate. A route without an entry here fails at the first request
for /openapi.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from parallm.serve import protocol as p

if TYPE_CHECKING:
    from fastapi import FastAPI

    from parallm.serve.state import ServerState

REQUEST_ID = "x-request-id"
SECURITY_SCHEME = "bearerAuth"

# Who may call an operation: anyone, any valid key, an admin key, or (/metrics) a key only
# when the server was started with --metrics-auth.
Access = Literal["open", "key", "admin", "metrics"]


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One method on one path: its request body, its 200 answer and the errors it can give."""

    summary: str
    access: Access = "key"
    body: type[BaseModel] | None = None  # the JSON request body
    ok: type[BaseModel] | None = None  # the 200 JSON body
    stream: type[BaseModel] | None = None  # the events of a 200 text/event-stream (`stream`)
    text: str | None = None  # a 200 text/plain body, described
    video: str | None = None  # a 200 video/mp4 body, described
    errors: tuple[int, ...] = ()  # besides 401 (from `access`)
    # A body an error status may have besides OpenAI's error body.
    other_error_bodies: dict[int, type[BaseModel]] = field(default_factory=dict)


_GENERATION_ERRORS = (400, 404, 413, 429, 503)

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("get", "/health"): Operation(
        summary="200 while the server takes requests; 503 once the engine failed or it drains",
        access="open",
        ok=p.Health,
        errors=(503,),
        other_error_bodies={503: p.Draining},
    ),
    ("get", "/metrics"): Operation(
        summary="Prometheus metrics of the engine and the finished requests",
        access="metrics",
        text="Prometheus text exposition format 0.0.4",
    ),
    ("get", "/v1/models"): Operation(
        summary="The base model and each loaded LoRA adapter", ok=p.ModelList
    ),
    ("get", "/v1/models/{model_id}"): Operation(
        summary="One model: the base or a loaded LoRA adapter", ok=p.ModelCard, errors=(404,)
    ),
    ("post", "/v1/completions"): Operation(
        summary="Complete one or more prompts (text or token ids)",
        body=p.CompletionRequest,
        ok=p.CompletionResponse,
        stream=p.CompletionChunk,
        errors=_GENERATION_ERRORS,
    ),
    ("post", "/v1/chat/completions"): Operation(
        summary="Answer a conversation (the model's chat template)",
        body=p.ChatCompletionRequest,
        ok=p.ChatCompletionResponse,
        stream=p.ChatCompletionChunk,
        errors=_GENERATION_ERRORS,
    ),
    ("get", "/v1/admin/lora_adapters"): Operation(
        summary="Loaded adapters, and unloaded ones still finishing requests (admin keys)",
        access="admin",
        ok=p.AdapterList,
    ),
    ("post", "/v1/admin/lora_adapters"): Operation(
        summary="Load a peft adapter directory on the server as a model (admin keys)",
        access="admin",
        body=p.LoraAdapterRequest,
        ok=p.ModelCard,
        errors=(400, 413, 503),
    ),
    ("delete", "/v1/admin/lora_adapters/{name}"): Operation(
        summary="Unload an adapter; requests already admitted finish on it (admin keys)",
        access="admin",
        ok=p.AdapterDeleted,
        errors=(400, 404, 503),
    ),
    ("post", "/v1/videos"): Operation(
        summary="Create a video job (OpenAI's video API; with --video-model). `seconds` or "
        "`frames`, `size` 'WxH', `steps`, `guidance` and `seed` default to the model's; usage "
        "is billed in generated frames (`video_frames`, once the job ends), not tokens, and a "
        "key's rpm applies but not its tpm. The body may also be the multipart form OpenAI's SDKs "
        "send",
        body=p.VideoRequest,
        ok=p.Video,
        errors=(400, 413, 429, 503),
    ),
    ("get", "/v1/videos"): Operation(
        summary="The key's video jobs, newest first (`order`, `limit`, `after`)",
        ok=p.VideoList,
        errors=(400,),
    ),
    ("get", "/v1/videos/{video_id}"): Operation(
        summary="A video job: queued, in_progress (with progress in percent), completed, failed",
        ok=p.Video,
        errors=(404,),
    ),
    ("get", "/v1/videos/{video_id}/content"): Operation(
        summary="The MP4 of a completed video job (404 until it is completed)",
        video="H.264 MP4 of the video",
        errors=(400, 404),
    ),
    ("delete", "/v1/videos/{video_id}"): Operation(
        summary="Cancel a queued or running video job, or delete a finished one and its MP4",
        ok=p.VideoDeleted,
        errors=(404,),
    ),
}

_ERRORS = {
    400: "Invalid request: the message names the field (`param`) and what is valid",
    401: "Missing, unknown or revoked API key",
    403: "The key has no admin scope, or the server runs without keys (--no-auth)",
    404: "No such model (the served model or a loaded adapter), or no such video job",
    413: "Body larger than the server's --max-body-bytes",
    429: "The key's rate limit, or the server's queue, is full; retry after `Retry-After` s",
    503: "The engine has failed, or the server is shutting down (`Retry-After` while it drains)",
}


def install(app: FastAPI, state: ServerState) -> None:
    """Make `app` answer /openapi.json with the description of this module (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, state)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI, state: ServerState) -> dict[str, Any]:
    """The OpenAPI document of `app` as served with `state`'s options."""
    doc = get_openapi(
        title=app.title, version=app.version, description=_DESCRIPTION, routes=app.routes
    )
    keys = state.keystore is not None
    schemas = _schemas()
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            described = OPERATIONS.get((method, path))
            assert described is not None, f"{method.upper()} {path}: no entry in serve/openapi.py"
            _describe(operation, described, keys=keys, metrics_auth=state.metrics_auth)
    doc["components"] = {"schemas": schemas}
    if keys:
        doc["components"]["securitySchemes"] = {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key made by `parallm keys create`",
            }
        }
    return doc


_DESCRIPTION = (
    "An OpenAI-compatible API for one model and its LoRA adapters. Every response carries an "
    f"`{REQUEST_ID}` header (the client's own when it sent a well-formed one); every error has "
    "OpenAI's error body."
)


def _describe(operation: dict, described: Operation, *, keys: bool, metrics_auth: bool) -> None:
    operation["summary"] = described.summary
    operation.pop("description", None)  # the handler's docstring is written for developers
    if described.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(described.body)}},
        }
    ok: dict[str, Any] = {}
    if described.ok is not None:
        ok["application/json"] = {"schema": _ref(described.ok)}
    if described.stream is not None:
        ok["text/event-stream"] = {"itemSchema": _event(described.stream)}
    if described.text is not None:
        ok["text/plain"] = {"schema": {"type": "string", "description": described.text}}
    if described.video is not None:
        ok["video/mp4"] = {"schema": {"type": "string", "format": "binary"}}
        ok["video/mp4"]["schema"]["description"] = described.video
    responses = {"200": _response("OK", ok)}
    errors = set(described.errors)
    needs_key = keys and (
        described.access in ("key", "admin") or (described.access == "metrics" and metrics_auth)
    )
    if needs_key:
        errors.add(401)
        operation["security"] = [{SECURITY_SCHEME: []}]
    if described.access == "admin":
        errors.add(403)
    for status in sorted(errors):
        schema = _ref(p.ErrorResponse)
        if status in described.other_error_bodies:
            schema = {"anyOf": [_ref(described.other_error_bodies[status]), schema]}
        content = {"application/json": {"schema": schema}}
        retry_after = status in (429, 503)
        responses[str(status)] = _response(_ERRORS[status], content, retry_after=retry_after)
    operation["responses"] = responses


def _response(description: str, content: dict, *, retry_after: bool = False) -> dict:
    headers: dict[str, Any] = {
        REQUEST_ID: {
            "description": "The request's id, as in the access log",
            "required": True,
            "schema": {"type": "string"},
        }
    }
    if retry_after:
        headers["Retry-After"] = {
            "description": "Seconds to wait before retrying (when known)",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    return {"description": description, "headers": headers, "content": content}


def _event(chunk: type[BaseModel]) -> dict:
    """One server-sent event of a stream: a chunk, an error (after the stream began), or the
    final `[DONE]`."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref(p.ErrorResponse)]},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schemas() -> dict[str, Any]:
    """The JSON schemas of every request (validation) and response (serialization) model."""
    bodies = {op.body for op in OPERATIONS.values() if op.body is not None}
    answers = {op.ok for op in OPERATIONS.values() if op.ok is not None}
    answers |= {op.stream for op in OPERATIONS.values() if op.stream is not None}
    answers.add(p.ErrorResponse)
    answers |= {m for op in OPERATIONS.values() for m in op.other_error_bodies.values()}
    models = [(m, "validation") for m in sorted(bodies, key=lambda m: m.__name__)]
    models += [(m, "serialization") for m in sorted(answers, key=lambda m: m.__name__)]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    return top["$defs"]
