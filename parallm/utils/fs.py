"""Atomic writes: nothing half-written is ever left where a finished file or directory belongs."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from parallm.errors import UserError


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed.

    A reader sees either the old complete directory or the new complete one, never a partial one.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON to a temporary name in the same directory, then rename it into place."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_lines_atomic(path: str | os.PathLike, lines: list[str]) -> None:
    """Replace a text file with `lines` through a temporary name."""
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary name in the same directory (created if missing), then rename
    it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure_atomic(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG through a temporary name, then close it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
        tmp.unlink(missing_ok=True)


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of `path`; a missing or unreadable file is a UserError naming it."""
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {str(path)!r} cannot be read ({e})") from None


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; a UserError names the file if it is missing or malformed."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def model_dir(path: str | os.PathLike) -> Path:
    """`path` as a readable directory (a model's); a UserError naming it otherwise. Torch-free,
    so the commands check it before loading anything."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"model directory {str(d)!r} does not exist or is not a directory")
    if not os.access(d, os.R_OK | os.X_OK):
        raise UserError(f"model directory {str(d)!r} is not readable")
    return d


STDLIB = "{stdlib}"


def find_files(
    paths: list[str], extensions: list[str], *, exclude: list[str] = (), max_files: int = 0
) -> list[Path]:
    """Files under `paths` with one of `extensions`, sorted; directory names in `exclude` are
    skipped; `max_files` > 0 keeps an evenly spread subset of that many."""
    if not paths:
        raise UserError('data.paths: no data given; list files or directories, e.g. ["data/"]')
    skip = set(exclude)
    found: list[Path] = []
    for raw in paths:
        p = Path(raw.replace(STDLIB, sysconfig.get_paths()["stdlib"])).expanduser()
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
                found += [Path(root) / f for f in files if Path(f).suffix in extensions]
        else:
            raise UserError(f"data.paths: {raw!r} is neither a file nor a directory")
    found = sorted(set(found))
    if not found:
        raise UserError(
            f"data.paths: no files with extensions {', '.join(extensions)} under {', '.join(paths)}"
        )
    if 0 < max_files < len(found):
        import numpy as np

        idx = np.linspace(0, len(found) - 1, max_files).round().astype(int)
        found = [found[i] for i in sorted(set(idx.tolist()))]
    return found
