"""The arithmetic demo's data (`parallm.demo.arithmetic`): seeded, its three files disjoint, digits
single tokens; its scores counted right."""

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


def test_grpo_raises_the_reward(tmp_path):
    """The quick SFT model (`tiny_sft_job`: sums up to 19, 300 steps), then the quick GRPO job
    (`tiny_grpo_job`: 40 steps of 32 prompts x 8 samples, exact-match reward): the reward of the
    last 10 steps is above that of the first 10, and the sampled exact-match on the GRPO prompts,
    counted by the offline engine before and after (same sampling seed), rises.

    Measured (CPU, 1 thread; seeds 0-5 of SFT and GRPO; reward first 10 -> last 10 steps,
    sampled accuracy on the 100 GRPO prompts, greedy on 100 held-out prompts):
      seed 0: reward .29 -> .37; prompts .29 -> .42; held-out greedy .35 -> .36
      seed 1: reward .65 -> .78; prompts .73 -> .88; held-out greedy .91 -> .94
      seed 2: reward .38 -> .51; prompts .46 -> .63; held-out greedy .69 -> .61
      seed 3: reward .41 -> .57; prompts .49 -> .65; held-out greedy .58 -> .67
      seed 4: reward .32 -> .49; prompts .45 -> .58; held-out greedy .65 -> .68
      seed 5: reward .31 -> .42; prompts .37 -> .49; held-out greedy .50 -> .38
    The held-out rise is not asserted: on this budget the model memorises questions (sums up
    to 19, 200 to learn from; SFT alone lands anywhere in 35-91% held-out by seed), so GRPO's
    gain mostly stays with the questions it trained on (held-out greedy -0.12..+0.09 across
    seeds, sampled -0.02..+0.09: within the noise of 100 questions). The demo's full-size
    configs (configs/arith_sft.toml, arith_grpo.toml) show the held-out rise.
    """
    from parallm.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI's two cores are shared; the times measured are with one
    try:
        Trainer(ar.tiny_sft_job(tmp_path), resume="never").fit()
        sft = tmp_path / "sft" / "hf"
        prompts = ar.read_heldout(tmp_path / "data" / "rl.jsonl")
        before = ar.evaluate(sft, prompts, samples=8)
        records = Trainer(ar.tiny_grpo_job(tmp_path, sft), resume="never").fit()
        after = ar.evaluate(tmp_path / "grpo" / "hf", prompts, samples=8)
    finally:
        torch.set_num_threads(threads)
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.04, (first, last)
    gain = after["sampled"]["sample_accuracy"] - before["sampled"]["sample_accuracy"]
    assert gain > 0.08, (before, after)
