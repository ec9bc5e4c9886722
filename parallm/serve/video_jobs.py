"""The video jobs of a server (`parallm.serve.videos` is their HTTP side): the job table, the
queue, and the worker process (`video_worker`) that generates one job at a time, in order.

A job belongs to the key that created it (`owned`: None for others). It ends once: completed
(its MP4 in the server's temporary directory), failed (the worker's error, the drain), or
cancelled (deleted before it finished: the worker stops between two sampling steps), and
`on_end` (usage and metrics) is called then. At most `KEEP` finished jobs are kept, the oldest
deleted first; `stop()` deletes them all. A worker that dies (killed, out of memory) fails its
job and is started again.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from parallm.errors import UserError
from parallm.serve import video_worker
from parallm.serve.child import end_child
from parallm.serve.video_worker import ModelFacts, VideoParams

KEEP = 100  # finished jobs kept (with their videos); the oldest are deleted first
LOAD_TIMEOUT_S = 600.0


class QueueFull(Exception):
    """As many jobs as the server allows are queued or running."""


class WorkerDown(Exception):
    """The video worker could not be started again after it died."""


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
        end_child(self._process, self._conn, self._loop, wait=10, terminate=True)
        self._process = self._conn = None

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
        """Queue `job`; `QueueFull` or `WorkerDown` when it cannot be."""
        if self._failure is not None:
            raise WorkerDown(self._failure)
        waiting = len(self.queue) + (self.running is not None)
        if waiting >= self.max_queued:
            raise QueueFull(f"{waiting} videos are queued or running (the server's limit)")
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

    def owned(self, job_id: str, key_id: str | None) -> VideoJob | None:
        """The job `job_id` if the key `key_id` made it (None for an unknown id or another
        key's job: the same answer, so ids of other keys cannot be probed)."""
        job = self.jobs.get(job_id)
        return job if job is not None and job.key_id == key_id else None
