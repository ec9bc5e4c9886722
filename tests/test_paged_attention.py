"""The portable paged backend's grouping: every sequence in exactly one group, padding bounded,
and a step of mixed decodes and prompt chunks equal to each sequence's own full forward."""

import itertools
import random

import pytest
import torch

from parallm.inference import cpu_decode
from parallm.inference.paged_attention import (
    MAX_GROUP_CONTEXT,
    MAX_PADDING_COST,
    KVPool,
    PagedAttention,
    StepMetadata,
    group_rows,
)
from parallm.models.build import init_weights
from parallm.models.llama.model import ModelArgs, Transformer


def test_group_rows_partitions_and_bounds_padding():
    rng = random.Random(0)
    for _ in range(200):
        b = rng.randint(1, 40)
        lengths = [rng.choice([1, 1, 1, rng.randint(1, 300)]) for _ in range(b)]
        contexts = [n + rng.randint(0, 500) for n in lengths]
        groups = group_rows(lengths, contexts)
        assert sorted(i for g in groups for i in g) == list(range(b))
        for g in groups:
            padded = len(g) * max(lengths[i] for i in g) * max(contexts[i] for i in g)
            work = sum(lengths[i] * contexts[i] for i in g)
            assert len(g) == 1 or padded <= MAX_PADDING_COST * work
            assert len(g) == 1 or len(g) * max(contexts[i] for i in g) <= MAX_GROUP_CONTEXT


def test_decodes_share_groups_of_bounded_context_and_a_long_chunk_gets_its_own():
    lengths = [1] * 64 + [256]
    contexts = [300 + i for i in range(64)] + [256]
    groups = sorted(map(sorted, group_rows(lengths, contexts)))
    assert [64] in groups
    decodes = [g for g in groups if g != [64]]
    assert len(decodes) > 1 and sorted(i for g in decodes for i in g) == list(range(64))
    for g, following in itertools.pairwise(decodes):
        assert len(g) * max(contexts[i] for i in g) <= MAX_GROUP_CONTEXT
        # Each group is as large as the bound allows: the next decode would not fit.
        assert (len(g) + 1) * contexts[following[0]] > MAX_GROUP_CONTEXT


@pytest.mark.parametrize("decode_kernel", [False, True], ids=["gather", "kernel"])
def test_mixed_step_equals_full_forward(decode_kernel):
    """16 sequences in one step, decodes and prompt chunks of many lengths (several groups),
    with a sliding-window layer: each row equals the full forward of its own sequence, with the
    decode rows through gather + SDPA and through the CPU decode kernel."""
    if decode_kernel and cpu_decode.load() is None:
        pytest.skip("the CPU decode kernel does not build here (no C compiler)")
    torch.manual_seed(0)
    args = ModelArgs(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
        sliding_windows=[None, 7],
    )  # fmt: skip
    model = Transformer(args)
    init_weights(model, 0)
    model.eval()
    block = 4
    pool = KVPool(args, num_blocks=200, block_size=block, n_kv_heads=2, dtype=torch.float32,
                  device="cpu")  # fmt: skip
    backend = PagedAttention(pool, decode_kernel=decode_kernel)
    assert backend.decode_kernel == decode_kernel
    rng = random.Random(1)
    seqs, tables, next_block = [], [], 0
    for _ in range(16):
        total = rng.randint(2, 40)
        seqs.append(torch.randint(0, 64, (total,)).tolist())
        n_blocks = -(-total // block)
        tables.append(list(range(next_block, next_block + n_blocks)))
        next_block += n_blocks
    # Step 1: every prompt but its last token (or a prefix of it); step 2: the rest, so that
    # step 2 mixes single decode tokens with chunks of many lengths.
    cut = [len(s) - 1 if i % 2 else rng.randint(1, len(s) - 1) for i, s in enumerate(seqs)]
    outs = []
    for spans in ([(0, c) for c in cut], [(c, len(s)) for c, s in zip(cut, seqs, strict=True)]):
        ids = torch.tensor([[t for s, (a, b) in zip(seqs, spans, strict=True) for t in s[a:b]]])
        pos = torch.tensor([[p for a, b in spans for p in range(a, b)]])
        md = StepMetadata.build(
            [a for a, _ in spans], [b - a for a, b in spans], tables, block, torch.device("cpu")
        )
        if spans[0][0] > 0:
            assert len(md.groups) > 1
        else:  # whole prompts: the causal rule without a mask, padding included
            assert any(g.fresh and not bool(g.q_valid.all()) for g in md.groups)
        backend.metadata = md
        with torch.no_grad():
            outs.append(model(ids, pos, backend=backend)[0])
    with torch.no_grad():
        refs = [model(torch.tensor([s]))[0] for s in seqs]
    expected = torch.cat(
        [torch.cat([r[:c] for r, c in zip(refs, cut, strict=True)])]
        + [torch.cat([r[c:] for r, c in zip(refs, cut, strict=True)])]
    )
    torch.testing.assert_close(torch.cat(outs), expected, atol=1e-5, rtol=0)
