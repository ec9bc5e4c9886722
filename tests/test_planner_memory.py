"""The planner's peak memory per rank against the peak measured in real Trainer steps.

Each layout trains a tiny Llama (float32, as on CPU) for two steps; the second step's peak of
live tensor storages (`parallm.utils.memory.AllocationTracker`, opened before the model is built,
so it counts everything the run holds in tensors) is compared with `predict_memory`'s allocated
bytes for that rank: within 10% on every rank. The two-process layouts share one spawn (one
Trainer after another on the same process group); the one-process runs (without activation
checkpointing, full and selective) run here.
"""

from __future__ import annotations

from parallm.distributed.parallel_dims import AXES
from parallm.models.llama.model import ModelArgs
from parallm.planner import Layout, PlanRequest
from parallm.planner.cost_model import predict_memory
from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled

SHAPE = dict(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256)
REQ = dict(gpus=1, gpu_memory_gb=1, seq_len=64, batch=8, micro_batch=2, dtype_bytes=4)
TOLERANCE = 0.10

# name: (layout, ZeRO stage, activation checkpointing)
ONE_PROCESS = {
    "single": (Layout(), 3, "none"),
    "single ac full": (Layout(), 3, "full"),
    "single ac selective": (Layout(), 3, "selective"),
}
TWO_PROCESS = {
    "pp=2": (Layout(pp=2), 3, "none"),
    "tp=2": (Layout(tp=2), 3, "none"),
    "dp_replicate=2": (Layout(dp_replicate=2), 3, "none"),
    "dp_shard=2 zero 1": (Layout(dp_shard=2), 1, "none"),
    "dp_shard=2 zero 3": (Layout(dp_shard=2), 3, "none"),
}


def _request(zero: int, ac: str) -> PlanRequest:
    return PlanRequest(**REQ, zero_stage=zero, activation_checkpoint=ac)


def _job(out, layout: Layout, zero: int, ac: str):
    from parallm.config import JobConfig, load_config

    overrides = [
        "--data.random_tokens=2048",
        *[f"--model.{k}={v}" for k, v in SHAPE.items()],
        "--model.tie_embeddings=false",
        "--train.steps=2",
        "--train.warmup_steps=1",
        "--train.grad_clip=1.0",
        "--train.log_every=100",
        "--checkpoint.every=0",
        "--checkpoint.export_hf=false",
        "--generate.max_tokens=0",
        f"--output.dir={out}",
        f"--parallel.zero_stage={zero}",
        f"--parallel.activation_checkpoint={ac}",
        *layout.trainer_flags(_request(zero, ac)),
    ]
    return load_config(JobConfig, None, overrides)


def _measure(out, layout: Layout, zero: int, ac: str) -> tuple[dict[str, int], int]:
    """This rank's coordinates and its peak bytes during the second optimizer step."""
    from parallm.train.trainer import Trainer
    from parallm.utils.memory import AllocationTracker

    with AllocationTracker() as mem:
        trainer = Trainer(_job(out, layout, zero, ac))
        trainer.train_step()  # AdamW's state exists from here on
        mem.reset_peak()
        trainer.train_step()
    coords = {a: trainer.dims.coordinate(a) for a in AXES} if layout.gpus > 1 else {}
    return coords, mem.peak


def _worker(rank: int, world: int, out, cases: dict) -> list:
    return [_measure(out / name, *case) for name, case in cases.items()]


def _check(name: str, layout: Layout, zero: int, ac: str, per_rank: list) -> list[str]:
    args = ModelArgs(**SHAPE, head_dim=SHAPE["dim"] // SHAPE["n_heads"])
    lines, bad = [], []
    for coords, measured in per_rank:
        request = _request(zero, ac)
        predicted = predict_memory(args, layout, request, rank_coords=coords).allocated
        err = predicted / measured - 1
        line = f"{name:19s} {coords}: measured {measured / 1e6:.3f} MB, predicted "
        line += f"{predicted / 1e6:.3f} MB ({err:+.1%})"
        lines.append(line)
        if abs(err) > TOLERANCE:
            bad.append(line)
    print("\n".join(lines))
    return bad


def test_predicted_peak_memory_matches_measured_per_rank(tmp_path):
    bad = []
    for name, case in ONE_PROCESS.items():
        bad += _check(name, *case, [_measure(tmp_path / name, *case)])
    results = run_distributed(
        _worker, 2, tmp_path / "spawn", tmp_path / "out", TWO_PROCESS, timeout_s=scaled(180)
    )
    for i, (name, case) in enumerate(TWO_PROCESS.items()):
        bad += _check(name, *case, [rank[i] for rank in results])
    assert not bad, "predicted peak memory off by more than 10%:\n" + "\n".join(bad)
