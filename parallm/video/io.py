"""Video files: read any container PyAV decodes, write MP4 (H.264, yuv420p) or GIF.

`read_video(path) -> (frames uint8 (T, H, W, 3), fps)`; `probe_video(path)` reads the headers
only (frame count, size, fps); `write_video(path, video, fps)` takes uint8 (T, H, W, 3) or a float
tensor (3, T, H, W) in [-1, 1] and writes through a temporary name, so a reader never sees half a
file. A file that does not decode raises `VideoDecodeError` (a `UserError` naming the path), which
the dataset catches to skip and count it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from parallm.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".gif")


class VideoDecodeError(UserError):
    """A file that is not a decodable video (missing, not a container, no video stream, no
    frames, or corrupt data)."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


def _open(path: str | os.PathLike):
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: not a readable video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: not a readable video (no video stream)")
    return container


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and fps from the container's headers, without decoding frames (a
    container that stores no frame count, e.g. some GIFs, is counted by demuxing packets)."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fps, frames = _fps(stream), int(stream.frames or 0)
        if frames <= 0:
            frames = sum(1 for p in container.demux(stream) if p.size)
        if frames <= 0 or not ctx.width or not ctx.height:
            raise VideoDecodeError(f"{path}: not a readable video (no frames)")
        return VideoInfo(frames, int(ctx.height), int(ctx.width), fps)
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: not a readable video ({_reason(e)})") from None
    finally:
        container.close()


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Every frame of the first video stream as uint8 RGB (T, H, W, 3), and its fps (0.0 when
    the container gives none)."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = _fps(stream)
    except (av.FFmpegError, ValueError) as e:
        raise VideoDecodeError(f"{path}: does not decode ({_reason(e)})") from None
    finally:
        container.close()
    if not frames:
        raise VideoDecodeError(f"{path}: does not decode (no frames)")
    return np.stack(frames), fps


def to_uint8(video) -> np.ndarray:
    """uint8 (T, H, W, 3) from uint8 (T, H, W, 3) or a float tensor/array (3, T, H, W) in
    [-1, 1] (values outside are clipped)."""
    if hasattr(video, "detach"):  # a torch tensor
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 video must be (T, H, W, 3), got {video.shape}")
        return video
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"float video must be (3, T, H, W) in [-1, 1], got {video.shape}")
    scaled = (np.clip(video, -1.0, 1.0) + 1.0) * 127.5
    return np.round(scaled).astype(np.uint8).transpose(1, 2, 3, 0)


def write_video(path: str | os.PathLike, video, fps: float) -> Path:
    """Write `video` (uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1]) to `path`: ".mp4"
    (H.264, yuv420p; an odd height or width is padded by repeating the last row/column, since
    4:2:0 needs even sizes) or ".gif". Written to a temporary name, then renamed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"{path}: cannot write a {suffix or 'suffix-less'} file; use .mp4 or .gif")
    if not fps or fps <= 0:
        raise UserError(f"fps: {fps} is not a positive frame rate")
    frames = to_uint8(video)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        if suffix == ".mp4":
            _write_mp4(tmp, frames, fps)
        else:
            _write_gif(tmp, frames, fps)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    import av

    t, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w + pad_w, h + pad_h
        stream.pix_fmt = "yuv420p"
        # Near-lossless: small synthetic clips keep their colours and edges (crf 0 would need
        # the high-4:4:4 profile, which common players refuse).
        stream.options = {"crf": "10", "preset": "medium"}
        for frame in frames:
            packet = stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
            container.mux(packet)
        container.mux(stream.encode())


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    import imageio.v3 as iio

    # GIF stores frame durations in centiseconds; loop=0 repeats forever.
    iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
