"""The CPU decode kernel reads the paged cache in place and equals gather + masked SDPA."""

import random

import pytest
import torch

from parallm.inference import cpu_decode
from parallm.inference.paged_attention import KVPool, PagedAttention
from parallm.models.attention import AttentionSpec, attention_mask, sdpa
from parallm.models.llama.model import ModelArgs

needs_kernel = pytest.mark.skipif(
    cpu_decode.load() is None, reason="the CPU decode kernel does not build here (no C compiler)"
)


def reference(q, k_cache, v_cache, tokens, slots, lengths, window):
    """Gather each row's context and run masked SDPA, as the portable backend does."""
    g, width = slots.shape
    keys = k_cache[slots.flatten()].unflatten(0, (g, width))
    values = v_cache[slots.flatten()].unflatten(0, (g, width))
    pos = torch.arange(width).expand(g, width)
    kv_pos = torch.where(pos < lengths[:, None], pos, 2**40)
    mask = attention_mask((lengths - 1)[:, None], kv_pos, AttentionSpec(window=window))
    return sdpa(q[tokens][:, None], keys, values, mask)[:, 0]


@needs_kernel
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_equals_gather_and_sdpa(hq, hkv, window):
    torch.manual_seed(0)
    rng = random.Random(0)
    block, d, n_blocks = 4, 16, 80
    k_cache = torch.randn(n_blocks * block, hkv, d)
    v_cache = torch.randn(n_blocks * block, hkv, d)
    lengths = torch.tensor([1, 2, 5, 13, 40, 7, 33])
    width = int(lengths.max())
    owned = iter(rng.sample(range(n_blocks), n_blocks))  # blocks in no order, none shared
    tables = [[next(owned) for _ in range(-(-width // block))] for _ in lengths]
    pos = torch.arange(width)
    slots = torch.tensor(tables)[:, pos // block] * block + pos % block
    slots = torch.where(pos < lengths[:, None], slots, 0)  # padding: slot 0, as the step has
    n_tok = 12
    q = torch.randn(n_tok, hq, d)
    tokens = torch.tensor(rng.sample(range(n_tok), len(lengths)))
    out = torch.full_like(q, 7.0)
    cpu_decode.paged_decode(q, out, k_cache, v_cache, tokens, slots, lengths, window)
    torch.testing.assert_close(
        out[tokens], reference(q, k_cache, v_cache, tokens, slots, lengths, window),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    untouched = torch.ones(n_tok, dtype=torch.bool)
    untouched[tokens] = False
    assert torch.all(out[untouched] == 7.0)


def test_without_a_compiler_the_portable_path_serves(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PARALLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_decode.load.cache_clear()
    try:
        assert cpu_decode.load() is None
        args = ModelArgs(
            vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, ffn_dim=16
        )
        pool = KVPool(args, num_blocks=4, block_size=4, n_kv_heads=2, dtype=torch.float32,
                      device="cpu")  # fmt: skip
        assert not PagedAttention(pool).decode_kernel
        assert "no C compiler" in caplog.text
        assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    finally:
        cpu_decode.load.cache_clear()


@needs_kernel
def test_kernel_is_cached_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLM_KERNEL_CACHE", str(tmp_path))
    cpu_decode.load.cache_clear()
    try:
        assert cpu_decode.load() is not None
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith("paged_decode-")
        assert built[0].suffix == ".so"
    finally:
        cpu_decode.load.cache_clear()
