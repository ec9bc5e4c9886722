"""The STDiT3 family (Open-Sora v1.2's video transformer): checkpoint layout, loading and saving,
and the forward's semantics (padding, caption and frame masks, sharded spatial tokens, rotary).

Tiny shapes throughout (depth 2, hidden 32); every test runs in well under a second.
"""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from parallm.errors import UserError
from parallm.models.attention import AttentionInputs
from parallm.models.build import init_weights
from parallm.models.hf import load_pretrained, read_args, save_pretrained
from parallm.models.registry import family
from parallm.models.stdit.model import (
    STDiT3,
    STDiTArgs,
    initial_value,
    position_embedding_1d,
    position_embedding_2d,
)

D, H, N, C, CY, L = 2, 32, 4, 3, 12, 6
PATCH = (1, 2, 2)


def opensora_layout(
    d=D, h=H, n=N, c=C, patch=PATCH, cy=CY, length=L, co=C, qk_norm=True
) -> dict[str, tuple[int, ...]]:
    """Open-Sora's checkpoint names and shapes (OPENSORA-STDIT3.md's table), written out here
    independently of the model."""
    p = math.prod(patch)
    names = {
        "x_embedder.proj.weight": (h, c, *patch),
        "x_embedder.proj.bias": (h,),
        "t_block.1.weight": (6 * h, h),
        "t_block.1.bias": (6 * h,),
        "y_embedder.y_embedding": (length, cy),
        "y_embedder.y_proj.fc1.weight": (h, cy),
        "y_embedder.y_proj.fc1.bias": (h,),
        "y_embedder.y_proj.fc2.weight": (h, h),
        "y_embedder.y_proj.fc2.bias": (h,),
        "final_layer.scale_shift_table": (2, h),
        "final_layer.linear.weight": (p * co, h),
        "final_layer.linear.bias": (p * co,),
        "rope.freqs": (h // n // 2,),
    }
    for emb in ("t_embedder", "fps_embedder"):
        names |= {
            f"{emb}.mlp.0.weight": (h, 256),
            f"{emb}.mlp.0.bias": (h,),
            f"{emb}.mlp.2.weight": (h, h),
            f"{emb}.mlp.2.bias": (h,),
        }
    block = {
        "scale_shift_table": (6, h),
        "attn.qkv.weight": (3 * h, h),
        "attn.qkv.bias": (3 * h,),
        "attn.proj.weight": (h, h),
        "attn.proj.bias": (h,),
        "cross_attn.q_linear.weight": (h, h),
        "cross_attn.q_linear.bias": (h,),
        "cross_attn.kv_linear.weight": (2 * h, h),
        "cross_attn.kv_linear.bias": (2 * h,),
        "cross_attn.proj.weight": (h, h),
        "cross_attn.proj.bias": (h,),
        "mlp.fc1.weight": (4 * h, h),
        "mlp.fc1.bias": (4 * h,),
        "mlp.fc2.weight": (h, 4 * h),
        "mlp.fc2.bias": (h,),
    }
    if qk_norm:
        block |= {"attn.q_norm.weight": (h // n,), "attn.k_norm.weight": (h // n,)}
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(d):
            names |= {f"{kind}.{i}.{k}": s for k, s in block.items()}
    return names


def opensora_config(**over) -> dict:
    cfg = {
        "architectures": ["STDiT3"],
        "model_type": "STDiT3",
        "depth": D,
        "hidden_size": H,
        "num_heads": N,
        "in_channels": C,
        "patch_size": list(PATCH),
        "caption_channels": CY,
        "model_max_length": L,
        "mlp_ratio": 4.0,
        "qk_norm": True,
        "pred_sigma": False,
        "input_sq_size": 16,
        "class_dropout_prob": 0.1,
        "enable_flash_attn": True,  # Open-Sora runtime fields parallm ignores
        "enable_layernorm_kernel": True,
        "drop_path": 0.0,
        "torch_dtype": "float32",
    }
    return cfg | over


def opensora_dir(tmp_path, seed=0, **over):
    """A HF directory in Open-Sora's layout with random, all non-zero weights."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in opensora_layout().items():
        t = torch.randn(shape, generator=gen) * 0.3
        state[name] = torch.where(t == 0, torch.full_like(t, 0.1), t)
    d = tmp_path / f"opensora{seed}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(opensora_config(**over)))
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, state


def tiny_args(**over) -> STDiTArgs:
    kw = dict(
        depth=D,
        hidden_size=H,
        num_heads=N,
        in_channels=C,
        patch_size=PATCH,
        caption_channels=CY,
        model_max_length=L,
        input_sq_size=16,
    )
    return STDiTArgs(**(kw | over))


def random_model(args: STDiTArgs | None = None, seed: int = 0) -> STDiT3:
    """A model with random weights everywhere (no zero-initialised projections)."""
    model = family("STDiT3").build(args or tiny_args(), "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "rope.freqs":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(initial_value(name, p.shape, model.args, 0))
    return model.eval()


def inputs(b=2, t=3, hh=6, ww=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, C, t, hh, ww, generator=gen),
        timestep=torch.tensor([10.0, 700.0, 400.0][:b]),
        y=torch.randn(b, 1, L, CY, generator=gen),
        mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1]][:b]),
        fps=torch.full((b,), 24.0),
        height=torch.full((b,), float(8 * hh)),
        width=torch.full((b,), float(8 * ww)),
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_opensora_checkpoint_loads_every_tensor_by_name(tmp_path):
    d, state = opensora_dir(tmp_path)
    model = load_pretrained(d)
    got = model.state_dict()
    assert set(got) == set(state)  # nothing missing, nothing unexpected
    for name, value in state.items():
        assert got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name
    assert model.rope.freqs.requires_grad is False
    assert model.y_embedder.y_embedding.requires_grad is False
    assert not model.training


def test_save_load_round_trip_is_bit_identical(tmp_path):
    d, _ = opensora_dir(tmp_path)
    model = load_pretrained(d)
    saved = save_pretrained(model, tmp_path / "again")
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["model_type"] == "STDiT3" and cfg["architectures"] == ["STDiT3"]
    again = load_pretrained(saved)
    assert again.args == model.args
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model(**x), again(**x))
    assert torch.equal(again.rope.freqs, model.rope.freqs)
    assert torch.equal(again.y_embedder.y_embedding, model.y_embedder.y_embedding)


def test_trainable_caption_encoder_round_trips(tmp_path):
    args = tiny_args(caption_vocab_size=11, caption_encoder_layers=1)
    model = random_model(args)
    again = load_pretrained(save_pretrained(model, tmp_path / "m"))
    assert again.args == args
    assert set(again.state_dict()) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    x = inputs() | {"y": torch.randint(0, 11, (2, L))}
    with torch.no_grad():
        assert torch.equal(model(**x), again(**x))


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"model_type": "STDiT2", "architectures": ["STDiT2"]}, "STDiT2"),
        ({"num_heads": 5}, "divisible by num_heads"),
        ({"patch_size": [1, 2]}, "patch_size"),
        ({"skip_y_embedder": True}, "skip_y_embedder"),
        ({"depth": 0}, "depth"),
        ({"temporal_pos_embed": 1}, "temporal_pos_embed"),
    ],
)
def test_unsupported_config_is_one_line_user_error(tmp_path, over, field):
    d = tmp_path / "bad"
    d.mkdir()
    cfg = {k: v for k, v in opensora_config(**over).items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        read_args(d)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_missing_shape_field_is_named(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    cfg = opensora_config()
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="missing required field 'hidden_size'"):
        read_args(d)


def test_temporal_position_embedding_round_trips_and_is_absent_from_open_sora_configs(tmp_path):
    d, _ = opensora_dir(tmp_path)
    assert read_args(d).temporal_pos_embed is False  # Open-Sora v1.2 has none
    saved = save_pretrained(load_pretrained(d), tmp_path / "off")
    assert "temporal_pos_embed" not in json.loads((saved / "config.json").read_text())

    args = tiny_args(temporal_pos_embed=True)
    model = random_model(args)
    saved = save_pretrained(model, tmp_path / "on")
    assert json.loads((saved / "config.json").read_text())["temporal_pos_embed"] is True
    again = load_pretrained(saved)
    assert again.args == args
    # A fixed embedding: no parameter more than Open-Sora's layout.
    assert set(again.state_dict()) == set(opensora_layout())
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model(**x), again(**x))


# ---------------------------------------------------------------------------------------------
# Forward semantics


def test_null_caption_is_y_embedding():
    model = random_model()
    null = model.null_caption(3)
    assert null.shape == (3, 1, L, CY)
    for i in range(3):
        assert torch.equal(null[i, 0], model.y_embedder.y_embedding)


def test_padding_crops_to_the_input_size():
    model = random_model(tiny_args(patch_size=(2, 2, 2)))
    x = inputs(t=3, hh=5, ww=7)
    with torch.no_grad():
        out = model(**x)
        padded = model(**(x | {"x": F.pad(x["x"], (0, 1, 0, 1, 0, 1))}))
    assert out.shape == (2, C, 3, 5, 7) and out.dtype == torch.float32
    # Open-Sora pads with zeros at the end of each axis: the same as padding the input ourselves.
    torch.testing.assert_close(out, padded[:, :, :3, :5, :7], rtol=1e-5, atol=1e-5)


def test_caption_padding_does_not_change_the_output():
    model = random_model()
    x = inputs(b=3)
    with torch.no_grad():
        ref = model(**x)
        y = x["y"].clone()
        pad = (x["mask"] == 0)[:, None, :, None].expand_as(y)
        y[pad] = 100.0  # only where the mask is 0 (sample 2's mask is not a prefix)
        assert torch.equal(model(**(x | {"y": y})), ref)
        # A sample's output is its own: the same alone as in the batch.
        alone = model(**{k: v[2:] for k, v in x.items()})
        torch.testing.assert_close(alone, ref[2:], rtol=1e-5, atol=1e-5)
        # Unmasking sample 0's padding changes sample 0 only.
        changed = model(**(x | {"mask": torch.ones_like(x["mask"])}))
        assert not torch.allclose(changed[0], ref[0])
        assert torch.equal(changed[1], ref[1])  # sample 1 had every token already


def test_frame_mask_all_true_is_no_mask_and_false_frames_use_timestep_zero():
    model = random_model()
    x = inputs()
    with torch.no_grad():
        ref = model(**x)
        assert torch.equal(model(**x, x_mask=torch.ones(2, 3, dtype=torch.bool)), ref)
        x_mask = torch.tensor([[False, True, True], [True, True, True]])
        masked = model(**x, x_mask=x_mask)
        assert not torch.allclose(masked[0], ref[0])
        torch.testing.assert_close(masked[1], ref[1], rtol=1e-5, atol=1e-5)
        # A sample at timestep 0 is unchanged by masking its frames, but for the final layer,
        # which (as Open-Sora's does) normalises the already-modulated x of masked frames.
        at_zero = x | {"timestep": torch.zeros(2)}
        before_final = []
        hook = model.final_layer.register_forward_hook(
            lambda m, args, out: before_final.append(args[0])
        )
        model(**at_zero)
        model(**at_zero, x_mask=torch.zeros(2, 3, dtype=torch.bool))
        hook.remove()
        torch.testing.assert_close(before_final[0], before_final[1], rtol=1e-5, atol=1e-5)
        all_zero = torch.zeros(2, 3, dtype=torch.bool)
        assert not torch.allclose(model(**at_zero), model(**at_zero, x_mask=all_zero))


def test_forward_is_unpatchify_of_forward_tokens_and_patchify_inverts_it():
    model = random_model()
    x = inputs(t=2, hh=5, ww=7)
    with torch.no_grad():
        tokens = model.forward_tokens(**x)
        assert tokens.shape == (2, 2, 3 * 4, 4 * C)
        assert torch.equal(model.unpatchify(tokens, (2, 5, 7)), model(**x))
    v = torch.randn(2, C, 2, 6, 8)
    assert torch.equal(model.unpatchify(model.patchify(v), (2, 6, 8)), v)
    # Token (t, i*W' + j) holds pixel (t, 2i + a, 2j + b) at channel (a*2 + b)*C + c.
    p = model.patchify(v)
    assert torch.equal(p[1, 1, 1 * 4 + 2, (1 * 2 + 0) * C + 2], v[1, 2, 1, 3, 4])


class _ThreadGather:
    """A stand-in for a sequence-parallel backend in one process: `n` threads each run one
    rank's shard in lockstep and all-gather k and v through shared slots."""

    def __init__(self, n: int, gather: bool = True) -> None:
        self.n, self.gather = n, gather
        self.barrier = threading.Barrier(n)
        self.slots: list = [None] * n
        self.positions: list = [None] * n

    def for_rank(self, r: int):
        def backend(q, k, v, *, layer_idx: int, attn: AttentionInputs):
            self.positions[r] = attn.positions
            assert not attn.spec.causal
            if self.gather:
                self.barrier.wait()
                self.slots[r] = (k, v)
                self.barrier.wait()
                k = torch.cat([s[0] for s in self.slots], dim=1)
                v = torch.cat([s[1] for s in self.slots], dim=1)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
            return out.transpose(1, 2)

        return backend


def _sharded_tokens(model, x, n, gather):
    group = _ThreadGather(n, gather)
    outs: list = [None] * n

    def run(r):
        m = copy.copy(model)  # same modules and weights, its own shard attributes
        m.spatial_shard = (r, n)
        m.default_backend = group.for_rank(r)
        with torch.no_grad():
            outs[r] = m.forward_tokens(**x)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return torch.cat(outs, dim=2), group


def test_spatial_shards_with_gathered_attention_equal_the_full_forward():
    model = random_model()
    x = inputs(t=3, hh=4, ww=8) | {"x_mask": torch.tensor([[False, True, True], [True] * 3])}
    with torch.no_grad():
        full = model.forward_tokens(**x)
    sharded, group = _sharded_tokens(model, x, 2, gather=True)
    torch.testing.assert_close(sharded, full, rtol=1e-5, atol=1e-5)
    # Each rank's backend saw global spatial positions: rank 1 holds tokens 4..7 of 8.
    assert torch.equal(group.positions[1], torch.arange(4, 8).expand(2 * 3, 4))
    # Without the gather (each rank attending only to its own tokens) the result differs.
    local, _ = _sharded_tokens(model, x, 2, gather=False)
    assert not torch.allclose(local, full, rtol=1e-3, atol=1e-3)


def test_rotary_is_rotary_embedding_torch():
    """rotary-embedding-torch's formula (interleaved pairs), written out independently."""
    model = random_model()
    q = torch.randn(5, 7, N, H // N)
    got = model.rope(q)
    freqs = 1.0 / 10000 ** (torch.arange(0, H // N, 2).float() / (H // N))
    assert torch.equal(model.rope.freqs, freqs)
    want = torch.empty_like(q)
    for t in range(7):
        for i in range(H // N // 2):
            c, s = math.cos(t * freqs[i].item()), math.sin(t * freqs[i].item())
            a, b = q[:, t, :, 2 * i], q[:, t, :, 2 * i + 1]
            want[:, t, :, 2 * i] = a * c - b * s
            want[:, t, :, 2 * i + 1] = b * c + a * s
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_position_embedding_is_open_soras_grid():
    """Column coordinates in the first half, rows in the second, [sin, cos] each, coordinates
    arange / scale * base_size / size."""
    hp, wp, scale, base = 3, 4, 1.5, 3
    got = position_embedding_2d(16, hp, wp, scale, base, "cpu", torch.float32)
    inv = [1.0 / 10000 ** (k / 8) for k in (0, 2, 4, 6)]
    for i in range(hp):
        for j in range(wp):
            col, row = j / scale * base / wp, i / scale * base / hp
            want = [math.sin(col * f) for f in inv] + [math.cos(col * f) for f in inv]
            want += [math.sin(row * f) for f in inv] + [math.cos(row * f) for f in inv]
            torch.testing.assert_close(got[i * wp + j], torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_temporal_position_embedding_is_open_sora_v1s_and_tells_frames_apart():
    """Off (Open-Sora v1.2), frames that are the same come out the same: rotary temporal
    attention sees only frame offsets. On, the frame index is added to every patch token of a
    frame ([sin, cos] of p / 10000^(i / (hidden/2)), Open-Sora v1.0's get_1d_sincos_pos_embed),
    so the same frames come out different; nothing else changes."""
    got = position_embedding_1d(8, 3, "cpu", torch.float32)
    freqs = [1.0 / 10000 ** (k / 4) for k in range(4)]
    for p in range(3):
        want = [math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs]
        torch.testing.assert_close(got[p], torch.tensor(want), rtol=1e-6, atol=1e-6)

    off = random_model()
    on = random_model(tiny_args(temporal_pos_embed=True))
    assert torch.equal(off.x_embedder.proj.weight, on.x_embedder.proj.weight)  # same weights
    x = inputs(t=4)
    still = x | {"x": x["x"][:, :, :1].expand(-1, -1, 4, -1, -1)}  # one frame, repeated
    with torch.no_grad():
        out_off, out_on = off(**still), on(**still)
        # Adding the embedding by hand to the patch-embedding's output of the plain model gives
        # the model with the embedding.
        frames = position_embedding_1d(H, 4, "cpu", torch.float32)  # (T, H)
        by_hand = copy.deepcopy(off)
        by_hand.x_embedder.proj.register_forward_hook(
            lambda _m, _i, o: o + frames.T[None, :, :, None, None]
        )
        torch.testing.assert_close(by_hand(**x), on(**x), rtol=1e-5, atol=1e-5)
    for i in range(1, 4):
        torch.testing.assert_close(out_off[:, :, i], out_off[:, :, 0], rtol=1e-5, atol=1e-5)
        assert (out_on[:, :, i] - out_on[:, :, 0]).abs().max() > 1e-2


def test_caption_token_ids_and_dropped_captions():
    args = tiny_args(caption_vocab_size=11, caption_encoder_layers=2)
    model = random_model(args)
    x = inputs() | {"y": torch.randint(0, 11, (2, L))}
    with torch.no_grad():
        ref = model(**x)
        ids = x["y"].clone()
        ids[0, 3:] = (ids[0, 3:] + 1) % 11  # sample 0's padding tokens
        assert torch.equal(model(**(x | {"y": ids})), ref)
        dropped = model(**x, drop_caption=torch.tensor([True, False]))
        null = model(**(x | {"y": model.null_caption(2)}))
        torch.testing.assert_close(dropped[0], null[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dropped[1], ref[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Family spec


def test_initial_values_follow_open_sora():
    args = tiny_args()
    model = family("STDiT3").build(args, "cpu")
    init_weights(model, seed=3)
    p = dict(model.named_parameters())
    assert torch.equal(p["rope.freqs"], 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    for name in ("attn.proj.weight", "cross_attn.proj.weight", "mlp.fc2.weight"):
        assert not p[f"temporal_blocks.1.{name}"].any()
        assert p[f"spatial_blocks.1.{name}"].any()
    assert not p["fps_embedder.mlp.2.weight"].any()
    assert not p["spatial_blocks.0.attn.qkv.bias"].any()
    assert torch.equal(p["spatial_blocks.0.attn.q_norm.weight"], torch.ones(H // N))
    bound = (6 / (3 * H + H)) ** 0.5
    w = p["spatial_blocks.0.attn.qkv.weight"]
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert 0.5 < p["y_embedder.y_embedding"].std().item() * CY**0.5 < 1.5
    # A function of (seed, name) only.
    again = initial_value("temporal_blocks.0.mlp.fc1.weight", (4 * H, H), args, 3)
    assert torch.equal(p["temporal_blocks.0.mlp.fc1.weight"], again)
    other = initial_value("temporal_blocks.0.mlp.fc1.weight", (4 * H, H), args, 4)
    assert not torch.equal(other, again)


def test_facts_and_args_from_config():
    spec = family("STDiT3")
    args = tiny_args()
    facts = spec.facts(args)
    assert facts.num_params == sum(p.numel() for p in spec.build(args).parameters())
    assert (facts.n_layers, facts.dim, facts.ffn_dim, facts.head_dim) == (D, H, 4 * H, H // N)
    assert spec.flops_per_token(args, 16) > spec.flops_per_token(args, 4) > 0

    class Model:
        dim, n_layers, n_heads = 64, 3, 4

    class Video:
        patch, channels, caption_length, caption_channels = (1, 4, 4), 3, 20, 32
        text_encoder = "trainable"

    class Job:
        model, video = Model(), Video()

    got = spec.args_from_config(Job(), 100)
    assert (got.hidden_size, got.depth, got.num_heads, got.patch_size) == (64, 3, 4, (1, 4, 4))
    assert (got.model_max_length, got.caption_channels, got.caption_vocab_size) == (20, 32, 100)
    assert got.temporal_pos_embed is False
    Video.temporal_pos_embed = True
    assert spec.args_from_config(Job(), 100).temporal_pos_embed is True
    Video.text_encoder = "/models/t5"
    assert spec.args_from_config(Job(), 100).caption_vocab_size == 0
