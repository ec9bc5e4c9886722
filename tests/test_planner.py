"""The planner: exact state bytes against real layouts on gloo, and the cost model's choices."""

from __future__ import annotations

import json

import pytest
import torch

from parallm.distributed.parallel_dims import AXES, ParallelDims
from parallm.errors import UserError
from parallm.models.llama.model import ModelArgs
from parallm.planner import (
    Hardware,
    Layout,
    PlanRequest,
    estimate,
    format_plan,
    local_numels,
    plan,
    plan_command,
    plan_json,
    plan_to_dict,
    predict_state_bytes,
    recommend,
    valid_layouts,
)
from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled

# Nothing divides evenly: vocab 250 over 4 shards is 63, 63, 63, 61; dim 18 is 5, 5, 5, 3; a
# q/k norm of 6 is 2, 2, 2 and an empty chunk; 5 layers cut unevenly into stages.
SHAPE = dict(
    vocab_size=250,
    dim=18,
    n_layers=5,
    n_heads=4,
    n_kv_heads=2,
    head_dim=6,
    ffn_dim=72,
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    qk_norm=True,
)

# (ParallelConfig fields, tied embeddings) per layout, by world size.
LAYOUTS = {
    2: [
        (dict(dp_shard=2), True),
        (dict(tp=2), False),
        (dict(pp=2), True),
        (dict(pp=2, pp_schedule="zero_bubble"), True),  # rank 0 holds the first and last stage
        (dict(pp=2, pp_schedule="interleaved_1f1b", pp_layers=[2, 1, 1, 1]), False),
        (dict(cp=2, cp_mode="ring"), False),
        (dict(dp_replicate=2), True),
    ],
    4: [
        (dict(dp_shard=2, tp=2), True),
        (dict(tp=2, pp=2), True),
        (dict(dp_shard=4), False),
        (dict(dp_replicate=2, dp_shard=2), False),
        (dict(dp_shard=2, cp=2), True),
        (dict(tp=2, cp=2, cp_mode="ring"), False),
        (dict(pp=2, dp_shard=2), True),
    ],
}


def _args(tied: bool) -> ModelArgs:
    return ModelArgs(**SHAPE, tie_embeddings=tied)


def _dims(fields: dict, world_size: int) -> tuple:
    from parallm.config import ParallelConfig

    pcfg = ParallelConfig(**fields)
    dims = ParallelDims(
        dp_replicate=pcfg.dp_replicate,
        dp_shard=pcfg.dp_shard,
        cp=pcfg.cp,
        tp=pcfg.tp,
        pp=pcfg.pp,
        world_size=world_size,
    )
    return pcfg, dims


def _measure(rank: int, world_size: int, layouts: list) -> list:
    """Build each layout for real on this rank; return its mesh coordinates, `state_bytes`, and
    each parameter's local element count and placements."""
    import torch.distributed as dist

    from parallm.models.build import canonical_name
    from parallm.train.layout import build_rank_model
    from parallm.train.trainer import state_bytes

    out = []
    for fields, tied in layouts:
        pcfg, dims = _dims(fields, dist.get_world_size())
        dims.build_mesh("cpu")
        model = build_rank_model(_args(tied), pcfg, dims, torch.device("cpu"), seed=0)
        params = {}
        for part in model.parts:
            for name, p in part.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                params[canonical_name(name)] = (local.numel(), str(getattr(p, "placements", "")))
        out.append(({a: dims.coordinate(a) for a in AXES}, state_bytes(model), params))
    return out


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_state_bytes_match_real_layouts(tmp_path, world_size):
    layouts = LAYOUTS[world_size]
    per_rank = run_distributed(_measure, world_size, tmp_path, layouts, timeout_s=scaled(120))
    for i, (fields, tied) in enumerate(layouts):
        pcfg, dims = _dims(fields, world_size)
        pipe = dict(
            pp_schedule=pcfg.pp_schedule,
            pp_virtual_stages=pcfg.pp_virtual_stages,
            pp_layers=pcfg.pp_layers,
        )
        for rank in range(world_size):
            coords, measured, params = per_rank[rank][i]
            where = (fields, tied, rank, coords)
            numels = local_numels(_args(tied), dims, rank_coords=coords, **pipe)
            assert numels == {name: numel for name, (numel, _) in params.items()}, where
            predicted = predict_state_bytes(_args(tied), dims, rank_coords=coords, **pipe)
            assert predicted == measured, where
    # The uneven shapes really give different ranks different bytes.
    sizes = {r[i][1]["parameters"] for r in per_rank for i in range(len(layouts))}
    assert len(sizes) > len(layouts)
    if world_size == 4:
        # FSDP over TP-sharded rows records a strided placement but keeps a plain torch.chunk
        # of the TP-local rows: 125 vocabulary rows over 2 shards are 63 and 62.
        coords, _, params = per_rank[3][0]  # dp_shard=2 x tp=2, dp_shard rank 1
        numel, placements = params["embed_tokens.weight"]
        assert coords["dp_shard"] == 1 and "_StridedShard" in placements
        assert numel == 62 * SHAPE["dim"]
        # torch.chunk leaves the last FSDP rank nothing of a 6-element q/k norm over 4 ranks.
        assert per_rank[3][2][2]["layers.0.self_attn.k_norm.weight"][0] == 0


def test_single_gpu_state_is_every_parameter_in_float32():
    args = _args(tied=False)
    got = predict_state_bytes(args, ParallelDims(world_size=1), rank_coords={})
    assert got["parameters"] == args.num_params() * 4


def test_bad_rank_coordinates_are_user_errors():
    dims = ParallelDims(dp_shard=2, world_size=2)
    with pytest.raises(UserError, match=r"rank_coords\['dp_shard'\]: 2"):
        predict_state_bytes(_args(tied=False), dims, rank_coords={"dp_shard": 2})


# -- the cost model -------------------------------------------------------------------------------

LLAMA3_8B = ModelArgs(
    vocab_size=128256,
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=14336,
)


def _find(candidates, **degrees):
    want = Layout(**degrees)
    return next(c for c in candidates if c.layout == want)


def test_layouts_that_fit_rank_above_faster_ones_that_do_not():
    cands = plan(LLAMA3_8B, gpus=8, gpu_memory_gb=40, seq_len=8192, batch=64)
    fits = [c.fits for c in cands]
    assert any(fits) and not all(fits)
    assert fits == sorted(fits, reverse=True)  # every fitting candidate comes first
    # Plain FSDP is the fastest here, but 8k tokens of activations do not fit in 40 GiB.
    fsdp = _find(cands, dp_shard=8)
    assert not fsdp.fits and fsdp.step_s == min(c.step_s for c in cands)
    best = recommend(cands)
    assert best is cands[0] and best.fits and best.memory.total <= 40 * 2**30
    assert cands.index(best) < cands.index(fsdp)
    # Sharding the state beats replicating it: same traffic pattern, less memory.
    assert fsdp.memory.parameters * 8 == _find(cands, dp_replicate=8).memory.parameters


def test_layouts_obey_the_enumeration_rules():
    req = PlanRequest(gpus=16, gpu_memory_gb=80, seq_len=4096, batch=64)
    layouts = valid_layouts(LLAMA3_8B, req, Hardware())
    assert Layout(dp_shard=16) in layouts and Layout(tp=8, dp_shard=2) in layouts
    for lay in layouts:
        assert lay.gpus == 16 and lay.tp in (1, 2, 4, 8) and LLAMA3_8B.n_layers % lay.pp == 0
        assert 64 % (lay.dp * req.micro_batch) == 0


def test_compute_time_matches_the_trainer_flop_count():
    from parallm.train.metrics import flops_per_token

    req = PlanRequest(gpus=8, gpu_memory_gb=80, seq_len=2048, batch=16)
    hw = Hardware()
    cand = estimate(LLAMA3_8B, Layout(dp_shard=4, tp=2), req, hw)
    flops = flops_per_token(LLAMA3_8B, 2048) * 16 * 2048 / 8
    assert cand.compute_s * hw.peak_flops * hw.mfu == pytest.approx(flops, rel=1e-4)


def test_tiny_model_on_one_gpu_recommends_the_trivial_layout():
    args = _args(tied=True)
    cands = plan(args, gpus=1, gpu_memory_gb=16, seq_len=32, batch=4)
    assert [c.layout for c in cands] == [Layout()]
    best = recommend(cands)
    assert best is cands[0] and best.fits and best.micro_batches == 4
    assert best.memory.parameters == args.num_params() * 4
    assert all(v == 0 for v in best.comm_bytes.values())
    text = format_plan(cands, gpu_memory_gb=16)
    assert "recommended: single" in text and "--parallel.dp_shard=1" in text


def test_a_model_too_large_for_any_layout_says_so():
    huge = ModelArgs(
        vocab_size=256000,
        dim=16384,
        n_layers=256,
        n_heads=128,
        n_kv_heads=16,
        head_dim=128,
        ffn_dim=65536,
    )
    cands = plan(huge, gpus=8, gpu_memory_gb=80, seq_len=4096, batch=8)
    assert cands and not any(c.fits for c in cands) and recommend(cands) is None
    text = format_plan(cands, gpu_memory_gb=80)
    assert "NO LAYOUT FITS in 80 GiB per GPU" in text and "recommended" not in text
    data = plan_to_dict(cands, gpu_memory_gb=80)
    assert data["fits_any"] is False and data["recommended"] is None
    json.dumps(data)


def test_no_valid_layout_is_stated():
    # An odd sequence rules out tp and cp, 5 layers rule out pp=2, a batch of 3 rules out dp=2.
    cands = plan(_args(tied=False), gpus=2, gpu_memory_gb=80, seq_len=33, batch=3)
    assert cands == []
    assert "NO VALID LAYOUT" in format_plan(cands, gpu_memory_gb=80)


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("gpus", 0, "gpus=0"),
        ("gpus", -2, "gpus=-2"),
        ("gpu_memory_gb", 0, "gpu_memory_gb=0"),
        ("gpu_memory_gb", -1.5, "gpu_memory_gb=-1.5"),
        ("seq_len", 0, "seq_len=0"),
        ("micro_batch", 3, "micro_batch=3"),
    ],
)
def test_invalid_requests_are_user_errors(field, value, shown):
    kwargs = dict(gpus=8, gpu_memory_gb=80, seq_len=1024, batch=8) | {field: value}
    with pytest.raises(UserError, match=shown):
        plan(LLAMA3_8B, **kwargs)


def test_plan_command_reads_a_model_directory(tmp_path):
    from parallm.models.hf import read_args
    from parallm.models.llama.hf_adapter import args_to_hf

    config = args_to_hf(ModelArgs(**SHAPE, architecture="qwen3"), "bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = read_args(tmp_path)
    text = plan_command(str(tmp_path), 4, 24, 64, 8)
    assert str(tmp_path) in text and "recommended:" in text
    data = json.loads(plan_json(str(tmp_path), 4, 24, 64, 8))
    assert data["fits_any"] and data["recommended"] == data["candidates"][0]
    assert data["parameters"] == args.num_params()
    with pytest.raises(UserError, match="gpus=0"):
        plan_command(str(tmp_path), 0, 24, 64, 8)


def test_a_video_model_is_refused_in_one_line(tmp_path):
    """`parallm plan` sizes language models; a STDiT3 directory gets a UserError naming --model."""
    from parallm.models.hf import save_pretrained
    from parallm.models.stdit import SPEC, STDiTArgs
    from parallm.planner.report import plan_command

    args = STDiTArgs(depth=1, hidden_size=32, num_heads=2, caption_channels=16, model_max_length=4)
    model = SPEC.build(args, device="cpu")
    path = save_pretrained(model, tmp_path / "stdit")
    with pytest.raises(UserError, match=r"^--model: .* is a STDiT3 video model"):
        plan_command(str(path), gpus=8, gpu_memory_gb=80, seq_len=1024, batch=8)
