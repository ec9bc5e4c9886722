"""`parallm bench video`: STDiT3 training and generation speed of a named shape on any layout.

Training: a fresh STDiT3 of the named shape, the `flow` task (rectified flow) on seeded
synthetic clips of the given size (written once to `--out`/data, pixel space, the trainable
caption encoder), the usual trainer on whatever layout `--set parallel.*` asks for (sequence
parallel: `parallel.cp`). Reports, as medians over the steps after warm-up: samples/s and patch
tokens/s, in total and per device, and the step time; peak memory (CUDA: torch's
`max_memory_allocated` on rank 0; CPU: the peak resident set of rank 0's process, which counts
Python and torch themselves). Generation: the trained model exported and loaded by
`VideoPipeline` on rank 0, seconds per clip (one prompt, `--gen-steps` Euler steps with
guidance, so 2 x steps model calls), median of `--gen-clips` after one warm-up clip.

    parallm bench video --shape small --frames 8 --height 32 --width 32 --steps 5
    parallm bench video --shape small --nproc 2 --set parallel.cp=2
    parallm bench video --shape xl --nproc 4 --set parallel.cp=4      # a GPU node

`xl` is Open-Sora v1.2's STDiT3-XL/2 (depth 28, hidden 1152, 16 heads, patch (1, 2, 2)) at
Open-Sora's 720p token count: 51 frames at 1280x720 through its VAE are 15 x 90 x 160 latents,
15 x 45 x 80 = 54,000 patch tokens; here the same token count in pixel space (3 channels
instead of 4 latent channels, which changes only the patch embedding and the final layer).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from parallm.bench import save_report
from parallm.errors import UserError

# name -> (model shape, the default video size). Captions: the trainable encoder.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model=dict(dim=64, n_layers=2, n_heads=4), caption_channels=64,
        frames=4, height=16, width=16,
    ),
    "small": dict(
        model=dict(dim=192, n_layers=4, n_heads=6), caption_channels=192,
        frames=8, height=32, width=32,
    ),
    "xl": dict(
        model=dict(dim=1152, n_layers=28, n_heads=16), caption_channels=4096,
        frames=15, height=90, width=160,
    ),
}  # fmt: skip
PATCH = (1, 2, 2)
CAPTION_LENGTH = 16
GPU_ONLY = ("xl",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallm bench video", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--frames", type=int, default=0, help="frames per clip (0: the shape's)")
    p.add_argument("--height", type=int, default=0, help="pixels (0: the shape's)")
    p.add_argument("--width", type=int, default=0, help="pixels (0: the shape's)")
    p.add_argument("--batch", type=int, default=4, help="global batch (clips per step)")
    p.add_argument("--micro-batch", type=int, default=0, help="per forward (0: auto)")
    p.add_argument("--steps", type=int, default=5, help="measured training steps")
    p.add_argument("--warmup", type=int, default=2, help="training steps before measuring")
    p.add_argument("--gen-steps", type=int, default=10, help="Euler steps per generated clip")
    p.add_argument("--gen-clips", type=int, default=2, help="clips timed (0: no generation)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="any job override, e.g. parallel.cp=2, parallel.cp_mode=ring, "
        "parallel.dp_shard=2 or parallel.activation_checkpoint=full",
    )  # fmt: skip
    p.add_argument("--out", default="runs/bench/video", help="output directory (report.json)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The options' one-line errors, before torch."""
    if args.shape not in SHAPES:
        raise UserError(f"--shape: {args.shape!r} is not known; valid: {', '.join(SHAPES)}")
    for name in ("frames", "height", "width", "micro_batch", "warmup", "gen_clips"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 0")
    for name in ("batch", "steps", "gen_steps", "nproc"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    shape = SHAPES[args.shape]
    args.frames = args.frames or shape["frames"]
    args.height = args.height or shape["height"]
    args.width = args.width or shape["width"]


def patches_per_clip(args: argparse.Namespace) -> tuple[int, int]:
    """(frames after patching, spatial patch tokens per frame) of one clip; the model pads a
    size that is not a multiple of the patch."""
    pt, ph, pw = PATCH
    t = math.ceil(args.frames / pt)
    return t, math.ceil(args.height / ph) * math.ceil(args.width / pw)


def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The job (as --section.key overrides) that the benchmark trains."""
    shape = SHAPES[args.shape]
    out = Path(args.out)
    overrides = [f"--model.{k}={v}" for k, v in shape["model"].items()]
    overrides += [
        "--model.architecture=STDiT3",
        "--task.name=flow",
        f"--data.paths={json.dumps([str(out / 'data' / 'train.jsonl')])}",
        f"--video.frames={args.frames}",
        f"--video.height={args.height}",
        f"--video.width={args.width}",
        f"--video.patch={json.dumps(list(PATCH))}",
        f"--video.caption_length={CAPTION_LENGTH}",
        f"--video.caption_channels={shape['caption_channels']}",
        "--video.text_encoder=trainable",
        "--video.vae=",  # pixel space
        f"--train.steps={args.warmup + args.steps}",
        f"--train.batch_size={args.batch}",
        f"--train.micro_batch_size={args.micro_batch or 'auto'}",
        "--train.warmup_steps=0",
        f"--train.log_every={max((args.warmup + args.steps) // 5, 1)}",
        "--checkpoint.every=0",
        f"--checkpoint.export_hf={'true' if args.gen_clips else 'false'}",
        f"--output.dir={out}",
    ]
    return overrides + [f"--{s}" for s in args.set]


def preflight_job(args: argparse.Namespace, world_size: int):
    """The job's checks that need no rank (`train.preflight`): one line, exit 2, before any
    rank starts; the synthetic clips are written here, once, before the ranks read them (a
    run under the agent: by the launching process)."""
    from parallm.config import JobConfig, load_config
    from parallm.train.preflight import preflight

    cfg = load_config(JobConfig, None, bench_overrides(args))
    write_clips(args)  # before preflight, which checks that data.paths exist
    preflight(cfg, world_size, resume="never")
    return cfg


def write_clips(args: argparse.Namespace) -> Path:
    """`--batch x (warmup + steps)` seeded synthetic clips (a coloured square drifting over
    noise; the content does not change the speed) and their manifest; kept when present."""
    import numpy as np

    from parallm.video.io import write_video

    d = Path(args.out) / "data"
    manifest = d / "train.jsonl"
    n = args.batch * (args.warmup + args.steps)
    tag = f"{n} {args.frames} {args.height} {args.width}"
    if (d / "clips.txt").exists() and (d / "clips.txt").read_text() == tag:
        return manifest
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        video = rng.integers(0, 40, (args.frames, args.height, args.width, 3), dtype=np.uint8)
        colour = rng.integers(80, 256, 3, dtype=np.uint8)
        side = max(args.height // 4, 1)
        for t in range(args.frames):
            x = (i + 2 * t) % max(args.width - side, 1)
            video[t, :side, x : x + side] = colour
        write_video(d / f"{i}.mp4", video, 8)
        lines.append(json.dumps({"path": f"{i}.mp4", "text": f"clip {i % 7} moving right"}))
    manifest.write_text("\n".join(lines) + "\n")
    (d / "clips.txt").write_text(tag)
    return manifest


def peak_memory(device) -> tuple[float, str]:
    """(GiB, what was measured) for this process."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS of rank 0"


def time_generation(model_dir: Path, args: argparse.Namespace, device) -> list[float]:
    """Seconds per generated clip (after one warm-up clip), one prompt at a time."""
    import torch

    from parallm.video.pipeline import VideoPipeline

    pipe = VideoPipeline.load(model_dir, device=device)
    seconds = []
    for i in range(args.gen_clips + 1):
        start = time.perf_counter()
        pipe.generate(
            [f"clip {i % 7} moving right"],
            frames=args.frames,
            height=args.height,
            width=args.width,
            steps=args.gen_steps,
            guidance=4.0,
            seed=i,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def report(records: list[dict[str, Any]], args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Medians over the measured steps (the first `warmup` steps allocate and warm up)."""
    measured = records[args.warmup :] or records
    step = statistics.median(r["step_time_s"] for r in measured)
    t, s = patches_per_clip(args)
    patches = args.batch * t * s
    return {
        "shape": args.shape,
        "model": SHAPES[args.shape]["model"],
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "patch": list(PATCH),
        "patch_tokens_per_clip": t * s,
        "batch": args.batch,
        "devices": world,
        "layout": args.set,
        "steps_measured": len(measured),
        "step_time_s": step,
        "samples_per_s": args.batch / step,
        "samples_per_s_per_device": args.batch / step / world,
        "patches_per_s": patches / step,
        "patches_per_s_per_device": patches / step / world,
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on this process (under an agent: on every rank)."""
    import os
    import platform

    import torch
    import torch.distributed as dist

    from parallm.distributed.launch import init_distributed, launched_world_size
    from parallm.train.trainer import Trainer

    args = parser().parse_args(argv)
    check_args(args)
    if args.shape in GPU_ONLY and not torch.cuda.is_available():
        raise UserError(
            f"--shape: {args.shape!r} is STDiT3-XL/2 at 720p-like token counts, for GPUs; "
            "this machine has none (on a CPU: --shape tiny or small)"
        )
    cfg = preflight_job(args, launched_world_size())
    local_rank = init_distributed(cfg.parallel.timeout_s)
    trainer = Trainer(cfg, resume="never", local_rank=local_rank)  # a measurement starts afresh
    records = trainer.fit()
    if trainer.rank == 0:
        result = report(records, args, trainer.world)
        result["peak_memory_gib"], result["memory"] = peak_memory(trainer.device)
        if args.gen_clips:
            seconds = time_generation(Path(args.out) / "hf", args, trainer.device)
            result["generation"] = {
                "seconds_per_clip": statistics.median(seconds),
                "clips": seconds,
                "euler_steps": args.gen_steps,
                "model_calls_per_clip": 2 * args.gen_steps,  # guidance: conditional + null
            }
        result["machine"] = {
            "device": str(trainer.device),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
        }
        save_report(result, args.out, show=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # a rank started by `parallm bench video --nproc N`
    from parallm.distributed.launch import leave, rank_main

    leave(rank_main(main))
