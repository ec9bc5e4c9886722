"""Training checkpoints in `torch.distributed.checkpoint` (DCP) format, written atomically.

Layout of `<output>/checkpoints/step_00000010/`:
  .metadata, __*.distcp   model and optimizer tensors (DCP; each rank writes its own shards)
  trainer_state.json      step, schedule, data position, config — written last
  rng.pt                  RNG states of the process that saved

Every rank writes into the same temporary directory `.step_XXXXXXXX.tmp`; after all ranks are
done, rank 0 renames it to `step_XXXXXXXX`. A directory with that name is therefore complete.
`get_model_state_dict` / `get_optimizer_state_dict` (per pipeline part, flattened names) make the
same code serve plain, FSDP and DTensor models, and
DCP reshards on load, so a checkpoint resumes on any layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from parallm.errors import UserError
from parallm.train.optim import Optimizers

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


@contextmanager
def _single_process_quiet():
    """DCP warns when used without a process group; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model_parts: list[nn.Module],
    optimizer: Optimizers,
    trainer_state: dict[str, Any],
    *,
    keep: int = 0,
) -> Path:
    """Save model, optimizer and `trainer_state` (JSON) for `step`; keep the newest `keep` (0: all)."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = _state(model_parts, optimizer)
    with _single_process_quiet():
        dcp.save(_merged(state), checkpoint_id=str(tmp))
    if _is_rank0():
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state(model_parts: list[nn.Module], optimizers: Optimizers) -> list[tuple[dict, dict]]:
    """(model, optimizer) state dicts per part, keyed by parameter names (flattened optimizer
    keys such as `state.layers.3.mlp.up_proj.weight.exp_avg`), so any layout reads them."""
    return [
        (
            get_model_state_dict(part, options=_OPTIONS),
            get_optimizer_state_dict(part, opt, options=_OPTIONS),
        )
        for part, opt in zip(model_parts, optimizers.optimizers, strict=True)
    ]


def _merged(state: list[tuple[dict, dict]]) -> dict[str, dict]:
    model, optim = {}, {}
    for model_sd, optim_sd in state:
        model.update(model_sd)
        optim.update(optim_sd)
    return {"model": model, "optim": optim}


def load_checkpoint(
    path: str | os.PathLike, model_parts: list[nn.Module], optimizer: Optimizers
) -> dict[str, Any]:
    """Restore model and optimizer in place from `path`; return the saved trainer state."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise UserError(f"{path}: not a complete parallm checkpoint (no {STATE_FILE})")
    state = _state(model_parts, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(_merged(state), checkpoint_id=str(path))  # fills the tensors in place
    except Exception as e:  # DCP wraps shape / key mismatches in its own exception types
        raise UserError(f"{path}: checkpoint does not fit this model ({_first_line(e)})") from None
    for part, opt, (model_sd, optim_sd) in zip(
        model_parts, optimizer.optimizers, state, strict=True
    ):
        set_model_state_dict(part, model_sd, options=_OPTIONS)
        set_optimizer_state_dict(part, opt, optim_sd, options=_OPTIONS)
    rng_file = path / "rng.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads(state_file.read_text())


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
