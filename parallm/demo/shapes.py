"""Synthetic captioned videos for the text-to-video demo: one coloured shape moving on a plain
dark background, and a tracker that measures what a generated clip shows.

`python -m parallm.demo.shapes data --out DIR` writes, from a seed:
  train/*.mp4, train.jsonl     clips captioned like "a red circle moving left": 5 colours x 4
                               directions x 2 shapes = 40 combinations, of which 32 are trained on
  heldout/*.mp4, heldout.jsonl the 8 others: two colour-shape pairs (a red square, a green
                               circle) in every direction, never trained on (a compositional
                               split); the clips are references, the prompts are evaluated
`python -m parallm.demo.shapes eval --model DIR --data DIR/heldout.jsonl` generates a clip for
each held-out prompt (`parallm.video.pipeline.VideoPipeline`), tracks it, and prints (and saves
as JSON) colour, direction and joint accuracy against chance, with a few clips as MP4 and GIF.

The tracker (`track`): pixels far from the clip's background (its median colour) are the shape;
each frame's mean shape colour votes for the nearest named colour, and the least-squares slope of
the shape's centroid over the frames gives the direction (None when it moves less than a tenth of
the frame, or no shape is seen).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parallm.utils.fs import write_json_atomic, write_lines_atomic

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 250),
    "yellow": (240, 220, 30),
    "white": (240, 240, 240),
}
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
SHAPES = ("circle", "square")
BACKGROUND = (16, 16, 20)
FPS = 8.0
# Pixels whose largest channel difference from the background exceeds this are the shape.
SHAPE_THRESHOLD = 60
MIN_MOVE = 0.1  # of the frame size: less is "not moving"
TRAVEL = 0.35  # of the frame size, from the first frame to the last
# Where a path starts: this fraction of its travel before the frame's centre, so it runs from
# near the centre out towards the edge it is named for. (A path centred on the frame, as before,
# puts a "left" and a "right" shape on the same pixels over the clip: neither the word alone nor
# the frame index alone then says anything about where the shape is, only the two together, and
# the model never learnt that. Paths starting at the centre make each informative alone.)
START_BEHIND = 0.2
JITTER = 0.1  # of the frame size: how far a path's start varies along its direction


@dataclass(frozen=True)
class Combo:
    colour: str
    direction: str
    shape: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


# Colour-shape pairs never trained on: their 8 triples (all four directions) are held out.
HELD_OUT_PAIRS = (("red", "square"), ("green", "circle"))


def combos() -> tuple[list[Combo], list[Combo]]:
    """(training, held-out) combinations: the held-out ones are every direction of the
    HELD_OUT_PAIRS (a red square was never seen, red circles and green squares moving left
    were), so every colour, direction and shape, and every (colour, direction) and (shape,
    direction) pair, is in training, but not these triples."""
    train, held = [], []
    for shape, colour, direction in itertools.product(SHAPES, COLOURS, DIRECTIONS):
        combo = Combo(colour, direction, shape)
        (held if (colour, shape) in HELD_OUT_PAIRS else train).append(combo)
    return train, held


def render(combo: Combo, *, frames: int, size: int, rng: random.Random) -> np.ndarray:
    """uint8 (frames, size, size, 3): the shape travelling TRAVEL of the frame in its
    direction from near the centre (START_BEHIND of the travel before it, give or take JITTER
    of the frame) towards the edge, at a random place across the motion, inside the frame."""
    r = max(2.0, size / 6.4)  # circle radius, and half the square's side
    travel = TRAVEL * size
    dx, dy = DIRECTIONS[combo.direction]
    lo, hi = r + 0.5, size - 1.5 - r
    # The start, measured from the edge the shape moves away from, kept inside the frame.
    start = (size - 1) / 2 - START_BEHIND * travel
    jitter = max(0.0, min(JITTER * size, start - lo, hi - travel - start))
    along = min(max(lo, start + rng.uniform(-jitter, jitter)), hi - travel)
    across = rng.uniform(lo, hi)
    if dx:
        x0, y0 = (along if dx > 0 else size - 1 - along), across
    else:
        x0, y0 = across, (along if dy > 0 else size - 1 - along)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = BACKGROUND
    for t in range(frames):
        f = t / max(frames - 1, 1)
        cx, cy = x0 + dx * travel * f, y0 + dy * travel * f
        if combo.shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            mask = (np.abs(xx - cx) <= r * 0.9) & (np.abs(yy - cy) <= r * 0.9)
        video[t][mask] = COLOURS[combo.colour]
    return video


def make_data(
    out: Path, *, n: int = 512, heldout: int = 32, frames: int = 8, size: int = 16, seed: int = 0
) -> dict[str, int]:
    """Write the training and held-out clips and their JSONL manifests under `out`; returns
    the row counts and the number of held-out combinations."""
    from parallm.video.io import write_video

    train_combos, held_combos = combos()
    rng = random.Random(seed)
    counts = {}
    for split, count, pool in (("train", n, train_combos), ("heldout", heldout, held_combos)):
        rows = []
        for k in range(count):
            combo = pool[k % len(pool)] if split == "heldout" else rng.choice(pool)
            rel = f"{split}/{k:05d}.mp4"
            write_video(out / rel, render(combo, frames=frames, size=size, rng=rng), FPS)
            rows.append(
                {
                    "path": rel,
                    "text": combo.caption,
                    "colour": combo.colour,
                    "direction": combo.direction,
                    "shape": combo.shape,
                    "num_frames": frames,
                    "height": size,
                    "width": size,
                    "fps": FPS,
                }
            )
        write_lines_atomic(out / f"{split}.jsonl", [json.dumps(r) for r in rows])
        counts[f"{split}.jsonl"] = len(rows)
    counts["heldout_combinations"] = len(held_combos)
    counts["train_combinations"] = len(train_combos)
    return counts


@dataclass(frozen=True)
class Track:
    colour: str | None
    direction: str | None


def track(video) -> Track:
    """The colour and direction a clip shows: uint8 (T, H, W, 3) or float (3, T, H, W) in
    [-1, 1]."""
    from parallm.video.io import to_uint8

    v = to_uint8(video).astype(np.int16)  # (T, H, W, 3)
    t, h, w, _ = v.shape
    background = np.median(v.reshape(-1, 3), axis=0)
    shape = np.abs(v - background).max(-1) > SHAPE_THRESHOLD  # (T, H, W)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    names = list(COLOURS)
    votes, times, centroids = Counter(), [], []
    min_pixels = max(2, h * w // 400)
    for i in range(t):
        ys, xs = np.nonzero(shape[i])
        if len(ys) < min_pixels:
            continue
        mean = v[i][shape[i]].mean(0)
        votes[names[int(np.argmin(((palette - mean) ** 2).sum(1)))]] += 1
        times.append(i)
        centroids.append((xs.mean(), ys.mean()))
    colour = votes.most_common(1)[0][0] if votes else None
    direction = None
    if len(times) >= 2:
        c = np.array(centroids)
        slope = np.polyfit(np.array(times, dtype=np.float64), c, 1)[0]  # (dx, dy) per frame
        dx, dy = slope * (t - 1)
        if np.hypot(dx, dy) >= MIN_MOVE * max(h, w):
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
    return Track(colour, direction)


def score(tracks: list[Track], rows: list[dict]) -> dict[str, float]:
    """Colour, direction and joint accuracy of `tracks` against the rows' labels, with chance."""
    n = max(len(rows), 1)
    colour = sum(tr.colour == r["colour"] for tr, r in zip(tracks, rows, strict=True))
    direction = sum(tr.direction == r["direction"] for tr, r in zip(tracks, rows, strict=True))
    both = sum(
        tr.colour == r["colour"] and tr.direction == r["direction"]
        for tr, r in zip(tracks, rows, strict=True)
    )
    return {
        "n": len(rows),
        "colour_accuracy": colour / n,
        "direction_accuracy": direction / n,
        "both_accuracy": both / n,
        "colour_chance": 1 / len(COLOURS),
        "direction_chance": 1 / len(DIRECTIONS),
        "both_chance": 1 / (len(COLOURS) * len(DIRECTIONS)),
    }


def read_rows(path: Path) -> list[dict]:
    from parallm.train.data import iter_jsonl

    return [row for _, row in iter_jsonl(path)]


def evaluate(
    model: str,
    rows: list[dict],
    *,
    steps: int = 30,
    guidance: float = 7.0,
    seed: int = 0,
    batch: int = 8,
    out: Path | None = None,
    clips: int = 4,
) -> dict:
    """Generate each row's prompt with the model, track it and score it; with `out`, write the
    scores (eval.json) and the first `clips` clips (MP4 and GIF) there."""
    from parallm.video.io import write_video
    from parallm.video.pipeline import VideoPipeline

    pipe = VideoPipeline.load(model)
    fps = pipe.config.fps  # the size and fps the model was trained at
    tracks, written = [], []
    for b in range(0, len(rows), batch):
        part = rows[b : b + batch]
        videos = pipe.generate(
            [r["text"] for r in part],
            steps=steps,
            guidance=guidance,
            seed=seed + b,
        )
        for k, (row, video) in enumerate(zip(part, videos, strict=True)):
            tracks.append(track(video))
            if out is not None and b + k < clips:
                stem = f"{b + k:02d}-{row['text'].removeprefix('a ').replace(' ', '-')}"
                for suffix in (".mp4", ".gif"):
                    written.append(str(write_video(out / f"{stem}{suffix}", video, fps)))
    result = score(tracks, rows)
    result |= {"steps": steps, "guidance": guidance, "seed": seed}
    if out is not None:
        details = [
            {"text": r["text"], "colour": t.colour, "direction": t.direction}
            for r, t in zip(rows, tracks, strict=True)
        ]
        write_json_atomic(out / "eval.json", {**result, "clips": written, "tracks": details})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallm.demo.shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the synthetic clips and captions")
    data.add_argument("--out", required=True, type=Path)
    data.add_argument("--n", type=int, default=512, help="training clips")
    data.add_argument("--heldout", type=int, default=32, help="held-out prompts (and clips)")
    data.add_argument("--frames", type=int, default=8)
    data.add_argument("--size", type=int, default=16, help="height and width in pixels")
    data.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="colour and direction accuracy on held-out prompts")
    ev.add_argument("--model", required=True, help="a model directory written by parallm train")
    ev.add_argument("--data", required=True, type=Path, help="heldout.jsonl")
    ev.add_argument("--steps", type=int, default=30, help="sampler steps")
    ev.add_argument("--guidance", type=float, default=7.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch", type=int, default=8, help="prompts generated together")
    ev.add_argument(
        "--out", type=Path, help="where eval.json and clips go (default: beside --model)"
    )
    ev.add_argument("--clips", type=int, default=4, help="clips written as MP4 and GIF")
    args = parser.parse_args(argv)
    if args.command == "data":
        counts = make_data(
            args.out,
            n=args.n,
            heldout=args.heldout,
            frames=args.frames,
            size=args.size,
            seed=args.seed,
        )
        print(json.dumps({"out": str(args.out), **counts}))
        return 0
    out = args.out or Path(args.model).resolve().parent / "shapes-eval"
    result = evaluate(
        args.model,
        read_rows(args.data),
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch=args.batch,
        out=out,
        clips=args.clips,
    )
    print(json.dumps({**result, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
