"""Video generation in the shape of OpenAI's video API: `POST /v1/videos` creates a job,
`GET /v1/videos/{id}` reports it (queued, in_progress with a percentage, completed or failed),
`GET /v1/videos/{id}/content` returns the MP4 once completed (404 before), `GET /v1/videos`
lists a key's jobs and `DELETE /v1/videos/{id}` cancels or deletes one.

Jobs run one at a time, in order, in the video worker process (`video_worker`: it keeps the text
engine responsive). A job belongs to the key that created it: other keys get 404 for it.

Metering: each job is one request in the key's usage, billed in generated frames (`video_frames`;
no tokens) when it ends: its frames once completed, 0 when it failed or was cancelled. A key's
requests-per-minute limit applies to video requests; its tokens-per-minute limit does not (a
video generates no tokens).

Results are kept in a temporary directory of the server, at most `KEEP` finished jobs (the
oldest go first), and deleted with their job or when the server stops: they do not survive a
restart. When the server drains (SIGTERM), the running and queued jobs fail at once with
`server_shutting_down`: the drain answers 503 to every poll, so their videos could not be
fetched anyway.
"""

from __future__ import annotations

import asyncio
import email.policy
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.parser import BytesParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from parallm.errors import UserError
from parallm.serve import access_log, video_worker
from parallm.serve.common import APIError, authorize, read_body, state_of
from parallm.serve.jobs import draining_error
from parallm.serve.keystore import KeyInfo
from parallm.serve.protocol import VideoRequest, parse
from parallm.serve.video_worker import ModelFacts, VideoParams

if TYPE_CHECKING:
    from parallm.serve.state import ServerState

KEEP = 100  # finished jobs kept (with their videos); the oldest are deleted first
LOAD_TIMEOUT_S = 600.0
DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.0  # VideoPipeline.generate's
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


@dataclass(frozen=True, kw_only=True)
class VideoLimits:
    """The largest request the server takes: frames, pixels per frame (width x height), steps."""

    max_frames: int
    max_pixels: int
    max_steps: int


@dataclass
class VideoJob:
    id: str
    key_id: str | None
    model: str
    params: VideoParams
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    error: dict | None = None
    frames_generated: int = 0
    arrival: float = field(default_factory=time.monotonic)

    def body(self) -> dict:
        p = self.params
        return {
            "id": self.id,
            "object": "video",
            "status": self.status,
            "model": self.model,
            "prompt": p.prompt,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None,
            "progress": self.progress,
            "seconds": f"{p.frames / p.fps:g}",
            "size": f"{p.width}x{p.height}",
            "error": self.error,
            "frames": p.frames,
            "fps": p.fps,
            "steps": p.steps,
            "guidance": p.guidance,
            "seed": p.seed,
        }

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")


class VideoService:
    """The served video model: its worker process, the jobs by id and the queue.

    `load()` (blocking, before the server starts) spawns the worker and waits until the model is
    loaded (a UserError for a directory that is not a video model); `start()` (in the event
    loop) begins taking the worker's answers; `stop()` ends the worker and deletes the results.
    """

    def __init__(
        self,
        model: str,
        *,
        name: str | None = None,
        limits: VideoLimits,
        max_queued: int = 64,
        device: str | None = None,
        threads: int | None = None,
        nice: int = 10,
        loader: Callable[[str, str], Any] = video_worker.load_pipeline,
    ) -> None:
        self.model, self.name, self.limits = model, name or model, limits
        self.device = device or "cpu"  # as the text engine's default
        self.max_queued, self.nice, self.loader = max_queued, nice, loader
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.jobs: dict[str, VideoJob] = {}  # in creation order
        self.queue: deque[str] = deque()
        self.running: str | None = None
        self.facts: ModelFacts | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="parallm-videos-"))
        self._on_end: Callable[[VideoJob], None] = lambda job: None  # usage and metrics
        self._process: Any = None
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restarting: asyncio.Future | None = None
        self._failure: str | None = None

    # -- the worker -----------------------------------------------------------------------------

    def load(self) -> ModelFacts:
        """Spawn the worker and wait for the model (UserError with its message if it fails)."""
        self.spawn()
        return self.wait_loaded()

    def spawn(self) -> None:
        """Start the worker process; it loads the model while the caller goes on."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        ours, theirs = ctx.Pipe()
        self._process = ctx.Process(
            target=video_worker.run,
            args=(theirs, self.model, self.device, self.threads, self.nice, self.loader),
            name="parallm-video-worker",
            daemon=True,
        )
        self._process.start()
        theirs.close()
        self._conn = ours

    def wait_loaded(self) -> ModelFacts:
        """Wait until the worker has loaded the model; a UserError (and no worker) if it
        could not."""
        conn = self._conn
        try:
            message = conn.recv() if conn.poll(LOAD_TIMEOUT_S) else ("error", "timed out")
        except (EOFError, OSError):
            message = ("error", "the video worker exited while loading")
        if message[0] != "ready":
            self._end_worker()
            raise UserError(f"--video-model: {self.model}: {message[1]}")
        self.facts = ModelFacts(**message[1])
        return self.facts

    def start(self, on_end: Callable[[VideoJob], None] | None = None) -> None:
        """Take the worker's answers in the running event loop; `on_end(job)` is called once
        for each job as it ends (completed, failed or cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_message)
        if on_end is not None:
            self._on_end = on_end

    def stop(self) -> None:
        """End the worker, fail what is left and delete every result."""
        self.fail_all("the server is shutting down", "server_shutting_down")
        self._end_worker()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _end_worker(self) -> None:
        if self._conn is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.terminate()
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None

    def _on_message(self) -> None:
        try:
            while self._conn is not None and self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._worker_died()

    def _handle(self, message: tuple) -> None:
        kind, job_id = message[0], message[1]
        job = self.jobs.get(job_id)
        if job is None and kind == "done":  # deleted while its video was being written
            (self.dir / f"{job_id}.mp4").unlink(missing_ok=True)
        if kind == "progress":
            if job is not None and job.status == "in_progress":
                job.progress = message[2]
            return
        if job_id == self.running:
            self.running = None
        if job is not None and not job.finished:
            if kind == "done":
                job.status, job.progress, job.frames_generated = "completed", 100, message[2]
                job.completed_at = int(time.time())
                self._on_end(job)
            else:
                reason = message[2] or "cancelled"
                self._fail(job, reason, "generation_failed")
        self._next()

    def _worker_died(self) -> None:
        """The worker exited (killed, out of memory): fail its job, start a new one."""
        code = self._process.exitcode if self._process is not None else None
        print(f"parallm serve: the video worker exited ({code}); restarting it", file=sys.stderr)
        self._end_worker()
        if self.running is not None and self.running in self.jobs:
            job = self.jobs[self.running]
            self._fail(job, f"the video worker exited ({code})", "worker_failed")
        self.running = None
        assert self._loop is not None
        self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        try:
            await asyncio.to_thread(self.load)
        except UserError as e:
            self._failure = str(e)
            self.fail_all(f"the video worker cannot start: {e}", "worker_failed")
            return
        finally:
            self._restarting = None
        self.start()
        self._next()

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, job: VideoJob) -> None:
        """Queue `job` (429 when the queue is full, 503 when the worker cannot run)."""
        if self._failure is not None:
            raise APIError(503, self._failure, "server_error", code="worker_failed")
        waiting = len(self.queue) + (self.running is not None)
        if waiting >= self.max_queued:
            raise APIError(
                429,
                f"server busy: {waiting} videos are queued or running (the server's limit); "
                "retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "10"},
            )
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self._forget_old()
        self._next()

    def _next(self) -> None:
        if self.running is not None or self._conn is None or self._restarting is not None:
            return
        while self.queue:
            job = self.jobs.get(self.queue.popleft())
            if job is None or job.status != "queued":
                continue
            job.status, self.running = "in_progress", job.id
            self._conn.send(("generate", job.id, asdict(job.params), str(self.path(job))))
            return

    def path(self, job: VideoJob) -> Path:
        return self.dir / f"{job.id}.mp4"

    def delete(self, job: VideoJob) -> None:
        """Cancel a queued or running job, or delete a finished one and its video."""
        if not job.finished:
            if self.running == job.id and self._conn is not None:
                self._conn.send(("cancel", job.id))  # it answers "failed" between two steps
            self._fail(job, "deleted before it finished", "cancelled")
        self.jobs.pop(job.id, None)
        self.path(job).unlink(missing_ok=True)

    def fail_all(self, why: str, code: str) -> int:
        """Fail every queued and running job (the drain, the stop); how many there were."""
        ended = [job for job in self.jobs.values() if not job.finished]
        for job in ended:
            if self.running == job.id and self._conn is not None:
                self._conn.send(("cancel", job.id))
            self._fail(job, why, code)
        self.queue.clear()
        return len(ended)

    def _fail(self, job: VideoJob, message: str, code: str) -> None:
        job.status, job.error = "failed", {"code": code, "message": message}
        job.completed_at = int(time.time())
        self._on_end(job)

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished]
        for job in finished[: max(0, len(finished) - KEEP)]:
            self.jobs.pop(job.id, None)
            self.path(job).unlink(missing_ok=True)

    def owned(self, job_id: str, key: KeyInfo | None) -> VideoJob:
        """The job `job_id` of `key`; 404 for an unknown id or another key's job."""
        job = self.jobs.get(job_id)
        if job is None or job.key_id != (key.id if key is not None else None):
            raise APIError(
                404,
                f"video_id: no video {job_id!r} (unknown, deleted, or made by another key)",
                "not_found_error",
                param="video_id",
                code="video_not_found",
            )
        return job

    # -- requests -------------------------------------------------------------------------------

    def params(self, req: VideoRequest) -> VideoParams:
        """The request's values, its defaults filled in, checked against the model and the
        server's limits (a UserError naming the field)."""
        facts, limits = self.facts, self.limits
        assert facts is not None
        if req.model is not None and req.model != self.name:
            raise UserError(
                f"model: {req.model!r} is not a video model of this server; it serves "
                f"{self.name!r}",
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
    params = videos.params(req)
    access_log.note(model=videos.name)
    if state.draining or state.cut:
        raise draining_error()
    if key is not None:
        _charge_request(state, key)
    job = VideoJob(f"video_{uuid.uuid4().hex}", key.id if key else None, videos.name, params)
    videos.submit(job)
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
    return _service(state).owned(video_id, key).body()


@router.get("/v1/videos/{video_id}/content")
async def content(video_id: str, request: Request) -> FileResponse:
    state = state_of(request)
    videos = _service(state)
    key = await authorize(state, request)
    job = videos.owned(video_id, key)
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
    job = videos.owned(video_id, key)
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
