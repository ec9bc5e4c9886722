"""Reward functions for GRPO: the built-ins, the user's functions named by module path, the check
made before any rollout, and the scoring of a rollout batch.

A reward is a function `(prompt, completion, **row) -> float`: `prompt` is the data row's prompt
(a string or a message list), `completion` the generated text, `row` the row's other fields
(without `prompt` and `completion`). The job names it in `task.rewards` as a built-in or as
"package.module:function" ("package.module.function" also works), importable from the
directory the job runs in or from the Python path:

- `exact_match`: 1.0 when the completion equals the row's answer (`task.answer_field`), both
  stripped of surrounding whitespace;
- `numeric`: 1.0 when the last number in the completion (a leading minus, decimals and thousands
  commas read: "the answer is -1,234.5.") equals the answer as a float within 1e-6 relative;
- `format`: 1.0 when the stripped completion matches `task.format_pattern` whole (`.` matches
  newlines too).

A reward that raises on a sample gives NaN there: it is counted in the metrics and the rest of
the batch is scored, as TRL scores a reward that returns None. A reward returning something that
is not a number is a user bug and stops the run with one line. Torch-free, so the pre-launch
check stays light.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parallm.errors import UserError

BUILTINS = ("exact_match", "numeric", "format")
_NOT_ROW_FIELDS = ("prompt", "completion")  # passed positionally, never as row fields

# A number in a completion: a minus (not after a letter or digit: "5-3" is 5 and 3), then
# 1,234,567.89 (commas only in groups of three), 1234.5 or .5, not starting inside another number.
_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)


@dataclass(frozen=True)
class Reward:
    """One reward function as the job names it. `answer_field` is the row field a built-in
    compares with (None for user functions): a row without it is a user error."""

    name: str
    fn: Callable[..., Any]
    answer_field: str | None = None


@dataclass
class ScoreResult:
    """A rollout batch's rewards. `values` is (N, F): sample by reward function, NaN where the
    function raised; `total` (N,) the weighted sum over functions ignoring NaN (0 when all
    raised), as TRL's GRPOTrainer; `means` the per-function mean over the samples it scored
    (NaN when none); `errors` the number of samples each function raised on, `first_error` the
    first such error as one line, for the log."""

    names: list[str]
    values: np.ndarray
    total: np.ndarray
    means: dict[str, float]
    errors: dict[str, int]
    first_error: dict[str, str]


def last_number(text: str) -> float | None:
    """The last number written in `text` ("the answer is -1,234.5." -> -1234.5), None if none."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _exact_match(answer_field: str) -> Callable[..., float]:
    def exact_match(prompt: Any, completion: str, **row: Any) -> float:
        return float(completion.strip() == str(row[answer_field]).strip())

    return exact_match


def _numeric(answer_field: str) -> Callable[..., float]:
    def numeric(prompt: Any, completion: str, **row: Any) -> float:
        got = last_number(completion)
        return float(got is not None and math.isclose(got, float(row[answer_field]), rel_tol=1e-6))

    return numeric


def _format(pattern: re.Pattern) -> Callable[..., float]:
    def format_match(prompt: Any, completion: str, **row: Any) -> float:
        return float(pattern.fullmatch(completion.strip()) is not None)

    return format_match


def _builtin(name: str, format_pattern: str, answer_field: str, field: str) -> Reward:
    if name == "exact_match":
        return Reward(name, _exact_match(answer_field), answer_field)
    if name == "numeric":
        return Reward(name, _numeric(answer_field), answer_field)
    if name == "format":
        if not format_pattern:
            raise UserError(
                "task.format_pattern: empty, but the 'format' reward needs a regular expression "
                "that the whole completion must match"
            )
        try:
            pattern = re.compile(format_pattern, re.DOTALL)
        except re.error as e:
            raise UserError(
                f"task.format_pattern: {format_pattern!r} is not a valid regular expression ({e})"
            ) from None
        return Reward(name, _format(pattern))
    raise UserError(
        f"{field}: {name!r} is not a built-in reward (built-ins: "
        f"{', '.join(map(repr, BUILTINS))}; or name a function as 'package.module:function')"
    )


def _user_function(spec: str, field: str) -> Reward:
    module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not (sep and module_name and attr):
        raise UserError(f"{field}: {spec!r} is not 'package.module:function' nor a built-in")
    # As `python -m` would: a module beside where the job is run from imports (the `parallm`
    # script and each rank start from that directory too).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{field}: {spec!r}: module {module_name!r} does not import ({e})") from e
    except Exception as e:  # a module that fails while running its top level
        raise UserError(
            f"{field}: {spec!r}: module {module_name!r} does not import ({type(e).__name__}: {e})"
        ) from e
    if not hasattr(module, attr):
        raise UserError(f"{field}: {spec!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(
            f"{field}: {spec!r}: {module_name}.{attr} is {type(fn).__name__}, not a function"
        )
    return Reward(spec, fn)


def load_rewards(
    specs: Sequence[str],
    *,
    format_pattern: str = "",
    answer_field: str = "answer",
    field: str = "task.rewards",
) -> list[Reward]:
    """The reward functions the job names: built-ins by name, the user's by
    "package.module:function". A UserError, one line, for a name that cannot be used."""
    if not specs:
        raise UserError(
            f"{field}: empty; name at least one reward ({', '.join(map(repr, BUILTINS))} or "
            "'package.module:function')"
        )
    rewards: list[Reward] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise UserError(
                f"{field}: {spec!r} is not a reward name (a built-in or 'package.module:function')"
            )
        if spec in (r.name for r in rewards):
            raise UserError(f"{field}: {spec!r} is named twice (weigh it with task.reward_weights)")
        if ":" in spec or "." in spec:
            rewards.append(_user_function(spec, field))
        else:
            rewards.append(_builtin(spec, format_pattern, answer_field, field))
    return rewards


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    kind = type(value).__name__
    if shape is not None and len(shape) > 0:
        return f"{kind} of shape {tuple(shape)}"
    text = repr(value)
    return f"{kind} ({text if len(text) <= 60 else text[:57] + '...'})"


def as_number(value: Any, name: str, field: str = "task.rewards") -> float:
    """A reward's return value as a float: an int or float (numpy's too) or a 0-d array or tensor.
    A UserError for anything else (None, bool, str, several elements, NaN, infinity)."""
    number = value
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        number = value.item()  # numpy scalars, 0-d arrays and tensors
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        if value is None:
            raise UserError(f"{field}: {name!r} returned None, not a number")
        raise UserError(f"{field}: {name!r} returned {_describe(value)}, not a number")
    number = float(number)
    if not math.isfinite(number):
        raise UserError(f"{field}: {name!r} returned {_describe(value)}, not a finite number")
    return number


def _row_fields(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in _NOT_ROW_FIELDS}


def _check_answer(reward: Reward, row: dict, where: str) -> None:
    key = reward.answer_field
    if key is None:
        return
    if key not in row:
        fields = ", ".join(map(repr, row)) or "none"
        raise UserError(
            f"task.answer_field: {key!r} is not a field of {where} (its fields: {fields}); the "
            f"{reward.name!r} reward compares the completion with it"
        )
    if reward.name == "numeric":
        try:
            float(row[key])
        except (TypeError, ValueError):
            raise UserError(
                f"task.answer_field: {where}'s {key!r} is {_describe(row[key])}, not a number "
                "(the 'numeric' reward compares numbers)"
            ) from None


def check_rewards(
    rewards: Sequence[Reward], row: dict, prompt: Any, *, where: str = "the first data row"
) -> None:
    """Before any rollout: each reward is called on the data row with an empty completion. A
    UserError when a built-in's answer field is missing, when a function cannot take the row's
    fields, or returns something that is not a number. A function that raises here is let
    through: the empty completion may be input it never meets."""
    kwargs = _row_fields(row)
    for reward in rewards:
        _check_answer(reward, row, where)
        try:
            signature = inspect.signature(reward.fn)
        except (TypeError, ValueError):  # no signature to read (a C function): call it anyway
            signature = None
        if signature is not None:
            try:
                signature.bind(prompt, "", **kwargs)
            except TypeError as e:
                fields = ", ".join(map(repr, kwargs)) or "none"
                raise UserError(
                    f"task.rewards: {reward.name!r} cannot be called as (prompt, completion, "
                    f"**row) with {where}'s fields ({fields}): {e}"
                ) from None
        try:
            value = reward.fn(prompt, "", **kwargs)
        except Exception:
            continue
        as_number(value, reward.name)


def _one_line(error: Exception) -> str:
    """`ValueError: bad input (rewards.py:12 in f)`: the error and where it was raised."""
    message = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        last = frames[-1]
        line += f" ({last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"
    return line if len(line) <= 300 else line[:297] + "..."


def score(
    rewards: Sequence[Reward],
    weights: Sequence[float] | None,
    prompts: Sequence[Any],
    completions: Sequence[str],
    rows: Sequence[dict],
) -> ScoreResult:
    """Every reward on every sample (sample i: `prompts[i]`, `completions[i]`, `rows[i]`) and
    their weighted total (weights None: all 1), as TRL's GRPOTrainer sums them."""
    assert len(prompts) == len(completions) == len(rows), "one prompt and row per completion"
    weights = [1.0] * len(rewards) if weights is None else list(weights)
    assert len(weights) == len(rewards), "task.reward_weights is checked against task.rewards"
    names = [r.name for r in rewards]
    values = np.full((len(completions), len(rewards)), np.nan)
    errors = dict.fromkeys(names, 0)
    first_error: dict[str, str] = {}
    for i, (prompt, completion, row) in enumerate(zip(prompts, completions, rows, strict=True)):
        kwargs = _row_fields(row)
        for j, reward in enumerate(rewards):
            _check_answer(reward, row, "a data row")
            try:
                value = reward.fn(prompt, completion, **kwargs)
            except Exception as e:
                errors[reward.name] += 1
                first_error.setdefault(reward.name, _one_line(e))
                continue
            values[i, j] = as_number(value, reward.name)
    total = np.nansum(values * np.asarray(weights, dtype=np.float64), axis=1)
    scored = ~np.isnan(values)
    means = {
        name: float(values[scored[:, j], j].mean()) if scored[:, j].any() else math.nan
        for j, name in enumerate(names)
    }
    return ScoreResult(names, values, total, means, errors, first_error)
