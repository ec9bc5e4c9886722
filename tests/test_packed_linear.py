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
