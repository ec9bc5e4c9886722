"""Checkpoint directories by name, without torch: what the launcher reads before any rank
starts (`latest_checkpoint` for `--resume always`) and what it clears (`remove_stale`,
`remove_all`). `parallm.train.checkpoint` writes and reads what is inside them."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STALE_DIR = re.compile(r"^\.step_(\d{8})\.tmp$")
STATE_FILE = "trainer_state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def tmp_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


# -- finding ---------------------------------------------------------------------------------


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first (no file is read)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under `root` (not verified), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_stale(root: str | os.PathLike) -> list[Path]:
    """Delete the `.step_*.tmp` directories a kill during a save left behind; return them.
    Call it only when no save is running (at start, before any rank saves)."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if _STALE_DIR.match(p.name))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def remove_all(root: str | os.PathLike) -> list[Path]:
    """Delete every checkpoint directory under `root` (complete, temporary or set aside as
    corrupt) for a run that starts afresh; return the complete ones removed."""
    root = Path(root)
    complete = list_checkpoints(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and re.match(r"^\.?step_\d{8}(\.tmp|\.corrupt)?$", p.name):
                shutil.rmtree(p, ignore_errors=True)
    return complete
