"""GRPO rewards (`parallm.train.rewards`): the built-ins on the cases they could get wrong, every
error line a job can cause when naming or probing its rewards, and the weighted scoring of a
batch (NaN where a function raised) against the same sums computed by hand with numpy."""

from __future__ import annotations

import math
import re
import sys
import textwrap

import numpy as np
import pytest
import torch

from parallm.errors import UserError
from parallm.train.rewards import BUILTINS, Reward, check_rewards, load_rewards, score

USER_MODULE = """
import numpy as np

def length(prompt, completion, **row):
    return len(completion)

def picky(prompt, completion, **row):
    if "bad" in completion:
        raise ValueError(f"cannot score {completion!r}")
    return np.float32(0.5) if completion.startswith("a") else 0

def fails(prompt, completion, **row):
    raise RuntimeError("always")

def says(prompt, completion, **row):
    return "abc"

def nothing(prompt, completion, **row):
    return None

def flag(prompt, completion, **row):
    return True

def nan(prompt, completion, **row):
    return float("nan")

def vector(prompt, completion, **row):
    return np.zeros(2)

def needs_target(prompt, completion, target):
    return 1.0

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A module of reward functions in tmp_path, importable for this test only."""
    name = "user_rewards_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def one(name: str, completion: str, **row) -> float:
    (reward,) = load_rewards([name], format_pattern=row.pop("pattern", ""))
    return reward.fn("the prompt", completion, **row)


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("42", "42", 1.0),
        ("  42\n", " 42 ", 1.0),
        ("42", 42, 1.0),  # a non-string answer compares as its text
        ("New York", "New York", 1.0),
        ("New  York", "New York", 0.0),  # inner spaces count
        ("The answer is 42", "42", 0.0),
        ("42.0", 42, 0.0),
    ],
)
def test_exact_match(completion, answer, expected):
    assert one("exact_match", completion, answer=answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("the answer is 12.", "12", 1.0),
        ("12", 12, 1.0),
        ("-3", -3, 1.0),
        ("x = -3", "3", 0.0),
        ("5-3 is 2", 2, 1.0),
        ("5-3", 3, 1.0),  # a minus after a digit is subtraction, not a sign
        ("3.50", "3.5", 1.0),
        (".5", 0.5, 1.0),
        ("1,234", 1234, 1.0),
        ("-1,234,567.25 apples", "-1234567.25", 1.0),
        ("first 12, then 13", 12, 0.0),  # the last number counts
        ("0.30000000001", 0.3, 1.0),  # within 1e-6 relative
        ("0.3001", 0.3, 0.0),
        ("no number here", 0, 0.0),
        ("", 0, 0.0),
    ],
)
def test_numeric(completion, answer, expected):
    assert one("numeric", completion, answer=answer) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a\nb</think> <answer>7</answer>", 1.0),  # `.` matches newlines
        ("\n<think></think><answer>7</answer>\n", 1.0),  # surrounding whitespace stripped
        ("<think>a</think> <answer>7</answer> and more", 0.0),  # the whole completion
        ("<answer>7</answer>", 0.0),
    ],
)
def test_format(completion, expected):
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    assert one("format", completion, pattern=pattern) == expected


def test_answer_field_and_names(user_module):
    specs = ["exact_match", f"{user_module}:length", f"{user_module}.picky"]
    rewards = load_rewards(specs, answer_field="label")
    assert [r.name for r in rewards] == specs
    assert rewards[0].answer_field == "label" and rewards[1].answer_field is None
    assert rewards[0].fn("p", " yes ", label="yes") == 1.0
    assert rewards[1].fn("p", "four") == 4


@pytest.mark.parametrize(
    ("specs", "kwargs", "line"),
    [
        (
            ["no_such_reward_module:f"],
            {},
            "task.rewards: 'no_such_reward_module:f': module 'no_such_reward_module' does not "
            "import (No module named 'no_such_reward_module')",
        ),
        (
            ["{mod}:missing"],
            {},
            "task.rewards: '{mod}:missing': module '{mod}' has no attribute 'missing'",
        ),
        (
            ["{mod}.NOT_A_FUNCTION"],
            {},
            "task.rewards: '{mod}.NOT_A_FUNCTION': {mod}.NOT_A_FUNCTION is int, not a function",
        ),
        (
            ["exact"],
            {},
            "task.rewards: 'exact' is not a built-in reward (built-ins: 'exact_match', "
            "'numeric', 'format'; or name a function as 'package.module:function')",
        ),
        (["{mod}:"], {}, "task.rewards: '{mod}:' is not 'package.module:function' nor a built-in"),
        (
            ["numeric", "numeric"],
            {},
            "task.rewards: 'numeric' is named twice (weigh it with task.reward_weights)",
        ),
        (
            [],
            {},
            "task.rewards: empty; name at least one reward ('exact_match', 'numeric', 'format' "
            "or 'package.module:function')",
        ),
        (
            ["format"],
            {},
            "task.format_pattern: empty, but the 'format' reward needs a regular expression that "
            "the whole completion must match",
        ),
        (
            ["format"],
            {"format_pattern": "(a"},
            "task.format_pattern: '(a' is not a valid regular expression (missing ), "
            "unterminated subpattern at position 0)",
        ),
    ],
)
def test_load_errors(user_module, specs, kwargs, line):
    with pytest.raises(UserError) as e:
        load_rewards([s.format(mod=user_module) for s in specs], **kwargs)
    assert str(e.value) == line.format(mod=user_module)
    assert e.value.param == line.split(":")[0]


def test_module_that_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raising_rewards.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as e:
        load_rewards(["broken_rewards:f"])
    assert str(e.value) == (
        "task.rewards: 'broken_rewards:f': module 'broken_rewards' does not import "
        "(No module named 'no_such_dependency_xyz')"
    )
    with pytest.raises(UserError) as e:
        load_rewards(["raising_rewards:f"])
    assert str(e.value) == (
        "task.rewards: 'raising_rewards:f': module 'raising_rewards' does not import "
        "(RuntimeError: no GPU here)"
    )


@pytest.mark.parametrize(
    ("function", "line"),
    [
        ("says", "task.rewards: '{mod}:says' returned str ('abc'), not a number"),
        ("nothing", "task.rewards: '{mod}:nothing' returned None, not a number"),
        ("flag", "task.rewards: '{mod}:flag' returned bool (True), not a number"),
        ("nan", "task.rewards: '{mod}:nan' returned float (nan), not a finite number"),
        ("vector", "task.rewards: '{mod}:vector' returned ndarray of shape (2,), not a number"),
        (
            "needs_target",
            "task.rewards: '{mod}:needs_target' cannot be called as (prompt, completion, **row) "
            "with the first data row's fields ('answer', 'id'): missing a required argument: "
            "'target'",
        ),
    ],
)
def test_probe_errors(user_module, function, line):
    (reward,) = load_rewards([f"{user_module}:{function}"])
    with pytest.raises(UserError) as e:
        check_rewards([reward], {"prompt": "2+2?", "answer": "4", "id": 7}, "2+2?")
    assert str(e.value) == line.format(mod=user_module)


def test_probe_accepts(user_module):
    """Numbers of every kind pass; a function that raises on the empty completion is let through
    (it is scored per sample at run time)."""
    row = {"prompt": "2+2?", "answer": "4"}
    rewards = load_rewards(["exact_match", "numeric", f"{user_module}:fails"])
    rewards += [
        Reward(f"returns {kind}", lambda p, c, v=value, **r: v)
        for kind, value in [
            ("int", 1),
            ("np.int64", np.int64(2)),
            ("np.float32", np.float32(0.5)),
            ("0-d array", np.array(1.5)),
            ("0-d tensor", torch.tensor(0.25)),
        ]
    ]
    check_rewards(rewards, row, row["prompt"])
    with pytest.raises(UserError, match="returned Tensor of shape"):
        check_rewards([Reward("t", lambda p, c, **r: torch.ones(2))], row, "2+2?")


def test_probe_answer_field():
    rewards = load_rewards(["numeric"], answer_field="solution")
    with pytest.raises(UserError) as e:
        check_rewards(rewards, {"prompt": "2+2?", "answer": "4"}, "2+2?")
    assert str(e.value) == (
        "task.answer_field: 'solution' is not a field of the first data row (its fields: "
        "'prompt', 'answer'); the 'numeric' reward compares the completion with it"
    )
    with pytest.raises(UserError) as e:
        check_rewards(rewards, {"prompt": "2+2?", "solution": "four"}, "2+2?")
    assert str(e.value) == (
        "task.answer_field: the first data row's 'solution' is str ('four'), not a number "
        "(the 'numeric' reward compares numbers)"
    )


def test_score_against_numpy(user_module):
    """Per-sample values, NaN where `picky` or `fails` raised, the weighted total as TRL's
    `nansum(values * weights)` (0 where every function raised) and the NaN-free means."""
    names = ["exact_match", f"{user_module}:picky", f"{user_module}:length", f"{user_module}:fails"]
    weights = [1.0, 0.5, -0.1, 2.0]
    rewards = load_rewards(names)
    completions = ["4", "a4", "bad", " 5 ", "abad"]
    rows = [{"prompt": "2+2?", "answer": "4"}] * 3 + [{"prompt": "2+3?", "answer": 5}] * 2
    prompts = [row["prompt"] for row in rows]
    result = score(rewards, weights, prompts, completions, rows)

    nan = math.nan
    expected = np.array(
        [
            [1.0, 0.0, 1.0, nan],
            [0.0, 0.5, 2.0, nan],
            [0.0, nan, 3.0, nan],
            [1.0, 0.0, 3.0, nan],
            [0.0, nan, 4.0, nan],
        ]
    )
    np.testing.assert_array_equal(result.values, expected)
    total = np.nansum(expected * np.array(weights), axis=1)
    np.testing.assert_allclose(result.total, total, rtol=0, atol=1e-12)
    assert result.names == names
    assert result.means == pytest.approx(
        {name: np.nanmean(expected[:, j]) for j, name in enumerate(names[:3])} | {names[3]: nan},
        nan_ok=True,
    )
    assert result.errors == {names[0]: 0, names[1]: 2, names[2]: 0, names[3]: 5}
    assert set(result.first_error) == {names[1], names[3]}
    assert re.fullmatch(
        r"ValueError: cannot score 'bad' \(user_rewards_\w+\.py:\d+ in picky\)",
        result.first_error[names[1]],
    )

    only_failing = score(rewards[3:], None, prompts[:2], completions[:2], rows[:2])
    np.testing.assert_array_equal(only_failing.total, [0.0, 0.0])  # all NaN: 0, as TRL
    unweighted = score(rewards[:3], None, prompts, completions, rows)
    np.testing.assert_allclose(unweighted.total, np.nansum(expected[:, :3], axis=1))


def test_score_errors_at_run_time(user_module):
    """A non-number or a row without its answer stops the run with the probe's line."""
    rows = [{"prompt": "p", "answer": "4"}, {"prompt": "p"}]
    with pytest.raises(UserError, match=rf"^task.rewards: '{user_module}:says' returned str"):
        score(load_rewards([f"{user_module}:says"]), None, ["p"], ["4"], rows[:1])
    with pytest.raises(UserError, match=r"^task.answer_field: 'answer' is not a field of a data"):
        score(load_rewards(["exact_match"]), None, ["p", "p"], ["4", "4"], rows)


def test_builtins_listed():
    assert {r.name for r in load_rewards(list(BUILTINS), format_pattern=".*")} == set(BUILTINS)
