"""Context-parallel attention on gloo: every layout must reproduce single-process attention.

Each worker builds the same full-sequence tensors on every rank (shared seed), computes the
reference with `sdpa` on the full sequence, then runs a backend on its shard and reports the
largest difference of its output and of its q/k/v gradients from the reference's slices.
Tolerance: 1e-5 absolute in float32 (only summation order differs).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallm.distributed.context_parallel import (
    RingAttention,
    UlyssesAttention,
    context_parallel_backend,
    cp_positions,
    shard_sequence,
    unshard_sequence,
)
from parallm.models.attention import AttentionInputs, AttentionSpec, attention_mask, sdpa
from parallm.models.build import init_weights
from parallm.models.llama.model import ModelArgs, Transformer
from parallm.testing.distributed import run_distributed

ATOL = 1e-5
RTOL = 1e-4  # model gradients, relative to each parameter's largest reference gradient


def _attention_errors(
    backend, rank: int, cp: int, *, heads: tuple[int, int], windows, layouts
) -> dict[str, float]:
    """Max |difference| of output and q/k/v grads from full-sequence SDPA, per case."""
    torch.manual_seed(0)
    b, t, (hq, hkv), d = 2, 32, heads, 16
    full = [torch.randn(b, t, h, d) for h in (hq, hkv, hkv)]  # q, k, v
    grad_out = torch.randn(b, t, hq, d)
    pos = torch.arange(t).expand(b, t)
    errors = {}
    # Causal with and without a window, and bidirectional (STDiT's spatial attention: the
    # backends take no mask) with and without one.
    cases = [(causal, window) for causal in (True, False) for window in windows]
    for causal, window in cases:
        spec = AttentionSpec(causal=causal, window=window)
        q, k, v = (x.clone().requires_grad_() for x in full)
        mask = None if window is None else attention_mask(pos, pos, spec)
        ref = sdpa(q, k, v, mask, causal=causal)
        ref.backward(grad_out)
        for load_balance in layouts:

            def shard(x, lb=load_balance):
                return shard_sequence(x, rank, cp, load_balance=lb)

            lq, lk, lv = (shard(x.detach()).requires_grad_() for x in (q, k, v))
            attn = AttentionInputs(shard(pos), spec)
            out = backend(lq, lk, lv, layer_idx=0, attn=attn)
            out.backward(shard(grad_out))
            pairs = [(out, ref), (lq.grad, q.grad), (lk.grad, k.grad), (lv.grad, v.grad)]
            key = f"causal={causal} window={window} load_balance={load_balance}"
            errors[key] = max((got - shard(want)).abs().max().item() for got, want in pairs)
    return errors


def _backends_vs_reference(rank: int, cp: int, heads: tuple[int, int]) -> dict:
    results = {}
    for mode in ("ulysses", "ring"):
        backend = context_parallel_backend(mode, dist.group.WORLD)
        errors = _attention_errors(
            backend, rank, cp, heads=heads, windows=(None, 5), layouts=(False, True)
        )
        results |= {f"{mode} {key}": err for key, err in errors.items()}
    # Ulysses cannot split 2 kv heads over 4 ranks, nor 1 over 2.
    q, kv = torch.zeros(1, 8, 4, 8), torch.zeros(1, 8, 1, 8)
    try:
        UlyssesAttention(dist.group.WORLD)(
            q,
            kv,
            kv,
            layer_idx=0,
            attn=AttentionInputs(torch.zeros(1, 8, dtype=torch.long)),
        )
        results["head error"] = None
    except ValueError as e:
        results["head error"] = str(e)
    return results


@pytest.mark.parametrize(("cp", "heads"), [(2, (4, 2)), (4, (8, 4))])
def test_backends_match_full_sequence_attention(tmp_path, cp, heads):
    results = run_distributed(_backends_vs_reference, cp, tmp_path, heads)
    for rank, res in enumerate(results):
        assert "query heads (4) and kv heads (1) must both be divisible by" in res.pop("head error")
        assert len(res) == 16  # 2 modes x (causal or not) x 2 windows x 2 layouts
        bad = {case: err for case, err in res.items() if not err < ATOL}
        assert not bad, f"rank {rank} of {cp}: {bad}"


def _tiny_model() -> Transformer:
    args = ModelArgs(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_dim=64,
        sliding_windows=[None, 5],  # one full-attention layer, one windowed
    )
    model = Transformer(args)
    init_weights(model, 0)
    return model


def _model_vs_reference(rank: int, cp: int) -> dict:
    model = _tiny_model()
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def loss_of(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    ref_loss = loss_of(model(inputs), labels)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    results = {}
    for mode, load_balance in (("ulysses", False), ("ring", True), ("ring", False)):
        model.zero_grad(set_to_none=True)

        def shard(x, lb=load_balance):
            return shard_sequence(x, rank, cp, load_balance=lb)

        positions = cp_positions(32, rank, cp, load_balance=load_balance).expand(2, -1)
        backend = context_parallel_backend(mode, dist.group.WORLD)
        loss = loss_of(model(shard(inputs), positions, backend=backend), shard(labels))
        loss.backward()
        # Every rank holds as many tokens, so the full-sequence mean is the mean over ranks.
        loss = loss.detach()
        dist.all_reduce(loss)
        grad_err, grad_rel_err = 0.0, 0.0
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            err = (p.grad / cp - ref_grads[name]).abs().max().item()
            grad_err = max(grad_err, err)
            # Gradients of a freshly initialised model are small, so also relative to their size.
            grad_rel_err = max(grad_rel_err, err / ref_grads[name].abs().max().item())
        key = f"{mode} load_balance={load_balance}"
        results[key] = (abs(loss.item() / cp - ref_loss.item()), grad_err, grad_rel_err)
    return results


def test_model_trains_identically_under_context_parallelism(tmp_path):
    results = run_distributed(_model_vs_reference, 2, tmp_path)
    for rank, res in enumerate(results):
        assert len(res) == 3
        for case, (loss_err, grad_err, grad_rel_err) in res.items():
            ok = loss_err < ATOL and grad_err < ATOL and grad_rel_err < RTOL
            assert ok, f"rank {rank} {case}: {res[case]}"


def test_sharding_layouts_and_positions():
    x = torch.arange(16).view(1, 16)
    assert cp_positions(8, 0, 2, load_balance=True).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 1, 2, load_balance=True).tolist() == [2, 3, 4, 5]
    assert cp_positions(8, 1, 2, load_balance=False).tolist() == [4, 5, 6, 7]
    for load_balance in (False, True):
        parts = [shard_sequence(x, r, 4, load_balance=load_balance) for r in range(4)]
        assert torch.equal(unshard_sequence(parts, 4, load_balance=load_balance), x)
        positions = [cp_positions(16, r, 4, load_balance=load_balance) for r in range(4)]
        assert all(torch.equal(p[None], s) for p, s in zip(positions, parts, strict=True))


def test_bad_lengths_and_modes_are_user_errors():
    with pytest.raises(
        ValueError, match="sequence length 12 is not divisible by 2 \\* cp_size = 8"
    ):
        shard_sequence(torch.zeros(1, 12), 0, 4, load_balance=True)
    with pytest.raises(ValueError, match="sequence length 7 is not divisible by 2"):
        cp_positions(7, 0, 2, load_balance=False)
    with pytest.raises(ValueError, match="cp_rank 2 is outside 0..1"):
        shard_sequence(torch.zeros(1, 8), 2, 2, load_balance=False)
    with pytest.raises(ValueError, match="'zigzag' is not one of ulysses, ring"):
        context_parallel_backend("zigzag", None)


@pytest.mark.parametrize("backend_cls", [RingAttention, UlyssesAttention])
def test_single_rank_backends_need_no_process_group(backend_cls):
    # On one rank all communication is skipped: the same code runs without init_process_group.
    errors = _attention_errors(
        backend_cls(None), 0, 1, heads=(4, 2), windows=(None, 5), layouts=(False,)
    )
    assert all(err < ATOL for err in errors.values()), errors
