"""Benchmarks: `parallm bench train`, `bench infer` and `bench serve`."""

from parallm.errors import UserError


def parse_len_range(text: str, name: str) -> tuple[int, int]:
    """A token-length option: N, or LOW:HIGH for lengths drawn uniformly from [LOW, HIGH]."""
    try:
        lo, hi = (int(x) for x in text.split(":")) if ":" in text else (int(text), int(text))
    except ValueError:
        raise UserError(f"{name}: {text!r} is not valid; give N or LOW:HIGH") from None
    if not 1 <= lo <= hi:
        raise UserError(f"{name}: {text!r} is not valid; need 1 <= LOW <= HIGH")
    return lo, hi
