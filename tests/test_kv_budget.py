"""Sizing the KV cache on a GPU: a fraction of the free memory less the largest step's peak.

The peak is measured on CUDA only; here the profiling forward must run on the largest step's
shapes (more tokens than the model's context, fewer logits rows than tokens and the reverse),
and the arithmetic and its error are checked exactly."""

import pytest
import torch

from parallm.errors import UserError
from parallm.inference.kv_budget import GiB, kv_budget, step_peak_bytes
from parallm.models.build import init_weights
from parallm.models.llama.model import ModelArgs, Transformer


@pytest.mark.parametrize(("tokens", "seqs"), [(64, 8), (5, 256), (1, 1)])
def test_profiling_step_runs_on_cpu(tokens, seqs):
    args = ModelArgs(
        vocab_size=50, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32,
        max_seq_len=32,
    )  # fmt: skip
    model = Transformer(args)
    init_weights(model, 0)
    assert step_peak_bytes(model.eval(), tokens, seqs) == 0  # CPU memory is not counted


def test_kv_budget_arithmetic_and_error():
    assert kv_budget(10 * GiB, 0.8, 2 * GiB, 2048) == int(8 * GiB) - 2 * GiB
    with pytest.raises(UserError, match=r"kv_cache_memory: 0.1 of the 10.00 GiB free .* 2.00 GiB"):
        kv_budget(10 * GiB, 0.1, 2 * GiB, 2048)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the peak is measured there")
def test_profiled_peak_covers_a_step_on_gpu():
    args = ModelArgs(
        vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64,
        ffn_dim=1536, max_seq_len=4096,
    )  # fmt: skip
    model = Transformer(args).cuda().eval()
    peak = step_peak_bytes(model, 4096, 256)
    # At least the float32 logits and probabilities of 256 rows, at most a few GiB.
    assert 2 * 256 * 32000 * 4 <= peak < 4 * GiB
