"""Offline batch inference: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import torch.distributed as dist

from parallm.errors import UserError
from parallm.inference.engine import EngineConfig, LLMEngine, RequestOutput
from parallm.inference.sampling import SamplingParams
from parallm.inference.worker import serve_rank


class LLM:
    """A model directory behind the continuous-batching engine.

    `kv_cache_memory` is the KV cache's size in bytes (or, on a GPU, a fraction of the memory
    free after loading); other keyword arguments are `EngineConfig` fields.

    `tensor_parallel_size` N > 1 shards the model over N processes: this one and N - 1 it
    spawns (so a script must guard its entry point with `if __name__ == "__main__":`), or the
    N of a torchrun launch, where `LLM(...)` on ranks > 0 serves rank 0 until rank 0 closes it.
    Close the LLM (`close()`, or use it as a context manager) to stop the workers.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        kv_cache_memory: int | float | None = None,
        **engine_kwargs,
    ) -> None:
        config = EngineConfig(
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            kv_cache_memory=kv_cache_memory,
            **engine_kwargs,
        )
        self.engine: LLMEngine | None = None
        self.tokenizer = None
        if tensor_parallel_size > 1 and dist.is_initialized() and dist.get_rank() > 0:
            serve_rank(model, config)  # a torchrun rank > 0: rank 0's worker until it closes
            return
        self.engine = LLMEngine(model, config)
        self.tokenizer = self.engine.tokenizer

    @property
    def is_driver(self) -> bool:
        """True where `generate` runs: rank 0 (always, without tensor parallelism)."""
        return self.engine is not None

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the LLM cannot generate after that)."""
        if self.engine is not None:
            self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt (a string or a list of token ids) to completion; outputs in order.
        A bad prompt gets an output with `error` set; the others are unaffected."""
        if self.engine is None:
            raise RuntimeError("only rank 0 generates; this rank served it until it closed")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(
                f"sampling_params: {len(params)} given for {len(prompts)} prompts; give one or one each"
            )
        ids = [f"req-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self.engine.add_request(rid, prompt, p)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]
