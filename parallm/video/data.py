"""Video training data: a CSV or JSONL manifest of (path, text) -> clips of one configured shape
per global batch.

A manifest row names a video file (relative paths resolve against the manifest's folder), its
caption, and optionally `num_frames`, `height`, `width`, `fps` (used only when the container
lacks them). `VideoDataset` probes every file's headers at construction (no frames decoded), so
undecodable files are known, skipped, counted and logged (each path once) before training
starts; frames are decoded lazily, per sample, and kept in a small LRU cache.

A sample is `frames` frames sampled from its clip — a stride of round(source fps / `fps`) when
`fps` is configured (shortened for a clip too short for it), else evenly over the whole clip —
center-cropped to the bucket's aspect ratio, resized (bilinear, antialiased) and scaled to
[-1, 1]. A clip with fewer frames than the smallest bucket it could fall in is dropped and counted
(`short_clips="drop"`, Open-Sora's behaviour: repeating frames would teach the model to freeze),
or padded by repeating its last frame (`short_clips="pad"`).

Bucketing: `buckets` is a list of (frames, height, width) (default: one bucket, the configured
size). Each clip goes to the bucket of the closest aspect ratio among those it has frames for
(then the longest, then the largest). Each epoch, every bucket's clips are permuted (seeded by
(seed, epoch)) and cut into global batches of `batch_size` — the last one filled by wrapping
around — and the batches are permuted. So a global batch holds one shape, and sample `index` is
a function of (seed, index) alone: resuming, and every data-parallel degree (each rank reads its
contiguous slice of a global batch), see the same samples.

Captions are kept whole (`captions`, indexed by a sample's `caption_index`); the text encoder
cuts one longer than its limit, and counts it.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from parallm.config import SHORT_CLIPS
from parallm.errors import UserError
from parallm.train.data import EpochOrder, iter_jsonl
from parallm.utils.progress import lead_process, load_progress
from parallm.video.io import VideoDecodeError, VideoInfo, probe_video, read_video

logger = logging.getLogger("parallm.video.data")

REQUIRED = ("path", "text")
OPTIONAL = {"num_frames": int, "height": int, "width": int, "fps": float}


@dataclass(frozen=True)
class ManifestRow:
    path: Path
    text: str
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """The rows of a `.csv` (with a header line) or `.jsonl` manifest; a missing or malformed
    column is a UserError naming the file, the line and the column."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        records = _csv_records(path)
    elif path.suffix.lower() == ".jsonl":
        records = iter_jsonl(path)
    else:
        raise UserError(f"{path}: a video manifest is a .csv or .jsonl file of path, text")
    try:
        return [_row(where, record, path.parent) for where, record in records]
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def _csv_records(path: Path):
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for name in REQUIRED:
            if name not in (reader.fieldnames or []):
                raise UserError(
                    f"{path}:1: no column {name!r} in the header (a video manifest needs "
                    f"path, text; optional {', '.join(OPTIONAL)})"
                )
        for record in reader:
            yield f"{path}:{reader.line_num}", record


def _row(where: str, record, folder: Path) -> ManifestRow:
    if not isinstance(record, dict):
        raise UserError(f"{where}: not an object with path and text")
    values = {}
    for name in REQUIRED:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: column {name!r} is missing or empty")
        values[name] = value
    for name, kind in OPTIONAL.items():
        value = record.get(name)
        if value is None or value == "":
            continue
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not number > 0 or (kind is int and number != float(value)):
            raise UserError(
                f"{where}: column {name!r}: {value!r} is not a positive {kind.__name__}"
            )
        values[name] = number
    path = Path(values.pop("path"))
    return ManifestRow(path=path if path.is_absolute() else folder / path, **values)


@dataclass(frozen=True)
class _Clip:
    row: ManifestRow
    info: VideoInfo
    bucket: int
    padded: bool


class VideoDataset(EpochOrder):
    """Clips from manifest rows, in global batches of one (frames, height, width) bucket.

    `sample(index)` -> dict of numpy values: `video` float32 (3, T, H, W) in [-1, 1],
    `caption_index` (into `captions`), `fps` (of the sampled frames), `num_frames`, `height`,
    `width`; `collate(samples)` stacks them into tensors. `stats` counts what was skipped."""

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        *,
        frames: int,
        height: int,
        width: int,
        seed: int = 0,
        shuffle: bool = True,
        batch_size: int = 1,
        fps: float | None = None,
        buckets: Iterable[Sequence[int]] | None = None,
        short_clips: str = "drop",
        cache_mb: float = 256.0,
    ) -> None:
        self.buckets = _check_buckets(buckets, frames, height, width)
        if short_clips not in SHORT_CLIPS:
            raise UserError(
                f"video.short_clips: {short_clips!r} is not valid; valid: {', '.join(SHORT_CLIPS)}"
            )
        if batch_size < 1:
            raise UserError(f"train.batch_size: {batch_size} must be at least 1")
        self.seed, self.shuffle, self.batch_size = seed, shuffle, batch_size
        self.fps, self.short_clips = fps, short_clips
        self.stats = {"rows": len(rows), "undecodable": 0, "short": 0, "undecodable_later": 0}
        self._clips = self._probe(list(rows))
        self.captions = [c.row.text for c in self._clips]
        self._bucket_of = np.array([c.bucket for c in self._clips], dtype=np.int64)
        self._num_samples: int | None = None
        self._cache: OrderedDict[int, tuple[np.ndarray, float]] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, int(cache_mb * 2**20)
        self._bad: set[int] = set()
        if not self._clips:
            raise UserError(f"data: none of the {len(rows)} videos is usable ({self.summary})")

    @classmethod
    def from_manifests(cls, paths: Iterable[str | Path], **kwargs) -> VideoDataset:
        return cls([row for p in paths for row in read_manifest(p)], **kwargs)

    # --- construction: probe headers, assign buckets -------------------------------------
    def _probe(self, rows: list[ManifestRow]) -> list[_Clip]:
        infos: list[VideoInfo | VideoDecodeError] = []
        with load_progress(f"probing {len(rows)} videos", len(rows)) as progress:
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(rows) // 32))) as pool:
                for info in pool.map(_probe_or_error, [r.path for r in rows]):
                    infos.append(info)
                    progress.update(1)
        clips, short = [], []
        for row, info in zip(rows, infos, strict=True):
            if isinstance(info, VideoDecodeError):
                self.stats["undecodable"] += 1
                _warn(f"skipped: {info}")
                continue
            if not info.fps and row.fps:
                info = replace(info, fps=row.fps)
            bucket, padded = self._bucket_for(info)
            if padded or bucket is None:
                short.append(row.path)
            if bucket is None:
                continue
            clips.append(_Clip(row, info, bucket, padded))
        self.stats["short"] = len(short)
        if short:
            what = "dropped" if self.short_clips == "drop" else "padded"
            _warn(
                f"{len(short)} clips shorter than {min(b[0] for b in self.buckets)} frames "
                f"{what} (e.g. {', '.join(str(p) for p in short[:3])})"
            )
        return clips

    def _bucket_for(self, info: VideoInfo) -> tuple[int | None, bool]:
        """(bucket index, padded): the closest aspect ratio among the buckets the clip has frames
        for, then the most frames and pixels; a clip too short for all of them goes to the
        shortest buckets when padding, else nowhere."""
        fits = [i for i, b in enumerate(self.buckets) if b[0] <= info.num_frames]
        padded = not fits
        if padded:
            if self.short_clips == "drop":
                return None, False
            shortest = min(b[0] for b in self.buckets)
            fits = [i for i, b in enumerate(self.buckets) if b[0] == shortest]
        aspect = math.log(info.height / info.width)

        def key(i: int) -> tuple[float, int, int]:
            t, h, w = self.buckets[i]
            return abs(math.log(h / w) - aspect), -t, -h * w

        return min(fits, key=key), padded

    @property
    def summary(self) -> str:
        s = self.stats
        shapes = ", ".join(f"{t}x{h}x{w}" for t, h, w in self.buckets)
        what = "dropped" if self.short_clips == "drop" else "padded"
        return (
            f"video data: {len(self._clips)} of {s['rows']} clips, buckets (frames x height x "
            f"width) {shapes}; {s['undecodable']} undecodable skipped, {s['short']} shorter "
            f"than the bucket {what}"
        )

    # --- order --------------------------------------------------------------------------
    def _view(self) -> np.ndarray:
        return np.arange(len(self._clips)) if self._ids is None else self._ids

    @property
    def num_samples(self) -> int:
        """Whole global batches per epoch: each bucket's clips rounded up to `batch_size`."""
        if self._num_samples is None:
            counts = np.bincount(self._bucket_of[self._view()], minlength=len(self.buckets))
            self._num_samples = int(sum(-(-n // self.batch_size) * self.batch_size for n in counts))
        return self._num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] == epoch:
            return self._epoch_order[1]
        rng = np.random.default_rng([self.seed, epoch])
        view = self._view()
        batches = []
        for b in range(len(self.buckets)):
            members = view[self._bucket_of[view] == b]
            if not len(members):
                continue
            if self.shuffle:
                members = rng.permutation(members)
            size = -(-len(members) // self.batch_size) * self.batch_size
            batches += list(np.resize(members, size).reshape(-1, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        order = np.concatenate(batches)
        self._epoch_order = (epoch, order)
        return order

    def sample(self, index: int) -> dict:
        """The `index`-th sample consumed since the start of training (epochs wrap around)."""
        epoch, i = divmod(index, self.num_samples)
        return self._load(int(self._order(epoch)[i]), index)

    def split(self, fraction: float):
        """(train, held out): a seeded `fraction` of the clips (at least one) held out, read in
        order, and the rest; a UserError when nothing would be left to train on."""
        view = self._view()
        n_eval = max(1, round(fraction * len(view)))
        if n_eval >= len(view):
            raise UserError(
                f"data.eval_fraction: {fraction} of {len(view)} clips leaves none to train on; "
                "lower it or add data"
            )
        perm = np.random.default_rng([self.seed, 1_000_003]).permutation(len(view))
        train, held = copy.copy(self), copy.copy(self)
        train._ids, held._ids = np.sort(view[perm[n_eval:]]), np.sort(view[perm[:n_eval]])
        train._epoch_order = held._epoch_order = (-1, None)
        train._num_samples = held._num_samples = None
        held.shuffle = False
        return train, held

    # --- one sample ---------------------------------------------------------------------
    def _load(self, clip_id: int, index: int) -> dict:
        clip_id, (video, src_fps) = self._decoded(clip_id)
        t, h, w = self.buckets[self._clips[clip_id].bucket]
        # Random temporal crops are seeded by the global sample index: every layout agrees.
        rng = np.random.default_rng([self.seed, index, 7]) if self.shuffle else None
        idx, fps = frame_indices(len(video), t, src_fps, self.fps, rng)
        return {
            "video": resize_clip(video[idx], h, w).numpy(),
            "caption_index": np.int64(clip_id),
            "fps": np.float32(fps),
            "num_frames": np.int64(t),
            "height": np.int64(h),
            "width": np.int64(w),
        }

    def _decoded(self, clip_id: int) -> tuple[int, tuple[np.ndarray, float]]:
        """(clip id, (frames, fps)); a clip that fails to decode although its headers read is
        logged once, counted, and replaced by the next decodable clip of its bucket."""
        bucket, n = self._clips[clip_id].bucket, len(self._clips)
        for step in range(n):
            cid = (clip_id + step) % n
            if cid in self._bad or self._clips[cid].bucket != bucket:
                continue
            if cid in self._cache:
                self._cache.move_to_end(cid)
                return cid, self._cache[cid]
            try:
                decoded = read_video(self._clips[cid].row.path)
            except VideoDecodeError as e:
                self._bad.add(cid)
                self.stats["undecodable_later"] += 1
                _warn(f"skipped: {e} (its headers read; another clip of its bucket is used)")
                continue
            self._remember(cid, decoded)
            return cid, decoded
        raise UserError(f"data: no clip of bucket {self.buckets[bucket]} decodes")

    def _remember(self, clip_id: int, decoded: tuple[np.ndarray, float]) -> None:
        size = decoded[0].nbytes
        if size > self._cache_limit:
            return
        self._cache[clip_id] = decoded
        self._cache_bytes += size
        while self._cache_bytes > self._cache_limit:
            _, (old, _) = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes

    @staticmethod
    def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
        """A batch: `video` (B, 3, T, H, W) float32 and (B,) tensors of the other fields."""
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def _probe_or_error(path: Path) -> VideoInfo | VideoDecodeError:
    try:
        return probe_video(path)
    except VideoDecodeError as e:
        return e


def _warn(message: str) -> None:
    if lead_process():
        logger.warning(message)


def _check_buckets(buckets, frames: int, height: int, width: int) -> list[tuple[int, int, int]]:
    out = []
    for b in buckets if buckets is not None else [(frames, height, width)]:
        b = tuple(b)
        if len(b) != 3 or not all(isinstance(v, int) and v > 0 for v in b):
            raise UserError(
                f"video.buckets: {list(b)} is not [frames, height, width] of positive integers"
            )
        out.append(b)
    if not out:
        raise UserError("video.buckets: empty; give at least one [frames, height, width]")
    return out


def frame_indices(
    available: int, frames: int, src_fps: float, fps: float | None, rng=None
) -> tuple[np.ndarray, float]:
    """(indices of the `frames` frames to take from a clip of `available`, their fps).

    With a target `fps` and a known source fps: every round(src_fps / fps)-th frame (fewer when
    the clip is too short for that stride), starting at a random frame (`rng`) or centered.
    Otherwise evenly spread over the whole clip. Fewer frames than asked: the last one repeats."""
    if available >= frames and fps and src_fps:
        stride = max(1, round(src_fps / fps))
        stride = min(stride, (available - 1) // max(frames - 1, 1) or 1)
        slack = available - ((frames - 1) * stride + 1)
        start = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
        return start + stride * np.arange(frames), src_fps / stride
    if available >= frames:
        idx = np.round(np.linspace(0, available - 1, frames)).astype(np.int64)
        span = (available - 1) / max(frames - 1, 1)
        return idx, (src_fps / span if src_fps else float(fps or 0.0))
    idx = np.minimum(np.arange(frames), available - 1)
    return idx, float(src_fps or fps or 0.0)


def resize_clip(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, h, w, 3) -> float32 (3, T, height, width) in [-1, 1]: center-cropped to the
    target aspect ratio, then resized (bilinear, antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    h, w = x.shape[-2:]
    if h * width > height * w:  # too tall for the target: crop rows
        keep = max(1, round(w * height / width))
        top = (h - keep) // 2
        x = x[:, :, top : top + keep]
    elif h * width < height * w:  # too wide: crop columns
        keep = max(1, round(h * width / height))
        left = (w - keep) // 2
        x = x[:, :, :, left : left + keep]
    if x.shape[-2:] != (height, width):
        x = torch.nn.functional.interpolate(
            x, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()
