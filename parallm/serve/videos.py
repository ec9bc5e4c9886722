"""Video generation in the shape of OpenAI's video API: `POST /v1/videos` creates a job,
`GET /v1/videos/{id}` reports it (queued, in_progress with a percentage, completed or failed),
`GET /v1/videos/{id}/content` returns the MP4 once completed (404 before), `GET /v1/videos`
lists a key's jobs and `DELETE /v1/videos/{id}` cancels or deletes one.

Jobs run one at a time, in order, in the video worker process (`video_jobs`, `video_worker`: it
keeps the text engine responsive). A job belongs to the key that created it: other keys get 404 for it.

Metering: each job is one request in the key's usage, billed in generated frames (`video_frames`;
no tokens) when it ends: its frames once completed, 0 when it failed or was cancelled. A key's
requests-per-minute limit applies to video requests; its tokens-per-minute limit does not (a
video generates no tokens).

Results are kept in a temporary directory of the server, the last 100 finished jobs
(`video_jobs.KEEP`), and deleted with their job or when the server stops: they do not survive a
restart. When the server drains (SIGTERM), the running and queued jobs fail at once with
`server_shutting_down`: the drain answers 503 to every poll, so their videos could not be
fetched anyway.
"""

from __future__ import annotations

import email.policy
import json
import math
import re
import time
import uuid
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from parallm.errors import UserError
from parallm.serve import access_log
from parallm.serve.common import APIError, authorize, read_body, state_of
from parallm.serve.jobs import draining_error
from parallm.serve.keystore import KeyInfo
from parallm.serve.protocol import VideoRequest, parse
from parallm.serve.video_jobs import QueueFull, VideoJob, VideoService, WorkerDown
from parallm.serve.video_worker import VideoParams

if TYPE_CHECKING:
    from parallm.serve.state import ServerState

DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.0  # VideoPipeline.generate's
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


# -- requests -------------------------------------------------------------------------------


def check_request(videos: VideoService, req: VideoRequest) -> VideoParams:
    """The request's values, its defaults filled in, checked against the model and the
    server's limits (a UserError naming the field)."""
    facts, limits, name = videos.facts, videos.limits, videos.name
    assert facts is not None
    if req.model is not None and req.model != name:
        raise UserError(
            f"model: {req.model!r} is not a video model of this server; it serves {name!r}",
            param="model",
        )
    if not req.prompt.strip():
        raise UserError("prompt: is empty; describe the video", param="prompt")
    frames = facts.frames if req.frames is None else req.frames
    if req.seconds is not None:
        frames = _frames_of(req.seconds, facts.fps)
    width, height = (facts.width, facts.height) if req.size is None else _size(req.size)
    step = math.lcm(2, facts.size_multiple)  # H.264 4:2:0 needs even sizes
    if width % step or height % step:
        raise UserError(
            f"size: {req.size!r} is not valid; width and height must be multiples of {step} "
            "(the model's autoencoder and MP4's 4:2:0 colour)",
            param="size",
        )
    if width * height > limits.max_pixels:
        raise UserError(
            f"size: {req.size!r} has {width * height} pixels per frame, over the server's "
            f"limit of {limits.max_pixels} (--max-video-pixels)",
            param="size",
        )
    field_ = "seconds" if req.seconds is not None else "frames"
    _check_int(field_, frames, 1, limits.max_frames, "--max-video-frames")
    if frames % facts.frame_multiple:
        raise UserError(
            f"{field_}: {frames} frames is not valid; the model's autoencoder needs a "
            f"multiple of {facts.frame_multiple}",
            param=field_,
        )
    steps = DEFAULT_STEPS if req.steps is None else req.steps
    _check_int("steps", steps, 1, limits.max_steps, "--max-video-steps")
    guidance = DEFAULT_GUIDANCE if req.guidance is None else float(req.guidance)
    if not 0 <= guidance <= 100:
        raise UserError(
            f"guidance: {req.guidance!r} is not valid; must be in [0, 100] (1: no guidance)",
            param="guidance",
        )
    seed = 0 if req.seed is None else req.seed
    _check_int("seed", seed, 0, 2**63 - 1, None)
    return VideoParams(
        prompt=req.prompt,
        frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        seed=seed,
        fps=facts.fps,
    )


def _frames_of(seconds: str | int, fps: float) -> int:
    try:
        value = float(seconds)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UserError(
            f"seconds: {seconds!r} is not valid; give a positive number of seconds (or frames)",
            param="seconds",
        )
    return max(1, round(value * fps))


def _size(text: str) -> tuple[int, int]:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise UserError(
            f"size: {text!r} is not valid; give WIDTHxHEIGHT in pixels, e.g. '64x48'",
            param="size",
        )
    return int(match[1]), int(match[2])


def _check_int(name: str, value: int, low: int, high: int, option: str | None) -> None:
    if not low <= value <= high:
        limit = f" ({option})" if option else ""
        raise UserError(
            f"{name}: {value} is not valid; must be in [{low}, {high}]{limit}", param=name
        )


# -- the endpoints ---------------------------------------------------------------------------------

router = APIRouter()


def _service(state: ServerState) -> VideoService:
    assert state.videos is not None  # the router is only included with a video model
    return state.videos


@router.post("/v1/videos")
async def create(request: Request) -> JSONResponse:
    state = state_of(request)
    videos = _service(state)
    key = await authorize(state, request)
    req = _video_request(request, await read_body(state, request))
    params = check_request(videos, req)
    access_log.note(model=videos.name)
    if state.draining or state.cut:
        raise draining_error()
    if key is not None:
        _charge_request(state, key)
    job = VideoJob(f"video_{uuid.uuid4().hex}", key.id if key else None, videos.name, params)
    try:
        videos.submit(job)
    except QueueFull as e:
        raise APIError(
            429,
            f"server busy: {e}; retry later",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "10"},
        ) from e
    except WorkerDown as e:
        raise APIError(503, str(e), "server_error", code="worker_failed") from e
    return JSONResponse(job.body())


def _video_request(request: Request, body: bytes) -> VideoRequest:
    """The body as JSON, or as the multipart form OpenAI's SDKs send (`client.videos.create`)."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        return parse(VideoRequest, body)
    head = f"Content-Type: {kind}\r\n\r\n".encode("latin-1", "replace")
    form = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not form.is_multipart():
        raise UserError("body: not a valid multipart/form-data body")
    fields: dict[str, Any] = {}
    for part in form.iter_parts():
        name = part.get_param("name", header="content-disposition") or ""
        if part.get_filename() is not None:
            raise UserError(f"{name}: file uploads are not supported; leave it out", param=name)
        value = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
        if name in ("frames", "steps", "seed") and re.fullmatch(r"-?[0-9]{1,19}", value):
            fields[name] = int(value)
        elif name == "guidance" and re.fullmatch(r"-?[0-9]{1,9}(\.[0-9]{0,9})?", value):
            fields[name] = float(value)
        else:
            fields[name] = value
    return parse(VideoRequest, json.dumps(fields).encode())


def _owned(state: ServerState, video_id: str, key: KeyInfo | None) -> VideoJob:
    """The key's job `video_id`; 404 for an unknown id or another key's job."""
    job = _service(state).owned(video_id, key.id if key is not None else None)
    if job is None:
        raise APIError(
            404,
            f"video_id: no video {video_id!r} (unknown, deleted, or made by another key)",
            "not_found_error",
            param="video_id",
            code="video_not_found",
        )
    return job


def _charge_request(state: ServerState, key: KeyInfo) -> None:
    """One request in the key's rpm window (no tokens: its tpm does not apply); 429 when full."""
    wait = state.limiter.check(key, 0)
    if wait is not None:
        raise APIError(
            429,
            f"rate limit of key {key.id} reached (rpm {key.rpm}); retry in {int(wait) + 1} s",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    state.limiter.commit(key.id, 0, 0)


@router.get("/v1/videos")
async def list_videos(request: Request) -> dict:
    state = state_of(request)
    videos = _service(state)
    key = await authorize(state, request)
    limit, order, after = _list_query(request)
    owner = key.id if key is not None else None
    jobs = [j for j in videos.jobs.values() if j.key_id == owner]
    if order == "desc":
        jobs.reverse()
    if after is not None:
        ids = [j.id for j in jobs]
        if after not in ids:
            raise UserError(f"after: no video {after!r} in this list", param="after")
        jobs = jobs[ids.index(after) + 1 :]
    page = jobs[:limit]
    return {
        "object": "list",
        "data": [j.body() for j in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(jobs) > limit,
    }


def _list_query(request: Request) -> tuple[int, str, str | None]:
    query = request.query_params
    unknown = sorted(set(query) - {"limit", "order", "after"})
    if unknown:
        raise UserError(f"{unknown[0]}: unknown query parameter; valid: after, limit, order")
    text = query.get("limit", "20")
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise UserError(f"limit: {text!r} is not valid; must be in [1, 100]", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise UserError(f"order: {order!r} is not valid; asc or desc", param="order")
    return int(text), order, query.get("after")


@router.get("/v1/videos/{video_id}")
async def retrieve(video_id: str, request: Request) -> dict:
    state = state_of(request)
    key = await authorize(state, request)
    return _owned(state, video_id, key).body()


@router.get("/v1/videos/{video_id}/content")
async def content(video_id: str, request: Request) -> FileResponse:
    state = state_of(request)
    videos = _service(state)
    key = await authorize(state, request)
    job = _owned(state, video_id, key)
    variant = request.query_params.get("variant", "video")
    if variant != "video":
        raise UserError(f"variant: {variant!r} is not available; only 'video'", param="variant")
    if job.status != "completed":
        raise APIError(
            404,
            f"video {job.id} is {job.status}; its content exists once it is completed",
            "not_found_error",
            param="video_id",
            code="video_not_ready",
        )
    return FileResponse(videos.path(job), media_type="video/mp4", filename=f"{job.id}.mp4")


@router.delete("/v1/videos/{video_id}")
async def delete(video_id: str, request: Request) -> dict:
    state = state_of(request)
    videos = _service(state)
    key = await authorize(state, request)
    job = _owned(state, video_id, key)
    videos.delete(job)
    return {"id": job.id, "object": "video.deleted", "deleted": True}


def job_ended(state: ServerState, job: VideoJob) -> None:
    """A job's metrics and its usage record (once, as it ends): its frames once completed, 0
    when it failed or was cancelled."""
    state.metrics.video_finished(
        model=job.model,
        status="cancelled" if (job.error or {}).get("code") == "cancelled" else job.status,
        frames=job.frames_generated,
        e2e=time.monotonic() - job.arrival,
    )
    if job.key_id is not None and state.keystore is not None:
        state.in_background(
            state.keystore.record_usage,
            job.key_id,
            request_id=job.id,
            model=job.model,
            prompt_tokens=0,
            completion_tokens=0,
            endpoint="videos",
            video_frames=job.frames_generated,
        )
