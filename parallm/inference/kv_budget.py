"""How many KV-cache blocks this rank gets: bytes given, or on a GPU a fraction of the free
memory less the measured peak of the largest step."""

from __future__ import annotations

import torch
from torch import nn

from parallm.errors import UserError
from parallm.inference.config import EngineConfig
from parallm.inference.model_runner import GiB, kv_bytes_per_block


def kv_cache_blocks(
    model: nn.Module, config: EngineConfig, max_model_len: int, tp_size: int = 1
) -> tuple[int, int]:
    """The KV cache budget in bytes of this rank, and how many blocks it holds.

    On a GPU a fraction (default 0.8) of the memory free after loading the model, less the peak
    a step of `max_num_batched_tokens` tokens needs on top (measured by running one: see
    `step_peak_bytes`), so that no step runs out of memory once the cache is allocated."""
    c = config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if isinstance(c.kv_cache_memory, float) and c.kv_cache_memory <= 1:
        if device.type != "cuda":
            raise UserError("kv_cache_memory: a fraction needs a GPU; give bytes on CPU")
        budget = _gpu_budget(model, c, c.kv_cache_memory, device)
    elif c.kv_cache_memory is not None:
        budget = int(c.kv_cache_memory)
    elif device.type == "cuda":
        budget = _gpu_budget(model, c, 0.8, device)
    else:
        # CPU: room for max_num_seqs full contexts, at most 1 GiB.
        per_token = kv_bytes_per_block(model, 1, tp_size, dtype)
        budget = min(GiB, c.max_num_seqs * max_model_len * per_token)
    return budget, int(budget // kv_bytes_per_block(model, c.block_size, tp_size, dtype))


def _gpu_budget(model: nn.Module, config: EngineConfig, fraction: float, device) -> int:
    peak = step_peak_bytes(model, config.max_num_batched_tokens, config.max_num_seqs)
    free, _ = torch.cuda.mem_get_info(device)  # after the profiled step's memory is released
    return kv_budget(free, fraction, peak, config.max_num_batched_tokens)


def kv_budget(free: int, fraction: float, step_peak: int, step_tokens: int) -> int:
    """Bytes for the KV cache: `fraction` of the `free` bytes, less a step's peak; a UserError
    when nothing is left."""
    budget = int(free * fraction) - step_peak
    if budget <= 0:
        raise UserError(
            f"kv_cache_memory: {fraction:g} of the {free / GiB:.2f} GiB free leaves no room for a "
            f"KV cache after a step's {step_peak / GiB:.2f} GiB "
            f"(max_num_batched_tokens={step_tokens}); raise it or lower max_num_batched_tokens"
        )
    return budget


@torch.inference_mode()
def step_peak_bytes(model: nn.Module, num_tokens: int, num_seqs: int) -> int:
    """Run the forward of the largest step (`num_tokens` tokens, logits for `num_seqs` of them,
    then the sampler's float32 copies of those logits) and return the peak bytes it allocated
    beyond what was in use before; 0 on a device whose memory torch does not count (CPU).
    Every tensor-parallel rank must call it: the forward runs collectives."""
    device = next(model.parameters()).device
    counted = device.type == "cuda"
    if counted:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    ids = torch.zeros(1, num_tokens, dtype=torch.long, device=device)
    rows = torch.arange(num_tokens - min(num_seqs, num_tokens), num_tokens, device=device)
    logits = model(ids, logit_rows=rows)[0]
    probs = logits.float().softmax(dim=-1)  # as the sampler: float32 probabilities, their cumsum
    probs.cumsum(dim=-1)
    if not counted:
        return 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del ids, rows, logits, probs
    torch.cuda.empty_cache()
    return peak
