"""A verifiable task for reinforcement learning: short sums with one right answer.

`python -m parallm.demo.arithmetic data --out DIR` writes, from a seed:
  train.jsonl       chats (`messages`) for SFT: user "What is 37 + 48?", assistant "85"
                    (with `--wordy-fraction F`, that share of them "The answer is 85." instead)
  rl.jsonl          prompts for GRPO (`prompt`: a message list, `answer`: the sum as a string)
  heldout.jsonl     prompts and answers, none of them asked in train.jsonl or rl.jsonl
  tokenizer/        a byte-level BPE tokenizer with parallm's chat template, in which every
                    digit is its own token (so a small model can learn the sums digit by digit)
`python -m parallm.demo.arithmetic eval --model DIR [--lora ADAPTER] --data DIR/heldout.jsonl`
prints the greedy exact-match accuracy on the offline engine; with `--samples N` also what N
samples at `--temperature` give per prompt: the share with a right answer among them, and the
share with both a right and a wrong one (the prompts whose GRPO group has a learning signal).

The questions are every pair of operands in [0, max_operand] for each operation (differences
never below 0), shuffled by the seed and cut into the three files, so no question is in two.
`tiny_sft_job(root)` writes a small data set under `root` and returns the quick SFT job that
tests start GRPO from, `tiny_grpo_job(root, model)` the quick GRPO job on its prompts
(configs/arith_sft.toml and arith_grpo.toml are the demo's full-size ones). Half the quick SFT
answers are worded, which the exact-match reward scores 0: GRPO learns to answer bare whatever
the question, so its gain shows on held-out questions within a short run (the full-size demo,
all bare, gets there by the sums themselves).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers

from parallm.config import JobConfig, load_config
from parallm.demo.facts import read_heldout
from parallm.errors import UserError
from parallm.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    Tokenizer,
    save_tokenizer_dir,
    train_bpe_tokenizer,
)
from parallm.utils.fs import write_lines_atomic

if TYPE_CHECKING:
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}
QUESTION = "What is {} {} {}?"
WORDY = "The answer is {}."  # the SFT answer's other form (`wordy_fraction`); not an exact match


def questions(*, max_operand: int, ops: str) -> list[tuple[str, str]]:
    """(question, answer) for every pair of operands in [0, max_operand] and operation in `ops`
    (a difference only when it is not negative), in a fixed order."""
    for op in ops:
        if op not in OPERATIONS:
            raise UserError(f"ops: {op!r} is not an operation; valid: {', '.join(OPERATIONS)}")
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    return [
        (QUESTION.format(a, op, b), str(OPERATIONS[op](a, b)))
        for op in ops
        for a, b in pairs
        if OPERATIONS[op](a, b) >= 0
    ]


def prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def make_data(
    out: Path,
    *,
    n_train: int = 4000,
    n_rl: int = 1000,
    n_heldout: int = 500,
    max_operand: int = 99,
    ops: str = "+",
    wordy_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, int]:
    """Write train.jsonl, rl.jsonl, heldout.jsonl and a tokenizer under `out`; returns the
    files' row counts. The three files are disjoint slices of one seeded shuffle. A share
    `wordy_fraction` of the SFT answers, drawn per question from the seed, is worded
    ("The answer is 85.") instead of bare ("85"); rl.jsonl and heldout.jsonl keep the bare sum."""
    if not 0.0 <= wordy_fraction <= 1.0:
        raise UserError(f"wordy_fraction: {wordy_fraction} is not a share; valid: 0 to 1")
    pool = questions(max_operand=max_operand, ops=ops)
    if n_train + n_rl + n_heldout > len(pool):
        raise UserError(
            f"n_train + n_rl + n_heldout: {n_train + n_rl + n_heldout} questions asked for; "
            f"max_operand={max_operand} with ops={ops!r} has {len(pool)}"
        )
    rng = random.Random(seed)
    rng.shuffle(pool)
    train = pool[:n_train]
    rl = pool[n_train : n_train + n_rl]
    heldout = pool[n_train + n_rl : n_train + n_rl + n_heldout]
    files = {
        "train.jsonl": [
            {"messages": [*prompt(q), {"role": "assistant", "content": reply}]}
            for q, a in train
            for reply in [WORDY.format(a) if rng.random() < wordy_fraction else a]
        ],
        "rl.jsonl": [{"prompt": prompt(q), "answer": a} for q, a in rl],
        "heldout.jsonl": [{"prompt": prompt(q), "answer": a} for q, a in heldout],
    }
    for name, rows in files.items():
        write_lines_atomic(out / name, [json.dumps(r) for r in rows])
    tokenizer = train_bpe_tokenizer(iter(_tokenizer_texts(files["train.jsonl"])), 300)
    tokenizer.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    save_tokenizer_dir(tokenizer, out / "tokenizer")
    return {name: len(rows) for name, rows in files.items()}


def _tokenizer_texts(rows: list[dict]) -> list[str]:
    """The chats as the chat template renders them (without the special tokens, which the
    tokenizer has already) and without their digits: BPE merges only what it has seen, so it
    never merges a digit with anything and every digit stays its own byte token."""
    config = {"chat_template": DEFAULT_CHAT_TEMPLATE, "bos_token": "", "eos_token": ""}
    renderer = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), config)
    return [re.sub(r"[0-9]", "", renderer.apply_chat_template(r["messages"])) for r in rows]


def score(answers: list[str], rows: list[dict]) -> dict[str, float]:
    """Exact-match accuracy: the answer, stripped of surrounding white space, is the sum."""
    exact = sum(got.strip() == row["answer"] for got, row in zip(answers, rows, strict=True))
    return {"n": len(rows), "exact_match": exact / max(len(rows), 1)}


def score_samples(samples: list[list[str]], rows: list[dict]) -> dict[str, float]:
    """Per prompt, N sampled answers: the share of prompts with a right one among them
    (pass@N), with both a right and a wrong one (`mixed`: a GRPO group whose rewards differ),
    and the share of right answers over all samples."""
    right = [
        [s.strip() == row["answer"] for s in group]
        for group, row in zip(samples, rows, strict=True)
    ]
    n = max(len(rows), 1)
    return {
        "n": len(rows),
        "samples": len(samples[0]) if samples else 0,
        "pass_at_n": sum(any(r) for r in right) / n,
        "mixed": sum(any(r) and not all(r) for r in right) / n,
        "sample_accuracy": sum(map(sum, right)) / max(sum(map(len, right)), 1),
    }


def answers(
    llm: LLM, chats: list[list[dict]], params: SamplingParams, lora: str | None = None
) -> list[list[str]]:
    """`params.n` answers per chat from the engine (the chat template's generation prompt on)."""
    tok = llm.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(c, add_generation_prompt=True), add_special_tokens=False)
        for c in chats
    ]
    outs = llm.generate(prompts, params, lora=lora)
    return [[c.text for c in o.outputs] for o in outs]


def evaluate(
    model: str | Path,
    rows: list[dict],
    *,
    lora: str | None = None,
    samples: int = 0,
    temperature: float = 1.0,
    max_tokens: int = 6,
    seed: int = 0,
) -> dict:
    """Greedy exact-match accuracy on `rows` (`prompt`, `answer`) through the offline engine;
    with `samples` > 0 also `score_samples` of that many answers per prompt at `temperature`."""
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams

    chats = [r["prompt"] for r in rows]
    with LLM(str(model), enable_lora=lora is not None) as llm:
        greedy = answers(llm, chats, SamplingParams(max_tokens=max_tokens, temperature=0), lora)
        result = score([g[0] for g in greedy], rows)
        if samples:
            params = SamplingParams(
                n=samples, max_tokens=max_tokens, temperature=temperature, seed=seed
            )
            result["sampled"] = score_samples(answers(llm, chats, params, lora), rows)
    return result


# The quick jobs of the tests: a small Llama trained from scratch on sums of operands up to 19
# (200 of the 400 questions, half of the answers worded), then GRPO on 100 others. Measured on
# 2 shared CPU cores, 1 torch thread: SFT 300 steps ~13 s, GRPO 40 steps ~11 s; the whole test
# ~30 s (its docstring has the numbers).
TINY_DATA = {
    "n_train": 200,
    "n_rl": 100,
    "n_heldout": 100,
    "max_operand": 19,
    "wordy_fraction": 0.5,
}
TINY_JOB = {
    "data.seq_len": 64,
    "model.architecture": "llama",
    "model.dim": 64,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.ffn_dim": 256,
    "task.name": "sft",
    "train.steps": 300,
    "train.batch_size": 16,
    "train.lr": 5e-3,
    "train.warmup_steps": 10,
    "train.weight_decay": 0.0,
    "train.log_every": 100,
    "checkpoint.every": 0,
    "generate.max_tokens": 0,
}
TINY_GRPO = {
    "task.name": "grpo",
    "task.group_size": 8,
    "task.max_completion_tokens": 4,
    "task.temperature": 1.0,
    "task.rewards": "['exact_match']",
    "task.beta": 0.0,
    "train.steps": 40,
    "train.batch_size": 32,
    "train.lr": 5e-4,
    "train.warmup_steps": 2,
    "train.weight_decay": 0.0,
    "train.log_every": 10,
    "checkpoint.every": 0,
    "generate.max_tokens": 0,
}


def _job(values: dict) -> JobConfig:
    return load_config(JobConfig, None, [f"--{k}={v}" for k, v in values.items()])


def tiny_sft_job(root: Path, seed: int = 0) -> JobConfig:
    """Write a small arithmetic data set under `root / "data"` and return the quick SFT job on
    it, which exports its model to `root / "sft" / "hf"` (`Trainer(job).fit()` trains it)."""
    data = Path(root) / "data"
    make_data(data, **TINY_DATA)
    paths = {
        "data.paths": f"{data / 'train.jsonl'}",
        "tokenizer.path": str(data / "tokenizer"),
        "output.dir": str(Path(root) / "sft"),
        "train.seed": seed,
    }
    return _job({**TINY_JOB, **paths})


def tiny_grpo_job(root: Path, sft_model: Path, seed: int = 0) -> JobConfig:
    """The quick GRPO job on `root / "data" / "rl.jsonl"` (written by `tiny_sft_job`) from the
    model at `sft_model`; it exports to `root / "grpo" / "hf"`."""
    paths = {
        "data.paths": str(Path(root) / "data" / "rl.jsonl"),
        "data.seq_len": TINY_JOB["data.seq_len"],
        "model.path": str(sft_model),
        "output.dir": str(Path(root) / "grpo"),
        "train.seed": seed,
    }
    return _job({**TINY_GRPO, **paths})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallm.demo.arithmetic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the data set and its tokenizer")
    data.add_argument("--out", required=True, type=Path)
    data.add_argument("--train", type=int, default=4000, help="SFT conversations")
    data.add_argument("--rl", type=int, default=1000, help="GRPO prompts")
    data.add_argument("--heldout", type=int, default=500, help="held-out prompts")
    data.add_argument("--max-operand", type=int, default=99)
    data.add_argument("--ops", default="+", help="operations among '+-', e.g. '+-'")
    data.add_argument(
        "--wordy-fraction", type=float, default=0.0, help="share of SFT answers worded, not bare"
    )
    data.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="exact-match accuracy on held-out prompts")
    ev.add_argument("--data", required=True, type=Path, help="heldout.jsonl (or rl.jsonl)")
    ev.add_argument("--model", required=True, help="model directory")
    ev.add_argument("--lora", help="a LoRA adapter directory")
    ev.add_argument("--max-tokens", type=int, default=6)
    ev.add_argument("--samples", type=int, default=0, help="also sample this many per prompt")
    ev.add_argument("--temperature", type=float, default=1.0, help="of the samples")
    ev.add_argument("--seed", type=int, default=0, help="of the samples")
    args = parser.parse_args(argv)
    if args.command == "data":
        counts = make_data(
            args.out,
            n_train=args.train,
            n_rl=args.rl,
            n_heldout=args.heldout,
            max_operand=args.max_operand,
            ops=args.ops,
            wordy_fraction=args.wordy_fraction,
            seed=args.seed,
        )
        print(json.dumps({"out": str(args.out), **counts}))
        return 0
    result = evaluate(
        args.model,
        read_heldout(args.data),
        lora=args.lora,
        samples=args.samples,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
