"""FlexPagedAttention against the portable paged backend and a full-sequence forward (CPU)."""

import pytest
import torch

from parallm.errors import UserError
from parallm.inference.flex_attention import FlexPagedAttention, make_backend
from parallm.inference.paged_attention import KVPool, PagedAttention, StepMetadata
from parallm.models.build import init_weights
from parallm.models.llama.model import ModelArgs, Transformer

BLOCK = 4
ARGS = ModelArgs(
    vocab_size=64,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=64,
    sliding_windows=[None, 5],
)


def new_pool() -> KVPool:
    return KVPool(
        ARGS, num_blocks=16, block_size=BLOCK, n_kv_heads=2, dtype=torch.float32, device="cpu"
    )


def run_step(model, backend, chunks) -> torch.Tensor:
    """chunks: (tokens, start, block table) per sequence; returns logits (N, vocab)."""
    ids = torch.tensor([sum((c[0] for c in chunks), [])])
    pos = torch.tensor([sum((list(range(s, s + len(t))) for t, s, _ in chunks), [])])
    backend.metadata = StepMetadata.build(
        [c[1] for c in chunks],
        [len(c[0]) for c in chunks],
        [c[2] for c in chunks],
        BLOCK,
        torch.device("cpu"),
    )
    with torch.no_grad():
        return model(ids, pos, backend=backend)[0]


def test_flex_matches_portable_and_full_forward():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    init_weights(model, 0)
    model.eval()
    s1 = torch.randint(0, 64, (11,)).tolist() + [9, 7]  # the last two: decode tokens
    s2 = torch.randint(0, 64, (6,)).tolist() + [3]
    s3 = s1[:4] + torch.randint(0, 64, (5,)).tolist()  # shares s1's first block
    # Block tables interleave so both sequences' slots share flex tiles.
    t1, t2, t3 = [0, 2, 4, 6], [1, 3], [0, 5, 7]
    steps = [
        [(s1[:7], 0, t1), (s2[:6], 0, t2)],  # s1's prompt in two chunks, s2's whole
        [(s1[7:11], 7, t1)],
        [(s1[11:12], 11, t1), (s2[6:], 6, t2)],  # one decode step for both
        # s3 reuses s1's cached first block (prefix caching) while s1 decodes.
        [(s1[12:], 12, t1), (s3[4:], 4, t3)],
    ]
    outs = {}
    for name, backend in (("flex", FlexPagedAttention(new_pool())), ("portable", None)):
        backend = backend or PagedAttention(new_pool())
        outs[name] = torch.cat([run_step(model, backend, chunks) for chunks in steps])
    with torch.no_grad():
        ref1, ref2, ref3 = (model(torch.tensor([s]))[0] for s in (s1, s2, s3))
    rows = [(ref1, 0, 7), (ref2, 0, 6), (ref1, 7, 11), (ref1, 11, 12), (ref2, 6, 7)]
    rows += [(ref1, 12, 13), (ref3, 4, 9)]
    ref = torch.cat([r[a:b] for r, a, b in rows])
    torch.testing.assert_close(outs["flex"], outs["portable"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["flex"], ref, atol=1e-5, rtol=0)


def test_make_backend_names():
    pool = new_pool()
    assert isinstance(make_backend("portable", pool), PagedAttention)
    assert isinstance(make_backend("flex", pool), FlexPagedAttention)
    assert isinstance(make_backend("auto", pool), PagedAttention)  # a CPU pool
    with pytest.raises(UserError, match="portable, flex, auto"):
        make_backend("triton", pool)


def test_engine_with_forced_flex_backend_matches_portable(tmp_path):
    from hf_models import save_hf_model_with_tokenizer

    from parallm.inference.engine import EngineConfig, LLMEngine
    from parallm.inference.sampling import SamplingParams

    save_hf_model_with_tokenizer("llama3", tmp_path)
    results = {}
    for backend in ("portable", "flex"):
        engine = LLMEngine(tmp_path, EngineConfig(block_size=8, attention_backend=backend))
        for i, n in enumerate((5, 19)):
            engine.add_request(
                str(i),
                list(range(3, 3 + n)),
                SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
            )
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
        results[backend] = got
    assert results["flex"] == results["portable"]
