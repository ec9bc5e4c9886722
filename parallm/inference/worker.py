"""Building a rank's model runner, and the loop of the tensor-parallel ranks above 0.

The driver (`LLMEngine`, rank 0) and the workers both `build_runner`: load the model (whole, or
this rank's shard by the family's parallel plan), then `runner_for` it: give it LoRA slots when
adapters are enabled, and size the KV cache alike. A worker then
`follow`s: it runs each step rank 0 broadcasts until rank 0 stops the group. Spawned workers
enter through `run_worker`; the ranks > 0 of a torchrun launch through `serve_rank`.

An engine over a model already in memory (`LLMEngine.from_model`, weights shared with a trainer)
skips the load: `check_shared_model`, then `runner_for` the model as it is. Such a model may be
in training mode; `eval_mode` runs a forward without dropout and gives the trainer its modes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from parallm.distributed.parallel_dims import ParallelDims
from parallm.errors import UserError
from parallm.inference.config import EngineConfig
from parallm.inference.kv_budget import kv_cache_blocks
from parallm.inference.lora import LoraBank
from parallm.inference.model_runner import ModelRunner
from parallm.inference.tp import TPGroup
from parallm.inference.tp_model import load_sharded
from parallm.models.hf import load_pretrained, read_family, resolve_dtype
from parallm.models.registry import ModelFacts, family_of_model


def max_model_len_for(facts: ModelFacts, config: EngineConfig) -> int:
    """The context the engine serves: `config.max_model_len`, at most the model's."""
    context = facts.max_seq_len
    length = config.max_model_len or context
    if length > context:
        raise UserError(f"max_model_len: {length} exceeds the model's context of {context} tokens")
    return length


def check_tensor_parallel(args, config: EngineConfig) -> str:
    """Check `tensor_parallel_size` against the model (its args) and the machine, before any
    process starts; the device type."""
    size = config.tensor_parallel_size
    try:  # seq_len: a step's token count varies and is never split over the ranks in serving
        ParallelDims(tp=size, dp_shard=1, world_size=size).validate_model(
            args, seq_len=size, cp_mode="ring", n_stages=1
        )
    except UserError as e:  # "parallel.tp: 3 must divide ..." names the training field
        raise UserError(f"tensor_parallel_size: {str(e).split(': ', 1)[1]}") from None
    device_type = torch.device(config.device or "cpu").type
    if device_type == "cuda" and size > torch.cuda.device_count():
        raise UserError(
            f"tensor_parallel_size: {size} needs {size} GPUs; {torch.cuda.device_count()} visible"
        )
    return device_type


def build_runner(
    model_dir: str | Path, config: EngineConfig, max_model_len: int, tp: TPGroup | None
) -> ModelRunner:
    """Load this rank's model (whole, or its tensor-parallel shard) and size its KV cache."""
    if tp is None:
        model = load_pretrained(model_dir, dtype=config.dtype, device=config.device).eval()
    else:
        model = load_sharded(model_dir, tp, config.dtype)
    return runner_for(model, config, max_model_len, tp)


def runner_for(
    model: nn.Module, config: EngineConfig, max_model_len: int, tp: TPGroup | None
) -> ModelRunner:
    """The runner of this rank's `model` as it is (loaded, or shared with a trainer): its LoRA
    slots when adapters are enabled, and a KV cache sized by `config`."""
    lora = None
    if config.enable_lora:  # before the KV cache is sized: the slots take memory too
        lora = LoraBank.attach(
            model,
            max_loras=config.max_loras,
            max_rank=config.max_lora_rank,
            tp_rank=tp.rank if tp else 0,
            tp_size=tp.size if tp else 1,
        )
    with lora.profile() if lora is not None else nullcontext(), eval_mode(model):
        budget, blocks = kv_cache_blocks(model, config, max_model_len, tp.size if tp else 1)
    if tp is not None:  # free GPU memory may differ per rank; the block tables are shared
        blocks = tp.agree_min(blocks)
    if blocks < 1:
        raise UserError(
            f"kv_cache_memory: {budget} bytes hold no KV block of {config.block_size} tokens"
        )
    return ModelRunner(
        model,
        num_blocks=blocks,
        block_size=config.block_size,
        tp=tp,
        attention_backend=config.attention_backend,
        lora=lora,
        packed_linears=config.packed_linears,
        decode_kernel=config.decode_kernel,
    )


def check_shared_model(model: nn.Module, config: EngineConfig) -> ModelFacts:
    """Check that an engine can run on `model` in place (weights shared, nothing loaded or
    copied); its facts. A UserError names the `config` field that asks for what it cannot do."""
    if config.tensor_parallel_size != 1:
        raise UserError(
            f"tensor_parallel_size: {config.tensor_parallel_size} is not valid for an engine "
            "over a model in memory (its weights are used as they are, unsharded); must be 1"
        )
    if config.enable_lora:
        raise UserError(
            "enable_lora: an engine over a model in memory serves that model as it is (with "
            "its own LoRA modules, if any); must be false"
        )
    spec = family_of_model(model)
    if spec.is_video:
        raise UserError(f"model: a {spec.model_types[0]} video model is not a language model")
    param = next(model.parameters())
    if config.dtype is not None and resolve_dtype(config.dtype) != param.dtype:
        raise UserError(
            f"dtype: {config.dtype!r} is not the model's {str(param.dtype).removeprefix('torch.')}"
            "; an engine over a model in memory runs it in its own dtype (leave dtype unset)"
        )
    want = torch.device(config.device) if config.device is not None else param.device
    if want.type != param.device.type or want.index not in (None, param.device.index):
        raise UserError(
            f"device: {config.device!r} is not the model's {param.device}; an engine over a "
            "model in memory runs it where it is (leave device unset)"
        )
    return spec.facts(model.args)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run `model` in eval mode (no dropout) inside, and give every module that was training
    its mode back after: a trainer sharing the model keeps the modes it set. A model in eval
    mode is taken as it is (`model.eval()` sets every module), so the engine's own model, run
    every step, skips the walk over its modules."""
    training = [m for m in model.modules() if m.training] if model.training else []
    if training:
        model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True  # not m.train(): that would set its children too


def run_worker(
    tp: TPGroup, model_dir: str | Path, config: EngineConfig, max_model_len: int
) -> None:
    """A tensor-parallel worker: load the shard, then run rank 0's steps until it stops."""
    build_runner(model_dir, config, max_model_len, tp).follow()


def serve_rank(model_dir: str | Path, config: EngineConfig) -> None:
    """On a rank > 0 of an initialized process group (torchrun): join rank 0's engine and run
    its steps until rank 0 closes it."""
    spec, args = read_family(model_dir)
    device_type = check_tensor_parallel(args, config)
    max_model_len = max_model_len_for(spec.facts(args), config)
    tp = TPGroup.start(config.tensor_parallel_size, device_type, run_worker, ())
    assert tp.rank != 0, "rank 0 is the driver: build an LLMEngine there"
    try:
        run_worker(tp, model_dir, config, max_model_len)
    finally:
        tp.close()
