"""Video files and the video dataset: manifests, decoding, frame sampling, resizing, bucketing."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from parallm.errors import UserError
from parallm.video import data as video_data
from parallm.video.data import VideoDataset, frame_indices, read_manifest, resize_clip
from parallm.video.io import VideoDecodeError, probe_video, read_video, write_video


def ramp_clip(frames: int, height: int, width: int) -> np.ndarray:
    """Flat grey frames whose level encodes the frame index (20 * t + 20)."""
    levels = (20 * np.arange(frames) + 20).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()


def write_clips(folder, shapes, name="clip") -> list[dict]:
    rows = []
    for i, (t, h, w) in enumerate(shapes):
        write_video(folder / f"{name}{i}.mp4", ramp_clip(t, h, w), 8)
        rows.append({"path": f"{name}{i}.mp4", "text": f"clip {i}"})
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_write_video_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    video = np.full((6, 16, 20, 3), 16, np.uint8)
    for t in range(6):  # a moving square, so no two GIF frames are alike
        video[t, 4:10, 2 + 2 * t : 8 + 2 * t] = (230, 40, 40)
    for suffix, tolerance in ((".mp4", 4.0), (".gif", 0.5)):
        path = write_video(tmp_path / f"a{suffix}", video, 8)
        frames, fps = read_video(path)
        assert frames.shape == video.shape and frames.dtype == np.uint8
        assert np.abs(frames.astype(int) - video).mean() < tolerance
        assert fps == pytest.approx(8, rel=0.05)
        assert probe_video(path).num_frames == 6
    # float (3, T, H, W) in [-1, 1]; an odd size is padded to even for 4:2:0
    noise = torch.from_numpy(rng.uniform(-1, 1, (3, 2, 7, 9)).astype(np.float32))
    frames, _ = read_video(write_video(tmp_path / "odd.mp4", noise, 4))
    assert frames.shape == (2, 8, 10, 3)
    with pytest.raises(UserError, match=r"\.avi"):
        write_video(tmp_path / "x.avi", video, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4", "odd.mp4"]


def test_undecodable_files_raise_decode_errors(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 50)
    for path in (tmp_path / "bad.mp4", tmp_path / "missing.mp4"):
        with pytest.raises(VideoDecodeError, match=path.name):
            read_video(path)
        with pytest.raises(VideoDecodeError, match=path.name):
            probe_video(path)


def test_manifest_csv_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "m.csv").write_text(
        'path,text,fps,num_frames\nsub/a.mp4,"a, comma",24,\n/abs/b.mp4,b,,16\n'
    )
    rows = read_manifest(tmp_path / "m.csv")
    assert rows[0].path == tmp_path / "sub/a.mp4" and str(rows[1].path) == "/abs/b.mp4"
    assert (rows[0].text, rows[0].fps, rows[0].num_frames) == ("a, comma", 24.0, None)
    assert (rows[1].fps, rows[1].num_frames) == (None, 16)
    write_jsonl(tmp_path / "m.jsonl", [{"path": "c.mp4", "text": "c", "height": 32}])
    (row,) = read_manifest(tmp_path / "m.jsonl")
    assert (row.path, row.text, row.height) == (tmp_path / "c.mp4", "c", 32)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("m.csv", "path,caption\na.mp4,x\n", r"m\.csv:1: no column 'text'"),
        ("m.csv", "path,text\na.mp4,x\nb.mp4,\n", r"m\.csv:3: column 'text'"),
        ("m.csv", "path,text,fps\na.mp4,x,fast\n", r"m\.csv:2: column 'fps': 'fast'"),
        (
            "m.jsonl",
            '{"path": "a.mp4", "text": "x"}\n{"text": "y"}\n',
            r"m\.jsonl:2: column 'path'",
        ),
        ("m.jsonl", '{"path": "a.mp4", "text": "x", "num_frames": 2.5}\n', r"'num_frames': 2\.5"),
        ("m.txt", "a.mp4 x\n", r"m\.txt: a video manifest is a \.csv or \.jsonl"),
    ],
)
def test_manifest_errors_name_file_line_and_column(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=match):
        read_manifest(tmp_path / name)


def test_frame_indices():
    # evenly over the clip without a target fps
    idx, fps = frame_indices(8, 4, 8.0, None)
    assert idx.tolist() == [0, 2, 5, 7] and fps == pytest.approx(8 * 3 / 7)
    # a stride of source fps / target fps, centered (or at a seeded random start)
    idx, fps = frame_indices(20, 4, 24.0, 8.0)
    assert idx.tolist() == [5, 8, 11, 14] and fps == 8.0
    starts = {
        int(frame_indices(20, 4, 24.0, 8.0, np.random.default_rng(s))[0][0]) for s in range(40)
    }
    assert starts == set(range(11))
    # too short for the stride: the largest stride that fits
    assert frame_indices(7, 4, 24.0, 8.0)[0].tolist() == [0, 2, 4, 6]
    # too short for the frames: the last frame repeats
    assert frame_indices(3, 5, 8.0, None)[0].tolist() == [0, 1, 2, 2, 2]


def test_resize_crops_to_the_aspect_ratio_then_scales():
    frames = np.zeros((2, 8, 16, 3), np.uint8)
    frames[:, :, 4:12] = 255  # the center square of a wide frame is white, its sides black
    out = resize_clip(frames, 4, 4)
    assert out.shape == (3, 2, 4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones_like(out))  # the black sides are cropped away
    out = resize_clip(frames, 8, 16)  # same size: only scaled to [-1, 1]
    assert out.min() == -1.0 and out.max() == 1.0


def test_samples_are_sampled_resized_and_scaled(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", write_clips(tmp_path, [(8, 32, 48)]))
    ds = VideoDataset.from_manifests([tmp_path / "m.jsonl"], frames=4, height=16, width=16)
    s = ds.sample(0)
    assert s["video"].shape == (3, 4, 16, 16) and s["video"].dtype == np.float32
    levels = (20 * np.array([0, 2, 5, 7]) + 20) / 127.5 - 1  # frames 0, 2, 5, 7 of 8
    np.testing.assert_allclose(s["video"].mean(axis=(0, 2, 3)), levels, atol=0.03)
    assert (s["num_frames"], s["height"], s["width"]) == (4, 16, 16)
    assert ds.captions[s["caption_index"]] == "clip 0"
    batch = ds.collate([ds.sample(0), ds.sample(1)])
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["caption_index"].dtype == torch.int64


def test_undecodable_and_short_clips_are_skipped_and_counted(tmp_path, caplog):
    rows = write_clips(tmp_path, [(4, 16, 16), (4, 16, 16), (2, 16, 16)])
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 400)
    rows.append({"path": "bad.mp4", "text": "broken"})
    rows.append({"path": "gone.mp4", "text": "missing"})
    write_jsonl(tmp_path / "m.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="parallm.video.data"):
        ds = VideoDataset.from_manifests([tmp_path / "m.jsonl"], frames=4, height=8, width=8)
    assert ds.stats == {"rows": 5, "undecodable": 2, "short": 1, "undecodable_later": 0}
    assert ds.captions == ["clip 0", "clip 1"] and len(ds) == 2
    log = caplog.text
    assert log.count("bad.mp4") == 1 and log.count("gone.mp4") == 1 and "clip2.mp4" in log
    assert "2 undecodable skipped, 1 shorter than the bucket dropped" in ds.summary
    padded = VideoDataset.from_manifests(
        [tmp_path / "m.jsonl"], frames=4, height=8, width=8, short_clips="pad"
    )
    assert len(padded) == 3 and padded.stats["short"] == 1
    video = padded.sample(padded._order(0).tolist().index(2))["video"]
    np.testing.assert_allclose(video[:, 2], video[:, 3])  # the last of 2 frames repeats
    with pytest.raises(UserError, match="none of the 5 videos"):
        VideoDataset.from_manifests([tmp_path / "m.jsonl"], frames=9, height=8, width=8)


def test_a_clip_that_fails_to_decode_later_is_replaced_and_counted(tmp_path, monkeypatch, caplog):
    write_jsonl(tmp_path / "m.jsonl", write_clips(tmp_path, [(4, 16, 16)] * 3))
    ds = VideoDataset.from_manifests(
        [tmp_path / "m.jsonl"], frames=4, height=8, width=8, shuffle=False
    )
    real = video_data.read_video

    def flaky(path):
        if path.name == "clip1.mp4":
            raise VideoDecodeError(f"{path}: does not decode (corrupt packet)")
        return real(path)

    monkeypatch.setattr(video_data, "read_video", flaky)
    with caplog.at_level(logging.WARNING, logger="parallm.video.data"):
        got = [int(ds.sample(i)["caption_index"]) for i in range(6)]
    assert got == [0, 2, 2, 0, 2, 2]  # clip 1 -> the next clip of its bucket
    assert ds.stats["undecodable_later"] == 1 and caplog.text.count("clip1.mp4") == 1


def bucketed(tmp_path, **kwargs) -> VideoDataset:
    # 5 square clips and 3 wide ones of 8 frames, 2 square clips of 4 frames
    shapes = [(8, 16, 16)] * 5 + [(8, 16, 32)] * 3 + [(4, 16, 16)] * 2
    write_jsonl(tmp_path / "m.jsonl", write_clips(tmp_path, shapes))
    buckets = [(8, 8, 8), (8, 8, 16), (4, 8, 8)]
    return VideoDataset.from_manifests(
        [tmp_path / "m.jsonl"], frames=8, height=8, width=8, buckets=buckets, batch_size=2, **kwargs
    )


def test_every_global_batch_is_one_bucket_and_every_clip_is_seen(tmp_path):
    ds = bucketed(tmp_path, seed=3)
    # buckets of 5, 3 and 2 clips, each rounded up to whole batches of 2
    assert len(ds) == 6 + 4 + 2
    bucket_of = {0: (8, 8, 8), 1: (8, 8, 16), 2: (4, 8, 8)}
    for epoch in range(3):
        shapes, seen = [], set()
        for i in range(epoch * len(ds), (epoch + 1) * len(ds), 2):
            batch = ds.collate([ds.sample(i), ds.sample(i + 1)])
            assert batch["video"].shape[2:] == (
                int(batch["num_frames"][0]),
                int(batch["height"][0]),
                int(batch["width"][0]),
            )
            assert (
                len(
                    {
                        tuple(int(batch[k][j]) for k in ("num_frames", "height", "width"))
                        for j in range(2)
                    }
                )
                == 1
            )
            shapes.append(tuple(batch["video"].shape[2:]))
            seen |= {int(c) for c in batch["caption_index"]}
        assert seen == set(range(10))
        assert sorted(shapes) == sorted([bucket_of[0]] * 3 + [bucket_of[1]] * 2 + [bucket_of[2]])
    # wide clips went to the wide bucket, 4-frame clips to the 4-frame one
    for i in range(len(ds)):
        s = ds.sample(i)
        clip = int(s["caption_index"])
        expected = bucket_of[0] if clip < 5 else bucket_of[1] if clip < 8 else bucket_of[2]
        assert s["video"].shape[1:] == expected


def test_the_same_samples_on_any_data_parallel_degree_and_after_resume(tmp_path):
    ds = bucketed(tmp_path, seed=5)
    global_batch, steps = 2, 9  # crosses an epoch boundary (12 samples per epoch)

    def run(dp: int, start: int = 0) -> list[list[int]]:
        # each rank takes its contiguous slice of the global batch (PackedDataLoader's rule)
        local = global_batch // dp
        batches = []
        for step in range(start, steps):
            consumed = step * global_batch
            ranks = [
                [int(ds.sample(consumed + r * local + i)["caption_index"]) for i in range(local)]
                for r in range(dp)
            ]
            batches.append(sum(ranks, []))
        return batches

    single = run(1)
    assert run(2) == single
    fresh = bucketed(tmp_path, seed=5)  # a resumed process: a new dataset, same position
    assert [
        [int(fresh.sample(s * 2 + i)["caption_index"]) for i in range(2)] for s in range(4, 9)
    ] == single[4:]
    assert bucketed(tmp_path, seed=6)._order(0).tolist() != ds._order(0).tolist()


def test_split_holds_out_whole_clips(tmp_path):
    ds = bucketed(tmp_path, seed=1)
    train, held = ds.split(0.3)
    train_ids = {int(train.sample(i)["caption_index"]) for i in range(len(train))}
    held_ids = {int(held.sample(i)["caption_index"]) for i in range(len(held))}
    assert (
        len(held_ids) == 3 and not train_ids & held_ids and train_ids | held_ids == set(range(10))
    )
    assert len(held) % 2 == 0 and len(train) % 2 == 0
    with pytest.raises(UserError, match="data.eval_fraction"):
        ds.split(1.0)


def test_bad_buckets_and_options_are_user_errors(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", write_clips(tmp_path, [(4, 8, 8)]))
    kwargs = {"frames": 4, "height": 8, "width": 8}
    with pytest.raises(UserError, match=r"video.buckets: \[4, 8\]"):
        VideoDataset.from_manifests([tmp_path / "m.jsonl"], buckets=[(4, 8)], **kwargs)
    with pytest.raises(UserError, match="short_clips: 'loop'"):
        VideoDataset.from_manifests([tmp_path / "m.jsonl"], short_clips="loop", **kwargs)
