"""Benchmarks: `parallm bench train`, `bench infer`, `bench serve`, `bench video` and `bench rl`."""

import json
from pathlib import Path

from parallm.errors import UserError
from parallm.utils.fs import write_json_atomic


def save_report(result: dict, out: str | Path, *, show: bool = False) -> Path:
    """Write a benchmark's figures to `out`/report.json (atomically) and say where; `show`
    prints them as JSON first."""
    path = Path(out) / "report.json"
    write_json_atomic(path, result)
    if show:
        print(json.dumps(result, indent=2), flush=True)
    print(f"saved {path}", flush=True)
    return path


def parse_len_range(text: str, name: str) -> tuple[int, int]:
    """A token-length option: N, or LOW:HIGH for lengths drawn uniformly from [LOW, HIGH]."""
    try:
        lo, hi = (int(x) for x in text.split(":")) if ":" in text else (int(text), int(text))
    except ValueError:
        raise UserError(f"{name}: {text!r} is not valid; give N or LOW:HIGH") from None
    if not 1 <= lo <= hi:
        raise UserError(f"{name}: {text!r} is not valid; need 1 <= LOW <= HIGH")
    return lo, hi
