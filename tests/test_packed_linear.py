"""Linear layers on oneDNN-packed weights (the engine's CPU steps): same results as `F.linear`,
repacked when a weight changes, and nothing left behind outside a step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallm.inference.packed_linear import PackedLinears, can_pack
from parallm.models.llama.model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN"
)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=300, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                     ffn_dim=96, qkv_bias=True)  # fmt: skip
    return Transformer(args).eval()


def test_packed_layers_equal_f_linear_and_follow_in_place_updates():
    model = tiny_model()
    packed = PackedLinears(model)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert packed.layers == linears and len(linears) == 2 * 7 + 1  # 7 per block, the head
    x = torch.randn(1, 37, 48)
    layer = model.layers["0"].self_attn.q_proj  # with a bias
    with torch.inference_mode(), packed.active():
        out = layer(x)
    assert "forward" not in vars(layer)  # back to nn.Linear.forward outside a step
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # an optimizer's in-place update bumps the version counter
        layer.weight.mul_(-2.0)
    with torch.inference_mode(), packed.active():
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)

    reference = model(torch.arange(9)[None])
    with torch.inference_mode(), packed.active():
        torch.testing.assert_close(model(torch.arange(9)[None]), reference, rtol=1e-5, atol=1e-5)


def test_nothing_is_packed_off_float32():
    model = tiny_model().to(torch.bfloat16)
    assert not can_pack(model)
    assert PackedLinears(model).layers == []


def test_sibling_projections_share_one_gemm_and_stay_exact():
    model = tiny_model()
    packed = PackedLinears(model)
    attn, mlp = model.layers["1"].self_attn, model.layers["1"].mlp
    assert (attn.q_proj, attn.k_proj, attn.v_proj) in packed.groups
    assert (mlp.gate_proj, mlp.up_proj) in packed.groups
    assert len(packed.groups) == 4 and len(packed.single) == 2 * 2 + 1  # o, down; the head
    x, other = torch.randn(1, 5, 48), torch.randn(1, 5, 48)
    with torch.no_grad():  # k_proj changes: the whole group is packed again
        attn.k_proj.weight.add_(0.5)
    with torch.inference_mode(), packed.active():
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        k_other = attn.k_proj(other)  # another input: its own result, not the one kept for x
        v_again = attn.v_proj(x)  # a second call: computed again
        kept = [fused.kept for fused in packed._fused.values()]
        assert any(kept)  # the group of `other` still keeps q and v for it
    assert not any(fused.kept or fused.input is not None for fused in packed._fused.values())
    for layer, got, inp in [(attn.q_proj, q, x), (attn.k_proj, k, x), (attn.v_proj, v, x),
                            (attn.k_proj, k_other, other), (attn.v_proj, v_again, x)]:  # fmt: skip
        torch.testing.assert_close(
            got, F.linear(inp, layer.weight, layer.bias), rtol=1e-5, atol=1e-5
        )


def test_a_step_with_unchanged_weights_reuses_the_packing_and_a_replaced_weight_repacks():
    model = tiny_model()
    packed = PackedLinears(model)
    x = torch.randn(1, 3, 48)
    layer = model.layers["0"].mlp.down_proj
    with torch.inference_mode(), packed.active():
        model(torch.arange(5)[None])
    forwards = {layers: cached[1] for layers, cached in packed._packed.items()}
    with torch.inference_mode(), packed.active():  # nothing changed: the same packed forwards
        assert all(packed._packed[layers][1] is f for layers, f in forwards.items())
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # a new tensor, e.g. a reload
    x = torch.randn(1, 3, 96)
    with torch.inference_mode(), packed.active():
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
