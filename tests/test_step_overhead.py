"""The cheaper forms of the engine's per-step work compute what the plain forms do: RMSNorm
through torch's `rms_norm` and RoPE as one roll give the reference float32 results and
gradients, and `eval_mode` leaves a model in eval mode without walking it."""

import torch
from torch import nn

from parallm.inference.worker import eval_mode
from parallm.models.llama.model import RMSNorm, apply_rope, rope_cos_sin


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def reference_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """The rotate-half form as transformers writes it: cos, sin (B, T, D) in x's dtype."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, :, None], emb.sin().to(x.dtype)[:, :, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_rms_norm_equals_the_reference_in_float32_with_gradients():
    torch.manual_seed(0)
    for shape in [(1, 1, 256), (2, 37, 48), (3, 5, 4, 12)]:
        norm = RMSNorm(shape[-1], 1e-5)
        with torch.no_grad():
            norm.weight.normal_()
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        got = norm(x)
        want = reference_rms_norm(x, norm.weight, 1e-5)
        assert torch.equal(got, want)
        got_grads = torch.autograd.grad(got, (x, norm.weight), grad)
        want_grads = torch.autograd.grad(want, (x, norm.weight), grad)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_rms_norm_off_float32_keeps_the_reference_rounding():
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    assert torch.equal(norm(x), reference_rms_norm(x, norm.weight, 1e-6))


def test_rope_as_one_roll_equals_rotate_half_exactly():
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, 4, 32).to(dtype)
        positions = torch.randint(0, 1000, (2, 7))
        cos, sin = rope_cos_sin(inv_freq, positions, dtype)
        assert cos.shape == sin.shape == (2, 7, 1, 32)
        assert torch.equal(apply_rope(x, cos, sin), reference_rope(x, positions, inv_freq))


def test_eval_mode_leaves_an_eval_model_alone_and_restores_a_training_one():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5)))
    model.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
    model.train()
    model[2].eval()  # a mix of modes, given back module by module
    modes = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes
