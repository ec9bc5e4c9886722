"""Rectified flow (parallm/video/rflow.py) against its formulas, and the `flow` task training a
tiny STDiT3 on every layout it supports: sequence parallel (Ulysses on 4 processes, ring on 2)
and ZeRO-3 give the single-process losses and weights within the language layouts' tolerance;
activation checkpointing changes nothing; a layout the family cannot run fails before launch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from parallel_jobs import assert_weights_close
from test_video_encoders import t5_dir  # noqa: F401 (a fixture: a tiny random T5 directory)

from parallm.config import JobConfig, load_config
from parallm.errors import UserError
from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled
from parallm.train.data import EpochOrder
from parallm.train.preflight import preflight
from parallm.train.tasks import register_task
from parallm.train.tasks.flow import Flow
from parallm.train.trainer import Trainer
from parallm.video import rflow

# -- rflow ---------------------------------------------------------------------------------------


def test_logit_normal_timesteps_are_a_sigmoid_of_the_generators_normals():
    g = torch.Generator().manual_seed(3)
    t = rflow.logit_normal_timesteps(5, g, loc=0.5, scale=2.0)
    z = torch.randn(5, generator=torch.Generator().manual_seed(3))
    expected = [1000 / (1 + math.exp(-(0.5 + 2.0 * float(v)))) for v in z]
    torch.testing.assert_close(t, torch.tensor(expected), rtol=1e-6, atol=1e-4)


def test_timestep_transform_at_known_values():
    # 512 x 512, 51 frames: ratio = 1 * sqrt(51 // 17 * 5) = sqrt(15); t' = r t / (1 + (r - 1) t)
    shift = rflow.Shift(
        height=torch.tensor([512, 256, 1024]),
        width=torch.tensor([512, 256, 1024]),
        num_frames=torch.tensor([51, 1, 17]),
        scale=2.0,
    )
    t = torch.tensor([500.0, 250.0, 1000.0])
    got = rflow.timestep_transform(t, shift)
    ratios = [math.sqrt(15) * 2, 0.5 * 1 * 2, 2 * math.sqrt(5) * 2]
    expected = [
        r * (x / 1000) / (1 + (r - 1) * (x / 1000)) * 1000
        for r, x in zip(ratios, [500, 250, 1000], strict=True)
    ]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-3)
    assert float(got[2]) == pytest.approx(1000.0)  # pure noise stays pure noise


def test_add_noise_endpoints_and_target():
    x0, noise = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5)
    torch.testing.assert_close(rflow.add_noise(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(rflow.add_noise(x0, noise, torch.full((2,), 1000.0)), noise)
    mid = rflow.add_noise(x0, noise, torch.tensor([250.0, 750.0]))
    torch.testing.assert_close(mid[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(mid[1], 0.25 * x0[1] + 0.75 * noise[1])
    torch.testing.assert_close(rflow.velocity_target(x0, noise), x0 - noise)


def test_masked_frames_stay_clean_and_leave_the_loss():
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    x_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    x_t = rflow.noised(x0, noise, torch.full((2,), 600.0), x_mask)
    torch.testing.assert_close(x_t[0, :, 0], x0[0, :, 0])
    torch.testing.assert_close(x_t[0, :, 1], 0.4 * x0[0, :, 1] + 0.6 * noise[0, :, 1])
    v = torch.randn(2, 3, 4, 2, 2)
    loss = rflow.flow_loss(v, x0, noise, x_mask)
    err = (v - (x0 - noise)) ** 2
    torch.testing.assert_close(loss[0], err[0, :, 1:].mean())  # frame 0 does not count
    torch.testing.assert_close(loss[1], err[1].mean())


def _constant_model(velocity: float):
    def model_fn(z, t, *, y, **kwargs):
        # conditional half: velocity + y's mean, unconditional half: velocity
        return torch.full_like(z, velocity) + y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1, 1)

    return model_fn


def test_one_euler_step_lands_where_the_formula_says():
    z = rflow.initial_noise((2, 3, 2, 4, 4), seed=7)
    y, y_null = torch.full((2, 1, 3, 5), 1.0), torch.zeros(2, 1, 3, 5)
    out = rflow.euler_sample(_constant_model(0.5), z, y=y, y_null=y_null, steps=1, guidance=3.0)
    # v = v_uncond + g (v_cond - v_uncond) = 0.5 + 3 * 1; one step: dt = 1000 / 1000
    torch.testing.assert_close(out, z + 3.5)
    # Two steps on the grid 1000, 500: dt = 0.5 then 0.5; conditioning frame 0 kept.
    x_mask = torch.tensor([[False, True], [True, True]])
    out = rflow.euler_sample(
        _constant_model(0.5), z, y=y, y_null=y_null, steps=2, guidance=3.0, x_mask=x_mask
    )
    torch.testing.assert_close(out[0, :, 0], z[0, :, 0])
    torch.testing.assert_close(out[0, :, 1], z[0, :, 1] + 3.5)
    torch.testing.assert_close(out[1], z[1] + 3.5)


def test_guidance_one_is_no_guidance_and_same_seed_same_output():
    torch.manual_seed(0)
    w = torch.randn(3, 3)

    def model_fn(z, t, *, y, mask):
        mixed = torch.einsum("ij,bjthw->bithw", w, z) * (t / 1000).reshape(-1, 1, 1, 1, 1)
        return mixed + y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1, 1) * mask.float().mean()

    y, y_null = torch.randn(2, 1, 3, 5), torch.randn(2, 1, 3, 5)
    mask = torch.ones(2, 3, dtype=torch.long)
    shift = rflow.Shift(
        height=torch.tensor([64, 64]), width=torch.tensor([64, 64]), num_frames=torch.ones(2)
    )

    def run(seed, guidance, y_null):
        z = rflow.initial_noise((2, 3, 2, 4, 4), seed=seed)
        kw = {"y": y, "y_null": y_null, "steps": 4, "guidance": guidance, "mask": mask}
        return rflow.euler_sample(model_fn, z, shift=shift, **kw)

    no_guidance = run(5, 1.0, y_null)
    # the unconditional half cancels (up to rounding of v_u + (v_c - v_u))
    torch.testing.assert_close(no_guidance, run(5, 1.0, torch.zeros_like(y_null)))
    assert torch.equal(run(5, 4.0, y_null), run(5, 4.0, y_null))
    assert not torch.equal(run(5, 4.0, y_null), run(6, 4.0, y_null))
    # Without guidance, the plain Euler loop on the conditional model written out.
    z = rflow.initial_noise((2, 3, 2, 4, 4), seed=5)
    grid = [rflow.timestep_transform(torch.full((2,), t), shift) for t in (1000, 750, 500, 250)]
    for i, t in enumerate(grid):
        dt = (t - (grid[i + 1] if i < 3 else 0)) / 1000
        z = z + model_fn(z, t, y=y, mask=mask) * dt.reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(no_guidance, z, rtol=1e-5, atol=1e-5)


# -- the flow task on every layout -------------------------------------------------------------

CAPTIONS = ["a red square moving left", "a blue circle moving right", "a green dot going up"]


class TinyVideos(EpochOrder):
    """`n` random 4 x 16 x 16 clips in [-1, 1] with captions: VideoDataset's interface, in
    memory (every sample a function of its id)."""

    def __init__(self, n: int = 12, *, seed: int = 0) -> None:
        self._total, self.seed, self.shuffle = n, seed, True
        self.captions = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(n)]

    def row(self, sample_id: int) -> dict:
        rng = np.random.default_rng(sample_id)
        return {
            "video": rng.uniform(-1, 1, (3, 4, 16, 16)).astype(np.float32),
            "caption_index": np.int64(sample_id),
            "fps": np.float32(8.0),
            "num_frames": np.int64(4),
            "height": np.int64(16),
            "width": np.int64(16),
        }

    @staticmethod
    def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


@register_task
class TinyFlow(Flow):
    """The flow task on `TinyVideos` (no files decoded)."""

    name = "test_flow"

    def dataset(self, files, data_cfg, *, seed):
        return TinyVideos(seed=seed)


def flow_job(root: Path, out: Path, *extra: str) -> JobConfig:
    manifest = root / "videos.jsonl"  # preflight wants a data file; TinyVideos ignores it
    manifest.write_text('{"path": "unused.mp4", "text": "unused"}\n')
    overrides = [
        f"--data.paths={manifest}",
        "--task.name=test_flow",
        "--task.caption_dropout=0.3",
        "--task.condition_frames=0.5",
        "--model.architecture=STDiT3",
        "--model.dim=32",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--video.frames=4",
        "--video.height=16",
        "--video.width=16",
        "--video.patch=[1,4,4]",
        "--video.caption_length=8",
        "--video.caption_channels=32",
        "--train.steps=3",
        "--train.batch_size=4",
        "--train.micro_batch_size=2",
        "--train.warmup_steps=1",
        "--train.lr=3e-3",
        "--train.grad_clip=0.5",
        # Key biases (attention, cross-attention, the caption encoder) have a zero gradient up
        # to rounding, which AdamW would turn into full steps of random sign (see
        # parallel_jobs.job's eps); at 1e-5 the worst layout differs by 2.3e-6 in norm.
        "--train.eps=1e-5",
        "--train.log_every=100",
        f"--output.dir={out}",
        "--generate.max_tokens=0",
        *extra,
    ]
    return load_config(JobConfig, None, overrides)


def flow_worker(rank: int, world_size: int, root: Path, out: Path, extra: tuple):
    records = Trainer(flow_job(root, out, *extra)).fit()
    return records if rank == 0 else None


@pytest.fixture(scope="module")
def flow_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    records = Trainer(flow_job(root, root / "single")).fit()
    return root, records, _hf_weights(root / "single")


def _hf_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "hf" / "model.safetensors")


def test_single_process_run_exports_a_video_model(flow_reference):
    root, records, _ = flow_reference
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    hf = root / "single" / "hf"
    for name in ("config.json", "model.safetensors", "video.json", "caption_tokenizer.json"):
        assert (hf / name).exists(), name


LAYOUTS = {
    "cp4_ulysses": (4, ["--parallel.cp=4", "--parallel.dp_shard=1"]),
    "cp2_ring": (2, ["--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.cp_mode=ring"]),
    "zero3": (2, ["--parallel.dp_shard=2", "--parallel.zero_stage=3"]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_equals_single_process(name, flow_reference, tmp_path):
    root, ref_records, ref_weights = flow_reference
    world, extra = LAYOUTS[name]
    out = tmp_path / "run"
    records = run_distributed(
        flow_worker, world, tmp_path / "rdzv", root, out, tuple(extra), timeout_s=scaled(240)
    )[0]
    got, expected = [r["loss"] for r in records], [r["loss"] for r in ref_records]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        [r["grad_norm"] for r in records], [r["grad_norm"] for r in ref_records], rtol=1e-4, atol=0
    )
    assert_weights_close(_hf_weights(out), ref_weights)


def test_activation_checkpointing_changes_nothing(flow_reference, tmp_path):
    root, ref_records, _ = flow_reference
    extra = ("--parallel.activation_checkpoint=full", "--checkpoint.export_hf=false")
    records = Trainer(flow_job(root, tmp_path / "ac", *extra)).fit()
    assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]


@pytest.mark.parametrize(
    ("world", "extra", "field"),
    [
        (2, ["--parallel.tp=2", "--parallel.dp_shard=1"], "parallel.tp"),
        (2, ["--parallel.pp=2", "--parallel.dp_shard=1"], "parallel.pp"),
        (3, ["--parallel.cp=3", "--parallel.dp_shard=1"], "parallel.cp: 3 must divide the 16"),
        (
            8,
            ["--parallel.cp=8", "--parallel.dp_shard=1", "--model.n_heads=2", "--model.dim=32"],
            "parallel.cp: 8 must divide the model's 2 heads",
        ),
        (
            2,
            ["--parallel.cp=2", "--parallel.dp_shard=1", "--video.buckets=[[4,16,16],[4,12,12]]"],
            "parallel.cp: 2 must divide the 9 spatial tokens per frame of 4x12x12",
        ),
        (1, ["--video.buckets=[[4,16]]"], "video.buckets"),
        (1, ["--video.short_clips=loop"], "video.short_clips"),
        (1, ["--video.patch=[2,4,4]"], "task.condition_frames: 0.5 needs a model whose time"),
        (1, ["--model.architecture=llama"], "model.architecture"),
    ],
)
def test_bad_layout_fails_before_launch(world, extra, field, tmp_path):
    with pytest.raises(UserError, match=field.replace("(", r"\(")):
        preflight(flow_job(tmp_path, tmp_path / "out", *extra), world)


def test_job_buckets_reach_the_dataset_and_short_clips_follow_the_job(tmp_path):
    """`[video] buckets` / `short_clips` of a job are what the flow task's dataset uses."""
    from test_video_data import write_clips, write_jsonl

    write_jsonl(tmp_path / "m.jsonl", write_clips(tmp_path, [(4, 16, 16), (6, 12, 12), (2, 8, 8)]))
    buckets = "--video.buckets=[[4,16,16],[6,12,12]]"
    for short, kept in (("drop", 2), ("pad", 3)):
        job = flow_job(tmp_path, tmp_path / "out", buckets, f"--video.short_clips={short}")
        task = Flow(job.task, job=job)
        dataset = task.dataset([tmp_path / "m.jsonl"], job.data, seed=0)
        assert dataset.buckets == [(4, 16, 16), (6, 12, 12)], dataset.buckets
        assert dataset.stats["short"] == 1 and len(dataset.captions) == kept, dataset.stats


def test_language_task_refuses_a_video_model(tmp_path):
    with pytest.raises(UserError, match="task.name: 'pretrain' trains a language model"):
        preflight(flow_job(tmp_path, tmp_path / "out", "--task.name=pretrain"), 1)


def test_t5_captions_train_alike_from_the_encoder_and_from_its_cache(t5_dir, tmp_path):  # noqa: F811
    """Captions as T5 embeddings (Open-Sora's way): encoded each step, or read from the disk
    cache (filled on first use) — the same losses; the export names the encoder."""
    t5 = (f"--video.text_encoder={t5_dir}", "--video.caption_channels=16", "--train.steps=2")
    direct = Trainer(flow_job(tmp_path, tmp_path / "direct", *t5)).fit()
    cache = tmp_path / "cache"
    cached = Trainer(
        flow_job(tmp_path, tmp_path / "cached", *t5, f"--video.caption_cache={cache}")
    ).fit()
    torch.testing.assert_close([r["loss"] for r in cached], [r["loss"] for r in direct])
    assert len(list(cache.rglob("*.safetensors"))) == 2 * 4  # the distinct captions used
    hf = tmp_path / "cached" / "hf"
    assert not (hf / "caption_tokenizer.json").exists()
    assert json.loads((hf / "video.json").read_text())["text_encoder"] == str(t5_dir)


def test_resumed_run_draws_what_an_unbroken_one_draws(flow_reference, tmp_path):
    """Noise, timesteps and masks come from the global sample index: a run stopped after 2 steps
    and resumed from its checkpoint gives the unbroken run's losses."""
    _, ref_records, _ = flow_reference
    extra = ("--checkpoint.every=1", "--checkpoint.export_hf=false")
    first = Trainer(flow_job(tmp_path, tmp_path / "run", *extra)).fit(until_step=2)
    rest = Trainer(flow_job(tmp_path, tmp_path / "run", *extra)).fit()
    assert [r["step"] for r in rest] == [3]
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in ref_records]
