"""Hugging Face model directories: `config.json`, single or sharded `*.safetensors`, tokenizer.

`load_pretrained` builds the model on the `meta` device and fills it straight from the files with
`load_state_dict(..., assign=True)`, so a model is never materialised twice. `save_pretrained`
writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads, atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parallm.errors import UserError
from parallm.models.build import canonical_name, tie_weights, value_source
from parallm.models.lora import is_lora_param
from parallm.models.registry import FamilySpec, family_of_args, family_of_config
from parallm.utils.fs import atomic_dir, model_dir, read_json
from parallm.utils.progress import load_progress

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_args(path: str | os.PathLike) -> Any:
    """The model arguments of a model directory's `config.json` (its family's args type)."""
    cfg_path = model_dir(path) / "config.json"
    cfg = read_json(cfg_path)
    return family_of_config(cfg, str(cfg_path)).hf.args_from_hf(cfg, str(cfg_path))


def read_family(path: str | os.PathLike) -> tuple[FamilySpec, Any]:
    """The family and model arguments of a model directory."""
    args = read_args(path)
    return family_of_args(args), args


def _weight_files(d: Path) -> dict[str, Path]:
    """HF checkpoint key -> the safetensors file holding it."""
    if (d / SAFE_INDEX).exists():
        weight_map = read_json(d / SAFE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{d / SAFE_INDEX}: missing 'weight_map' object")
        files = {k: d / v for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise UserError(f"{d / SAFE_INDEX} lists {f.name}, which is not in {d}")
        return files
    if (d / SAFE_SINGLE).exists():
        with _open(d / SAFE_SINGLE, "cpu") as f:
            return {k: d / SAFE_SINGLE for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    found = sorted(p.name for p in d.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} without {SAFE_INDEX})" if found else ""
    raise UserError(f"{d}: no {SAFE_SINGLE} or {SAFE_INDEX}{hint}")


class _open:
    """`safe_open` whose failures (truncated, corrupt, unreadable) become one-line UserErrors."""

    def __init__(self, path: Path, device: str) -> None:
        self.path, self.device = path, device

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.path), framework="pt", device=self.device)
            return self.handle.__enter__()
        except Exception as e:  # safetensors raises its own SafetensorError or OSError
            raise UserError(
                f"{self.path}: not a readable safetensors file ({e}); it may be truncated or corrupt"
            ) from None

    def __exit__(self, *exc: Any) -> None:
        self.handle.__exit__(*exc)


def _expected_shapes(spec: FamilySpec, args: Any) -> dict[str, tuple[int, ...]]:
    """HF key -> shape for every parameter the checkpoint must provide (tied ones once)."""
    tied = spec.tied(args)
    return {
        spec.hf.hf_key(n): tuple(p.shape)
        for n, p in spec.build(args).named_parameters()
        if n not in tied
    }


def _check_complete(d: Path, expected: dict[str, tuple[int, ...]], files: dict[str, Path]) -> None:
    missing = sorted(set(expected) - set(files))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"{d}: weights missing for {', '.join(missing[:3])}{more}; "
            "the checkpoint does not match config.json"
        )


def _get_tensor(handle, f: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor from an open safetensors file, after checking its shape against the config."""
    got = tuple(handle.get_slice(key).get_shape())
    if got != shape:
        raise UserError(
            f"{f.name}: {key} has shape {list(got)} but config.json implies "
            f"{list(shape)}; the config and the weights disagree"
        )
    try:
        return handle.get_tensor(key)
    except Exception as e:
        raise UserError(f"{f}: cannot read {key} ({e}); the file may be truncated") from None


def _read_state_dict(
    d: Path, spec: FamilySpec, args: Any, dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(spec, args)
    files = _weight_files(d)
    _check_complete(d, expected, files)
    tied_keys = {spec.hf.hf_key(n) for n in spec.tied(args)}
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        if spec.hf.parallm_key(key) is not None:
            by_file.setdefault(f, []).append(key)
    state: dict[str, torch.Tensor] = {}
    total = sum(map(len, by_file.values()))
    with load_progress(f"loading {d.name}", total, "tensors") as progress:
        for f, keys in by_file.items():
            with _open(f, device) as handle:
                for key in keys:
                    progress.update(1)
                    if key not in expected:
                        if key in tied_keys:  # a tied checkpoint that also stored the head
                            continue
                        raise UserError(f"{f.name}: unexpected tensor {key!r} for this config.json")
                    tensor = _get_tensor(handle, f, key, expected[key])
                    state[spec.hf.parallm_key(key)] = tensor.to(dtype)
    return state


def load_weights_into(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    fill: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """Fill the materialised `model` (a whole model, a pipeline stage, or a sharded one) from a
    HF directory one tensor at a time: `fill(param, full_float32_value)` keeps what it needs."""
    d = model_dir(path)
    files = _weight_files(d)
    spec = family_of_args(model.args)
    expected = _expected_shapes(spec, model.args)
    _check_complete(d, expected, files)
    # Adapters are not part of the base checkpoint.
    params = [(n, p) for n, p in model.named_parameters() if not is_lora_param(n)]
    with load_progress(f"loading {d.name}", len(params), "tensors") as progress:
        for name, param in params:
            key = spec.hf.hf_key(value_source(model, name))
            with _open(files[key], "cpu") as handle:
                fill(param, _get_tensor(handle, files[key], key, expected[key]).float())
            progress.update(1)


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Load a HF directory of any registered family (Llama / Mistral / Qwen2 / Qwen3, ...)
    without `transformers`.

    dtype defaults to the checkpoint's `torch_dtype` (float32 when absent); device to CPU.
    `model(input_ids)` returns logits (B, T, vocab).
    """
    d = model_dir(path)
    spec, args = read_family(d)
    dtype = resolve_dtype(dtype if dtype is not None else checkpoint_dtype(d))
    device = str(device) if device is not None else "cpu"
    model = spec.build(args)
    state = _read_state_dict(d, spec, args, dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    tie_weights(model)  # assign=True replaced the shared tensor
    model.init_buffers(device)
    return model.eval()


def checkpoint_dtype(path: str | os.PathLike) -> str | None:
    """The `torch_dtype` (or `dtype`) a model directory's `config.json` names, if any."""
    cfg = read_json(model_dir(path) / "config.json")
    return cfg.get("torch_dtype", cfg.get("dtype"))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def save_pretrained(
    model: torch.nn.Module,
    path: str | os.PathLike,
    tokenizer: Any | None = None,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` (and `tokenizer`, if given) as a HF directory, atomically; returns the path.

    Shards above `max_shard_bytes` go to `model-0000i-of-0000n.safetensors` with an index.
    """
    state = {canonical_name(n): t for n, t in model.state_dict().items()}
    return save_state_dict(state, model.args, path, tokenizer, max_shard_bytes=max_shard_bytes)


def save_state_dict(
    state: dict[str, torch.Tensor],
    args: Any,
    path: str | os.PathLike,
    tokenizer: Any | None = None,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write full parameters keyed by parallm names as a HF directory, atomically."""
    spec = family_of_args(args)
    tied = spec.tied(args)
    tensors = {
        spec.hf.hf_key(n): t.detach().to("cpu").contiguous()
        for n, t in state.items()
        if n not in tied
    }
    dtype = next(iter(tensors.values())).dtype
    dtype_name = str(dtype).removeprefix("torch.")
    shards = _split_shards(tensors, max_shard_bytes)
    with atomic_dir(path) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        config = spec.hf.args_to_hf(args, dtype_name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards
