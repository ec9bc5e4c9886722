"""Offline batch inference: `LLM(model=DIR).generate(prompts, SamplingParams(...))`, through
LoRA adapters with `LLM(DIR, enable_lora=True)` and `generate(..., lora=...)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import torch.distributed as dist

from parallm.errors import UserError
from parallm.inference.adapters import LoadedAdapter
from parallm.inference.engine import EngineConfig, LLMEngine, RequestOutput
from parallm.inference.lora import LoRARequest
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

    `enable_lora=True` (with `max_loras`, `max_lora_rank`) serves LoRA adapters in peft's
    format next to the base: `add_lora(name, dir)`, then `generate(..., lora=name)`; `lora`
    may also be an adapter directory or a `LoRARequest(name, id, dir)` (loaded on first use),
    or a list with one of those (or None) per prompt.
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

    def _driver(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("only rank 0 generates; this rank served it until it closed")
        return self.engine

    def add_lora(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load the peft adapter directory `path` under `name`."""
        return self._driver().add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self._driver().remove_lora(name)

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora: Lora | Seq[Lora] = None,
    ) -> list[RequestOutput]:
        """Run every prompt (a string or a list of token ids) to completion; outputs in order.
        A bad prompt gets an output with `error` set; the others are unaffected. `lora`: the
        adapter of every prompt, or one per prompt (None: the base model)."""
        engine = self._driver()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(
                f"sampling_params: {len(params)} given for {len(prompts)} prompts; give one or one each"
            )
        loras = list(lora) if isinstance(lora, list | tuple) else [lora] * len(prompts)
        if len(loras) != len(prompts):
            raise UserError(
                f"lora: {len(loras)} given for {len(prompts)} prompts; give one or one each"
            )
        names = [self._lora_name(x) for x in loras]
        ids = [f"req-{i}" for i in range(len(prompts))]
        for rid, prompt, p, name in zip(ids, prompts, params, names, strict=True):
            engine.add_request(rid, prompt, p, lora=name)
        done = engine.run_to_completion()
        return [done[rid] for rid in ids]

    def _lora_name(self, lora: Lora) -> str | None:
        """The loaded adapter's name for `lora`, loading a directory or a LoRARequest first."""
        if lora is None:
            return None
        loaded = self._driver().adapters.by_name
        if isinstance(lora, LoRARequest):
            name, path = lora.lora_name, lora.lora_path
            if name in loaded and loaded[name].path != str(Path(path).resolve()):
                raise UserError(
                    f"lora: {name!r} is loaded from {loaded[name].path}, not {path}; "
                    "remove_lora it first or use another name"
                )
        elif isinstance(lora, str | Path):
            name = path = str(lora)
            if name not in loaded and not Path(path).is_dir():
                shown = ", ".join(loaded) or "none"
                raise UserError(
                    f"lora: {name!r} is neither a loaded adapter (loaded: {shown}) nor an "
                    "adapter directory"
                )
        else:
            raise UserError(
                f"lora: {lora!r} is not valid; give an adapter's name, its directory or a "
                "LoRARequest"
            )
        if name not in loaded:
            self.add_lora(name, path)
        return name


Lora = str | Path | LoRARequest | None
