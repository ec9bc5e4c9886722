"""The attention description: causal, full, per-document and sliding-window rules, honoured by the
training backend, by context-parallel Ulysses and ring attention, and refused by the paged cache.

Per-document attention is checked against what it promises: packed documents give exactly the
logits (and gradients) of running each document on its own.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallm.distributed.context_parallel import context_parallel_backend, shard_sequence
from parallm.errors import UserError
from parallm.inference.paged_attention import KVPool, PagedAttention
from parallm.models.attention import AttentionInputs, AttentionSpec, attention_mask
from parallm.models.build import init_weights
from parallm.models.llama.model import ModelArgs, Transformer
from parallm.testing.distributed import run_distributed
from parallm.train.tasks.pretrain import document_layout

LENGTHS = (5, 11, 8, 8)  # four packed documents, 32 tokens


def _model(**kw) -> Transformer:
    args = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
    model = Transformer(ModelArgs(**{**args, **kw}))
    init_weights(model, 0)
    return model


def _packed(lengths=LENGTHS, rows: int = 2, seed: int = 0):
    """Token ids (B, T), document ids and per-document positions for `rows` packed rows."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    ids = torch.randint(0, 64, (rows, t), generator=g)
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(rows, t)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(rows, t)
    return ids, docs.contiguous(), pos.contiguous()


def _separately(model, ids, lengths=LENGTHS) -> torch.Tensor:
    """Logits of every document run on its own, concatenated back: (B, T, vocab)."""
    return torch.cat([model(part) for part in ids.split(list(lengths), dim=1)], dim=1)


@pytest.mark.parametrize(
    "kw",
    [{}, {"sliding_windows": [None, 3]}, {"qk_norm": True, "architecture": "qwen3"}],
    ids=["llama", "mistral_window", "qwen3"],
)
def test_packed_documents_equal_separate_runs(kw):
    model = _model(**kw)
    ids, docs, pos = _packed()
    spec = AttentionSpec.of_kind("document")
    packed = model(ids, pos, docs, attention=spec)
    torch.testing.assert_close(packed, _separately(model, ids), rtol=1e-5, atol=1e-5)
    # Without the document rule the later documents see the earlier ones: the check can fail.
    assert not torch.allclose(model(ids, pos), _separately(model, ids), atol=1e-3)


def test_packed_documents_gradients_equal_separate_runs():
    model = _model()
    ids, docs, pos = _packed()
    model(ids, pos, docs, attention=AttentionSpec.of_kind("document")).square().mean().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _separately(model, ids).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_full_attention_sees_the_future_and_matches_an_unmasked_reference():
    model = _model()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    full = AttentionSpec.of_kind("full")
    out = model(ids, attention=full)

    def unmasked(q, k, v, *, layer_idx, attn):  # plain softmax attention over every key
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return (w @ v).transpose(1, 2)

    torch.testing.assert_close(out, model(ids, backend=unmasked), rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 64
    # The first token's output depends on the last token under full attention, not causal.
    assert not torch.allclose(model(changed, attention=full)[0, 0], out[0, 0])
    torch.testing.assert_close(model(changed)[0, 0], model(ids)[0, 0])


def test_masks_of_each_kind():
    pos = torch.arange(5)[None]
    causal = attention_mask(pos, pos, AttentionSpec())[0, 0]
    assert torch.equal(causal, torch.ones(5, 5, dtype=torch.bool).tril())
    window = attention_mask(pos, pos, AttentionSpec.of_kind("sliding", window=2))[0, 0]
    assert window.sum(1).tolist() == [1, 2, 2, 2, 2]
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    per_doc = attention_mask(pos, pos, AttentionSpec.of_kind("document"), docs, docs)[0, 0]
    assert per_doc[2].tolist() == [False, False, True, False, False]
    assert attention_mask(pos, pos, AttentionSpec.of_kind("full")).all()
    # A layer's own window narrows the batch's rule, never widens it.
    assert AttentionSpec(window=4).for_layer(2).window == 2
    assert AttentionSpec(window=2).for_layer(4).window == 2


def test_bad_attention_descriptions():
    with pytest.raises(UserError, match="attention: 'zigzag' is not valid; valid: causal, full"):
        AttentionSpec.of_kind("zigzag")
    with pytest.raises(UserError, match="needs document ids"):
        AttentionInputs(torch.zeros(1, 3, dtype=torch.long), AttentionSpec.of_kind("document"))
    pool = KVPool(_model().args, num_blocks=4, block_size=4, n_kv_heads=2, dtype=torch.float32, device="cpu")  # fmt: skip
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(UserError, match="paged KV cache serves causal attention"):
        PagedAttention(pool)(
            q,
            q[:, :, :2],
            q[:, :, :2],
            layer_idx=0,
            attn=AttentionInputs(torch.arange(3)[None], AttentionSpec.of_kind("full")),
        )


def test_document_layout_of_packed_rows():
    eos = 9
    ids = torch.tensor([[1, 2, 9, 3, 4, 5, 9, 6], [9, 1, 1, 1, 9, 9, 2, 2]])
    docs, pos = document_layout(ids, eos)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 2, 3, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 0, 0, 1]]


# ---------------------------------------------------------------------------------------------
# Context parallelism: documents split over ranks still never see each other


def _cp_documents(rank: int, cp: int) -> dict[str, float]:
    model = _model(n_heads=8, n_kv_heads=4, sliding_windows=[None, 3])  # Ulysses: 4 | heads
    ids, docs, pos = _packed()
    ref = _separately(model, ids)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    spec = AttentionSpec.of_kind("document")
    errors = {}
    for mode, balance in (("ulysses", False), ("ring", True), ("ring", False)):
        model.zero_grad()

        def shard(x, lb=balance):
            return shard_sequence(x, rank, cp, load_balance=lb)

        backend = context_parallel_backend(mode, dist.group.WORLD)
        out = model(shard(ids), shard(pos), shard(docs), attention=spec, backend=backend)
        # Each rank's share of the full-sequence mean of squares.
        (out.square().sum() / ref.numel()).backward()
        grad_err = 0.0
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grad_err = max(grad_err, (p.grad - ref_grads[name]).abs().max().item())
        errors[f"{mode} balance={balance}"] = (
            (out - shard(ref.detach())).abs().max().item(),
            grad_err,
        )
    return errors


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_documents_equal_separate_runs(tmp_path, cp):
    for rank, errors in enumerate(run_distributed(_cp_documents, cp, tmp_path)):
        assert len(errors) == 3
        bad = {k: v for k, v in errors.items() if not (v[0] < 1e-5 and v[1] < 1e-6)}
        assert not bad, f"rank {rank} of {cp}: {bad}"
