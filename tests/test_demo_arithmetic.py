"""The arithmetic demo's data (`parallm.demo.arithmetic`): seeded, its three files disjoint, digits
single tokens, worded SFT answers only where asked; its scores counted right; and the quick
SFT-then-GRPO run raises the reward and the held-out exact-match."""

from __future__ import annotations

from pathlib import Path

import torch

from parallm.demo import arithmetic as ar
from parallm.tokenizer import Tokenizer


def _files(d: Path) -> dict[str, str]:
    return {name: (d / name).read_text() for name in ("train.jsonl", "rl.jsonl", "heldout.jsonl")}


def _questions(rows: list[dict]) -> set[str]:
    return {(r.get("messages") or r.get("prompt"))[0]["content"] for r in rows}


def test_data_is_seeded_disjoint_and_right(tmp_path):
    sizes = {"n_train": 300, "n_rl": 100, "n_heldout": 50, "max_operand": 30, "ops": "+-"}
    counts = ar.make_data(tmp_path / "a", seed=3, **sizes)
    ar.make_data(tmp_path / "b", seed=3, **sizes)
    ar.make_data(tmp_path / "c", seed=4, **sizes)
    assert counts == {"train.jsonl": 300, "rl.jsonl": 100, "heldout.jsonl": 50}
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")

    train, rl, heldout = (ar.read_heldout(tmp_path / "a" / n) for n in _files(tmp_path / "a"))
    qs = [_questions(rows) for rows in (train, rl, heldout)]
    assert [len(q) for q in qs] == [300, 100, 50]  # no question twice in a file
    assert not (qs[0] & qs[1]) and not (qs[0] & qs[2]) and not (qs[1] & qs[2])
    for row in rl + heldout:  # the answer is the question's value, worked out independently
        a, op, b = row["prompt"][0]["content"].removeprefix("What is ").rstrip("?").split()
        assert row["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert int(row["answer"]) >= 0
    assert {r["messages"][1]["role"] for r in train} == {"assistant"}


def test_wordy_fraction_words_only_sft_answers(tmp_path):
    sizes = {"n_train": 200, "n_rl": 50, "n_heldout": 50, "max_operand": 19, "seed": 1}
    ar.make_data(tmp_path / "bare", **sizes)
    ar.make_data(tmp_path / "half", wordy_fraction=0.5, **sizes)
    bare, half = _files(tmp_path / "bare"), _files(tmp_path / "half")
    assert bare["rl.jsonl"] == half["rl.jsonl"] and bare["heldout.jsonl"] == half["heldout.jsonl"]
    bare_train, half_train = (
        ar.read_heldout(tmp_path / d / "train.jsonl") for d in ("bare", "half")
    )
    worded = 0
    for b, h in zip(bare_train, half_train, strict=True):  # same questions, the sum either way
        assert b["messages"][0] == h["messages"][0]
        answer = b["messages"][1]["content"]
        assert h["messages"][1]["content"] in (answer, f"The answer is {answer}.")
        worded += h["messages"][1]["content"] != answer
    assert 70 < worded < 130  # about half of 200


def test_every_digit_is_its_own_token(tmp_path):
    ar.make_data(tmp_path, n_train=200, n_rl=10, n_heldout=10, max_operand=99)
    tok = Tokenizer.from_dir(tmp_path / "tokenizer")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 37 + 48?"}, {"role": "assistant", "content": "85"}]
    )
    pieces = [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]
    assert "".join(pieces) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["3", "7", "4", "8", "8", "5"]


def test_scores_count_exact_matches():
    rows = [{"answer": a} for a in ("85", "7", "120", "0")]
    # right, right (white space around it), wrong (extra text), wrong (another number)
    assert ar.score(["85", " 7\n", "120 apples", "1"], rows) == {"n": 4, "exact_match": 0.5}
    samples = [["85", "84", "85"], ["7", "7", "7"], ["1", "2", "3"], ["0", "x", "0 "]]
    got = ar.score_samples(samples, rows)
    # pass@3: prompts 0, 1, 3; mixed: 0 and 3; right samples: 2 + 3 + 0 + 2 of 12
    assert got == {
        "n": 4,
        "samples": 3,
        "pass_at_n": 0.75,
        "mixed": 0.5,
        "sample_accuracy": 7 / 12,
    }


# -- learning: SFT, then GRPO from it ------------------------------------------------------------


def test_grpo_raises_the_reward_and_held_out_exact_match(tmp_path):
    """The quick SFT model (`tiny_sft_job`: sums up to 19, 300 steps, half of its answers worded
    "The answer is 17." and half bare "17"), then the quick GRPO job (`tiny_grpo_job`: 40 steps
    of 32 prompts x 8 samples, exact-match reward, which only a bare answer earns): the reward of
    the last 10 steps is above that of the first 10, and greedy exact-match on the 100 held-out
    questions, none of them trained on by SFT or GRPO, rises. GRPO learns to answer bare, which
    does not depend on the question, so the gain transfers to questions it never saw (the sums
    themselves, at this size, it mostly memorises; a test without worded answers saw held-out
    greedy move -0.12..+0.09 by seed).

    Measured (CPU, 1 thread; seeds 0-5 of SFT and GRPO; reward first 10 -> last 10 steps,
    held-out greedy exact-match before -> after):
      seed 0: reward .24 -> .52; held-out .22 -> .48
      seed 1: reward .21 -> .38; held-out .12 -> .27
      seed 2: reward .19 -> .49; held-out .15 -> .33
      seed 3: reward .18 -> .41; held-out .19 -> .28
      seed 4: reward .12 -> .27; held-out .01 -> .19
      seed 5: reward .10 -> .26; held-out .07 -> .21
    """
    from parallm.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI's two cores are shared; the times measured are with one
    try:
        Trainer(ar.tiny_sft_job(tmp_path), resume="never").fit()
        sft = tmp_path / "sft" / "hf"
        heldout = ar.read_heldout(tmp_path / "data" / "heldout.jsonl")
        before = ar.evaluate(sft, heldout)
        records = Trainer(ar.tiny_grpo_job(tmp_path, sft), resume="never").fit()
        after = ar.evaluate(tmp_path / "grpo" / "hf", heldout)
    finally:
        torch.set_num_threads(threads)
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.08, (first, last)
    assert after["exact_match"] > before["exact_match"] + 0.05, (before, after)
