"""`VideoPipeline` and `parallm video generate` on a tiny random STDiT3 directory: seeds decide
the video (per prompt, whatever the batch), guidance 1 is the conditional model alone (against an
Euler loop written here from Open-Sora's formulas), sizes and range, the command writes an MP4
PyAV decodes at the requested size, and bad input is one line before torch loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallm import cli
from parallm.errors import UserError
from parallm.testing.timeouts import scaled

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green circle moving down"]
SIZE = dict(frames=3, height=6, width=10)  # not multiples of the patch (1, 4, 4): padded, cropped


def make_video_model(d: Path, *, seed: int = 0) -> Path:
    """A tiny STDiT3 with the trainable caption encoder, every weight random and non-zero (the
    fresh-model init zeroes output layers, which would make every video its noise)."""
    from parallm.models.hf import save_pretrained
    from parallm.models.registry import family
    from parallm.models.stdit.model import STDiTArgs
    from parallm.video.pipeline import VideoConfig, save_video_config
    from parallm.video.text import CaptionTokenizer

    tok = CaptionTokenizer.train(PROMPTS, vocab_size=32, max_length=8)
    args = STDiTArgs(
        depth=1,
        hidden_size=32,
        num_heads=2,
        in_channels=3,
        patch_size=(1, 4, 4),
        caption_channels=16,
        model_max_length=8,
        caption_vocab_size=tok.vocab_size,
        caption_encoder_layers=1,
    )
    model = family("STDiT3").build(args, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "rope.freqs":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    save_pretrained(model, d)
    tok.save(d)
    save_video_config(d, VideoConfig(frames=4, height=8, width=8, fps=8.0))
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_video_model(tmp_path_factory.mktemp("video") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir):
    from parallm.video.pipeline import VideoPipeline

    return VideoPipeline.load(model_dir)


def test_same_seed_same_video_other_seed_another(pipe):
    a = pipe.generate(PROMPTS[:1], **SIZE, steps=3, guidance=4.0, seed=5)
    b = pipe.generate(PROMPTS[:1], **SIZE, steps=3, guidance=4.0, seed=5)
    c = pipe.generate(PROMPTS[:1], **SIZE, steps=3, guidance=4.0, seed=6)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_a_prompt_gets_the_same_video_alone_or_in_a_batch(pipe):
    both = pipe.generate(PROMPTS[:2], **SIZE, steps=3, guidance=4.0, seed=1)
    first = pipe.generate(PROMPTS[:1], **SIZE, steps=3, guidance=4.0, seed=1)
    # Index 1 of the batch draws noise from (seed, 1): alone it is index 0, so seed and index
    # both matter; the first prompt's video does not depend on the second prompt being there.
    # A batch of 2 and a batch of 1 run GEMMs of other shapes, whose sums round differently
    # (up to 1.1e-5 seen after guidance x4 over 3 steps); wrong noise would differ by ~1.
    torch.testing.assert_close(both[:1], first, atol=1e-4, rtol=0)
    assert (both[0] - both[1]).abs().max() > 0.1


def reference_euler(model, z, y, mask, *, steps, height, width, fps):
    """Open-Sora's RFLOW.sample without guidance, written out: t_i = 1000 (1 - i/steps),
    z += v (t_i - t_{i+1}) / 1000, the last step down to 0."""
    b = z.shape[0]
    ts = [1000.0 * (1 - i / steps) for i in range(steps)] + [0.0]
    kw = dict(
        fps=torch.full((b,), fps),
        height=torch.full((b,), float(height)),
        width=torch.full((b,), float(width)),
    )
    for i in range(steps):
        v = model(z, torch.full((b,), ts[i]), y, mask=mask, **kw)
        z = z + v * (ts[i] - ts[i + 1]) / 1000
    return z


def test_guidance_one_is_the_conditional_model_alone(pipe):
    from parallm.video.pipeline import _noise

    out = pipe.generate(PROMPTS, **SIZE, steps=4, guidance=1.0, seed=3)
    ids, mask, _ = pipe.text_encoder.encode(PROMPTS)
    z = _noise((3, SIZE["frames"], SIZE["height"], SIZE["width"]), len(PROMPTS), 3)
    with torch.no_grad():
        ref = reference_euler(pipe.model, z, ids, mask, steps=4, fps=8.0, **SIZE_HW)
    torch.testing.assert_close(out, ref.clamp(-1, 1), atol=1e-4, rtol=0)
    guided = pipe.generate(PROMPTS, **SIZE, steps=4, guidance=4.0, seed=3)
    assert (guided - out).abs().max() > 1e-3  # guidance does change the result


SIZE_HW = dict(height=SIZE["height"], width=SIZE["width"])


def test_shape_range_and_defaults(pipe):
    video = pipe.generate(PROMPTS[:2], **SIZE, steps=2, guidance=3.0, seed=0)
    assert video.shape == (2, 3, 3, 6, 10) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.std() > 0.05
    default = pipe.generate(PROMPTS[:1], steps=1, guidance=3.0)
    assert default.shape == (1, 3, 4, 8, 8)  # video.json's frames, height, width


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(frames=0), "frames: 0"),
        (dict(steps=0), "steps: 0"),
        (dict(height=-2), "height: -2"),
    ],
)
def test_bad_requests_are_user_errors(pipe, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        pipe.generate(PROMPTS[:1], **{"steps": 1, **kwargs})
    with pytest.raises(UserError, match="prompts"):
        pipe.generate([], steps=1)


def test_a_directory_that_is_not_a_video_model_is_one_line(tmp_path, model_dir):
    from parallm.video.pipeline import VideoPipeline

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="'llama' model, not a video model"):
        VideoPipeline.load(tmp_path)
    no_json = tmp_path / "novideo"
    no_json.mkdir()
    (no_json / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(UserError, match="no video.json"):
        VideoPipeline.load(no_json)


def test_video_generate_writes_an_mp4_and_a_gif(model_dir, tmp_path, capsys):
    import av

    out = tmp_path / "clip.mp4"
    argv = ["video", "generate", "--model", str(model_dir), "--prompt", PROMPTS[0]]
    argv += ["--frames", "5", "--height", "12", "--width", "16", "--steps", "2", "--seed", "1"]
    assert cli.main([*argv, "--out", str(out), "--gif"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} and {out.with_suffix('.gif')}: 5 frames 16x12" in printed
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (12, 16, 3)
    assert out.with_suffix(".gif").stat().st_size > 0


RUNNER = """
import contextlib, io, json, sys
from parallm.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue(), "torch" in sys.modules])
print(json.dumps(results))
"""


def test_bad_options_are_one_line_before_torch(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    base = ["video", "generate", "--model", str(llama), "--prompt", "x"]
    cases = {
        "--out: 'clip.avi'": [*base, "--out", "clip.avi"],
        "--steps: 0": [*base, "--steps", "0"],
        "--frames: -1": [*base, "--frames", "-1"],
        "--guidance: -1.0": [*base, "--guidance", "-1"],
        "--prompt: ' '": ["video", "generate", "--model", str(llama), "--prompt", " "],
        "'llama' model, not a video model": base,
        "does not exist": ["video", "generate", "--model", str(tmp_path / "no"), "--prompt", "x"],
        "required: --model": ["video", "generate", "--prompt", "x"],
        "--shape: 'huge'": ["bench", "video", "--shape", "huge"],
        "--steps: 0 must be >= 1": ["bench", "video", "--steps", "0"],
    }
    helps = [["video", "generate", "--help"], ["bench", "video", "--help"]]
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps([*cases.values(), *helps])],
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for (needle, argv), (code, err, torch_loaded) in zip(cases.items(), results, strict=False):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("parallm: error:"), (argv, err)
        assert needle in lines[0], (needle, lines[0])
        assert not torch_loaded, f"parallm {' '.join(argv)} imported torch"
    for code, err, torch_loaded in results[len(cases) :]:
        assert code == 0 and not torch_loaded, err


def test_video_json_from_a_training_job(tmp_path):
    from parallm.config import JobConfig, load_config
    from parallm.video.pipeline import (
        VideoConfig,
        read_video_config,
        save_video_config,
        video_config_from_job,
    )

    job = load_config(
        JobConfig,
        None,
        ["--video.frames=8", "--video.height=24", "--video.vae=vaes/sd", "--task.shift_scale=2"],
    )
    config = video_config_from_job(job)
    assert config == VideoConfig(
        text_encoder="trainable",
        vae=str(Path("vaes/sd").resolve()),
        frames=8,
        height=24,
        width=job.video.width,
        fps=job.video.fps,
        timestep_shift=False,
        shift_scale=2.0,
    )
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "STDiT3"}))
    save_video_config(d, config)
    assert read_video_config(d) == config
    (d / "video.json").write_text(json.dumps({"frames": 8, "colour": "red"}))
    with pytest.raises(UserError, match="unknown field 'colour'"):
        read_video_config(d)
