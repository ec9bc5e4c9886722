"""The video worker: a child process that loads the video pipeline once and generates one video
at a time for the server (`parallm.serve.videos`).

Why a process, not a thread of the server: a video is minutes of torch compute, and in the
server's process it would share the GIL and torch's intra-op threads with the text engine, so
every token would wait behind it. In its own process it has its own torch thread count
(`threads`) and runs at a lower scheduling priority (`nice`), so on a machine with few cores the
text engine gets the CPU first and videos take what is left (docs: measured in the report of
issue 13).

The protocol is a `multiprocessing` pipe of tuples. To the worker: `("generate", job_id, params,
path)` and `("cancel", job_id)`. From it: `("ready", facts)` once loaded (or `("error", message)`
and it exits), then per job `("progress", job_id, percent)`, and `("done", job_id, frames)` or
`("failed", job_id, message)` (`message` None when the job was cancelled).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from parallm.errors import UserError


@dataclass(frozen=True, kw_only=True)
class VideoParams:
    """One video to generate (checked by the server first)."""

    prompt: str
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    fps: float


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """What the server needs of the loaded model to check requests: its defaults (video.json)
    and the multiples its autoencoder needs."""

    frames: int
    height: int
    width: int
    fps: float
    frame_multiple: int  # the autoencoder's temporal factor
    size_multiple: int  # its spatial factor


class Cancelled(Exception):
    """The server cancelled the job being generated."""


def load_pipeline(path: str, device: str) -> Any:
    """The default loader: `VideoPipeline.load(path)` on `device`."""
    from parallm.video.pipeline import VideoPipeline

    return VideoPipeline.load(path, device=device)


def model_facts(pipeline: Any) -> ModelFacts:
    cfg, ae = pipeline.config, pipeline.autoencoder
    return ModelFacts(
        frames=cfg.frames,
        height=cfg.height,
        width=cfg.width,
        fps=float(cfg.fps),
        frame_multiple=ae.temporal_factor,
        size_multiple=ae.spatial_factor,
    )


def run(
    conn: Connection,
    model: str,
    device: str,
    threads: int,
    nice: int,
    loader: Callable[[str, str], Any],
) -> None:
    """The worker process's main: load, say ready, then generate until the pipe closes."""
    try:
        if nice:
            os.nice(nice)
        import torch

        torch.set_num_threads(threads)
        pipeline = loader(model, device)
        facts = model_facts(pipeline)
    except UserError as e:
        conn.send(("error", str(e)))
        return
    except Exception as e:  # a bug or a broken install: the server exits with it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", asdict(facts)))
    _Generator(conn, pipeline).serve()


class _Generator:
    def __init__(self, conn: Connection, pipeline: Any) -> None:
        self.conn, self.pipeline = conn, pipeline
        self.job: str | None = None
        self.steps = self.sent = 0

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # the server is gone or stopped us
            if message[0] == "generate":
                self._generate(*message[1:])
            # a "cancel" for a job that is over already: nothing to do

    def _generate(self, job_id: str, params: dict, path: str) -> None:
        from parallm.video.io import write_video

        p = VideoParams(**params)
        self.job, self.steps, self.sent = job_id, p.steps, 0
        try:
            video = self.pipeline.generate(
                [p.prompt],
                frames=p.frames,
                height=p.height,
                width=p.width,
                steps=p.steps,
                guidance=p.guidance,
                seed=p.seed,
                fps=p.fps,
                on_step=self._step,
            )
            write_video(path, video[0], p.fps)
        except Cancelled:
            self.conn.send(("failed", job_id, None))
        except Exception as e:
            print(f"parallm serve: video {job_id} failed: {e!r}", file=sys.stderr, flush=True)
            self.conn.send(("failed", job_id, f"generation failed: {type(e).__name__}: {e}"))
        else:
            self.conn.send(("done", job_id, int(video.shape[2])))
        finally:
            self.job = None

    def _step(self, step: int) -> None:
        """After sampling step `step` (0-based): the job's progress, and a cancel between steps."""
        while self.conn.poll():
            message = self.conn.recv()
            if message[0] == "cancel" and message[1] == self.job:
                raise Cancelled
        percent = min(99, 100 * (step + 1) // max(1, self.steps))
        if percent > self.sent:
            self.sent = percent
            self.conn.send(("progress", self.job, percent))
