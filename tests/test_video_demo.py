"""The moving-shapes demo: its data, its compositional split and its tracker."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from parallm.demo import shapes
from parallm.demo.shapes import COLOURS, DIRECTIONS, SHAPES, Combo, Track, combos, render, track
from parallm.video.io import read_video


def test_held_out_triples_are_unseen_but_their_parts_are_trained():
    train, held = combos()
    assert len(train) == 32 and len(held) == 8 and not set(train) & set(held)
    assert len(set(train) | set(held)) == len(COLOURS) * len(DIRECTIONS) * len(SHAPES)
    for c in held:
        assert any(t.colour == c.colour and t.direction == c.direction for t in train)
        assert any(t.direction == c.direction and t.shape == c.shape for t in train)
        assert not any(t.colour == c.colour and t.shape == c.shape for t in train)


@pytest.mark.parametrize("size", [16, 32])
def test_tracker_reads_every_clean_clip(size):
    train, held = combos()
    for k, combo in enumerate(train + held):
        video = render(combo, frames=8, size=size, rng=random.Random(k))
        assert track(video) == Track(combo.colour, combo.direction), combo


@pytest.mark.parametrize("size", [16, 32])
def test_paths_run_from_near_the_centre_towards_their_edge(size):
    """Over a clip a shape keeps to the side it moves to, so the direction word alone says
    where it is (a path centred on the frame would put "left" and "right" on the same pixels)."""
    train, held = combos()
    centre = (size - 1) / 2
    for k, combo in enumerate(train + held):
        video = render(combo, frames=8, size=size, rng=random.Random(k))
        ts, ys, xs = np.nonzero(np.abs(video.astype(int) - shapes.BACKGROUND).max(-1) > 60)
        dx, dy = DIRECTIONS[combo.direction]
        along = xs if dx else ys
        sign = dx or dy
        assert sign * (along.mean() - centre) > 0.05 * size, combo
        first = along[ts == 0].mean()
        assert abs(first - centre) < 0.15 * size, combo


def test_tracker_on_a_static_an_empty_and_a_float_clip():
    video = render(Combo("blue", "up", "square"), frames=6, size=32, rng=random.Random(0))
    assert track(np.repeat(video[:1], 6, axis=0)) == Track("blue", None)
    assert track(np.full_like(video, 16)) == Track(None, None)
    as_float = video.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1  # (3, T, H, W)
    assert track(as_float) == Track("blue", "up")


def test_data_writes_clips_the_tracker_reads_back(tmp_path):
    counts = shapes.make_data(tmp_path, n=12, heldout=8, frames=6, size=16, seed=1)
    assert counts["train.jsonl"] == 12 and counts["heldout.jsonl"] == 8
    held = shapes.read_rows(tmp_path / "heldout.jsonl")
    trained = {r["text"] for r in shapes.read_rows(tmp_path / "train.jsonl")}
    assert len({r["text"] for r in held}) == 8 and not trained & {r["text"] for r in held}
    for row in shapes.read_rows(tmp_path / "train.jsonl") + held:
        video, fps = read_video(tmp_path / row["path"])
        assert video.shape == (6, 16, 16, 3) and fps == shapes.FPS
        assert track(video) == Track(row["colour"], row["direction"])
        assert row["text"] == f"a {row['colour']} {row['shape']} moving {row['direction']}"


def test_score_counts_against_chance():
    rows = [{"colour": "red", "direction": "left"}, {"colour": "blue", "direction": "up"}]
    tracks = [Track("red", "right"), Track("blue", "up")]
    got = shapes.score(tracks, rows)
    assert (got["colour_accuracy"], got["direction_accuracy"], got["both_accuracy"]) == (
        1,
        0.5,
        0.5,
    )
    assert (got["colour_chance"], got["direction_chance"]) == (0.2, 0.25)
    json.dumps(got)


def test_a_short_training_run_beats_chance_on_held_out_prompts(tmp_path):
    """The demo end to end at a reduced size: data, `parallm train` (the flow task on a tiny
    STDiT3 with the demo's frame embedding), then generation of held-out prompts scored by the
    tracker. Only colour is asserted: direction needs ~1,000 steps at this size and the demo's
    timestep_loc 2 (56-81% on 16 held-out prompts, ~90 s on a busy CPU); at 250 or 400 steps
    it is at chance, and timestep_loc 2 made colour less steady there (25-100%; 69-94% at
    the default 0), so the test keeps the default."""
    from parallm.config import JobConfig, load_config
    from parallm.train.trainer import Trainer

    shapes.make_data(tmp_path / "data", n=160, heldout=16, frames=4, size=16, seed=0)
    overrides = [
        f"--data.paths={tmp_path / 'data' / 'train.jsonl'}",
        "--task.name=flow",
        "--model.architecture=STDiT3",
        "--model.dim=64",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--video.frames=4",
        "--video.height=16",
        "--video.width=16",
        "--video.patch=[1,4,4]",
        "--video.caption_length=8",
        "--video.caption_channels=64",
        "--video.temporal_pos_embed=true",
        "--train.steps=250",
        "--train.batch_size=16",
        "--train.lr=3e-3",
        "--train.warmup_steps=10",
        "--train.log_every=1000",
        "--checkpoint.every=0",
        f"--output.dir={tmp_path / 'run'}",
    ]
    threads = torch.get_num_threads()
    # Tensors this small run fastest on one thread (a second one mostly waits, and on a busy
    # machine the run took 4x longer with two).
    torch.set_num_threads(1)
    try:
        records = Trainer(load_config(JobConfig, None, overrides)).fit()
        rows = shapes.read_rows(tmp_path / "data" / "heldout.jsonl")
        result = shapes.evaluate(str(tmp_path / "run" / "hf"), rows, steps=10, guidance=7.0)
    finally:
        torch.set_num_threads(threads)
    assert records[-1]["loss"] < records[0]["loss"] / 4
    assert result["n"] == 16
    assert result["colour_accuracy"] >= 2 * result["colour_chance"], result
