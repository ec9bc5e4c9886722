"""`EngineConfig`: how the serving engine sizes its KV cache and batches."""

from __future__ import annotations

from dataclasses import dataclass

from parallm.errors import UserError


@dataclass(kw_only=True)
class EngineConfig:
    """How the engine sizes its cache and batches. `kv_cache_memory`: bytes for the KV cache
    (an int), or on a GPU a fraction (0, 1] of the memory free after loading the model, less
    the measured peak of the largest step (default on a GPU: 0.8); with tensor parallelism it
    is per rank, each rank caching its share of the KV heads.
    `tensor_parallel_size`: processes (GPUs: cuda:0..N-1) the model is sharded over.
    `enable_lora`: serve LoRA adapters next to the base, `max_loras` of them loaded at a time
    (their slots' memory is taken before the KV cache's), each of rank <= `max_lora_rank`."""

    max_model_len: int | None = None  # default: the model's context
    kv_cache_memory: int | float | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str | None = None
    device: str | None = None
    tensor_parallel_size: int = 1
    # portable (padded SDPA, any device) | flex (flex attention over the pool) | auto: flex on
    # CUDA, portable on CPU (where flex pays a compile per new step shape)
    attention_backend: str = "auto"
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    logprobs_mode: str = "raw"  # raw | processed
    # On a CPU (float32, oneDNN built in): linear layers run on packed copies of their weights
    # during steps (`packed_linear.py`; faster, a second copy of those weights in memory).
    packed_linears: bool = True
    # On a CPU (float32, a C compiler at hand): the portable backend's decode rows read the KV
    # cache in place through a compiled kernel (`cpu_decode.py`) instead of gather + SDPA.
    decode_kernel: bool = True

    def __post_init__(self) -> None:
        from parallm.inference.flex_attention import BACKENDS
        from parallm.inference.sampling import LOGPROBS_MODES

        if self.attention_backend not in BACKENDS:
            raise UserError(
                f"attention_backend: {self.attention_backend!r} is not valid; "
                f"valid: {', '.join(BACKENDS)}"
            )
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise UserError(
                f"logprobs_mode: {self.logprobs_mode!r} is not valid; "
                f"valid: {', '.join(LOGPROBS_MODES)}"
            )
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "tensor_parallel_size",
            "max_loras",
            "max_lora_rank",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: {getattr(self, name)} is not valid; must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise UserError(f"kv_cache_memory: {self.kv_cache_memory} is not valid; must be > 0")
