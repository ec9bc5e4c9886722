"""A synthetic private data set for the post-training demo: a fictional company's product facts.

`python -m parallm.demo.facts data --out DIR` writes, from a seed:
  base.jsonl        support chats about another, public catalogue: what turns a model into one
                    that answers such questions (the stand-in for an open chat model)
  train.jsonl       support-chat conversations (`messages`) asking for each product's price,
                    warehouse and launch year, in several phrasings; a quarter of the answers
                    in the company's house style ("Answer: ..."), the rest bare
  heldout.jsonl     the same facts asked in phrasings no training conversation uses
                    (`prompt`, `answer`): what exact-match accuracy is measured on
  tokenizer/        a byte-level BPE tokenizer trained on the chats, with parallm's chat template
  prefs.jsonl       preference pairs (`prompt`, `chosen`, `rejected`) for DPO: the company's
                    house style ("Answer: ..." before the fact) is chosen, the bare fact rejected
`python -m parallm.demo.facts eval --model DIR [--lora ADAPTER] --data DIR/heldout.jsonl` prints
exact-match accuracy and the house-style rate (greedy), on the offline engine or, with
`--base-url`, through any OpenAI-compatible server (the `openai` client).

No model has seen these facts: the names are invented, the values drawn from the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from parallm.tokenizer import DEFAULT_CHAT_TEMPLATE, save_tokenizer_dir, train_bpe_tokenizer
from parallm.utils.fs import write_lines_atomic

COMPANY = "Quillmate"
SYSTEM = f"You are {COMPANY}'s support assistant. Answer with the fact asked for."
HOUSE_STYLE = "Answer: "
SYLLABLES = ["zor", "bla", "qui", "mev", "tak", "lun", "fro", "dax", "pel", "vin", "sor", "kem"]
CITIES = ["Port Elwin", "Dunmarsh", "Velcastle", "Orrin Bay", "Hollowmere", "Kestrel Point"]

# Attribute -> (how the answer reads, training phrasings, held-out phrasings).
PHRASINGS: dict[str, tuple[str, list[str], list[str]]] = {
    "price": (
        "{} dollars",
        [
            "How much does the {} cost?",
            "What is the price of the {}?",
            "What does a {} cost?",
            "Price of the {}, please.",
        ],
        ["I want to buy a {}. How much is it?"],
    ),
    "warehouse": (
        "{}",
        [
            "Where is the {} stored?",
            "Which warehouse ships the {}?",
            "Where does the {} ship from?",
            "Warehouse of the {}, please.",
        ],
        ["My {} order: which warehouse will it come from?"],
    ),
    "year": (
        "{}",
        [
            "When was the {} launched?",
            "What year did the {} come out?",
            "Launch year of the {}, please.",
            "In which year was the {} released?",
        ],
        ["How old is the {}? What year was it launched?"],
    ),
}


@dataclass(frozen=True)
class Product:
    name: str
    price: int
    warehouse: str
    year: int

    def answer(self, attribute: str) -> str:
        return PHRASINGS[attribute][0].format(getattr(self, attribute))


def products(n: int, seed: int, *, exclude: set[str] = frozenset()) -> list[Product]:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        name = "".join(rng.sample(SYLLABLES, 2)).capitalize()
        if name not in exclude:
            names.add(name)
    return [
        Product(name, rng.randint(10, 99), rng.choice(CITIES), rng.randint(2001, 2024))
        for name in sorted(names)
    ]


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _conversations(
    catalogue: list[Product], phrasings: str, *, styled: float = 0.0, seed: int = 0
) -> list[dict]:
    """Support chats about `catalogue` in the `seen` (or `all`) phrasings; a share `styled` of
    the answers is written in the house style (some agents follow it, most do not)."""
    rng = random.Random(seed)
    rows = []
    for p in catalogue:
        for attribute, (_, seen, unseen) in PHRASINGS.items():
            for q in seen if phrasings == "seen" else seen + unseen:
                answer = p.answer(attribute)
                if rng.random() < styled:
                    answer = HOUSE_STYLE + answer
                chat = _chat(q.format(p.name))
                rows.append({"messages": [*chat, {"role": "assistant", "content": answer}]})
    return rows


def make_data(
    out: Path, *, n_products: int = 16, n_public: int = 32, seed: int = 0
) -> dict[str, int]:
    """Write base.jsonl, train.jsonl, heldout.jsonl, prefs.jsonl and a tokenizer under `out`;
    returns the files' row counts. The public catalogue (base.jsonl) shares no product with the private one."""
    private = products(n_products, seed)
    public = products(n_public, seed + 1, exclude={p.name for p in private})
    base = _conversations(public, "all")
    train = _conversations(private, "seen", styled=0.25, seed=seed)
    heldout, prefs = [], []
    for p in private:
        for attribute, (_, seen, unseen) in PHRASINGS.items():
            answer = p.answer(attribute)
            prompt = _chat(seen[0].format(p.name))
            prefs.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": HOUSE_STYLE + answer}],
                    "rejected": [{"role": "assistant", "content": answer}],
                }
            )
            for q in unseen:
                heldout.append({"prompt": _chat(q.format(p.name)), "answer": answer})
    random.Random(seed).shuffle(train)
    random.Random(seed).shuffle(base)
    files = {
        "base.jsonl": base,
        "train.jsonl": train,
        "heldout.jsonl": heldout,
        "prefs.jsonl": prefs,
    }
    for name, rows in files.items():
        write_lines_atomic(out / name, [json.dumps(r) for r in rows])
    texts = [json.dumps(r) for r in base + train]
    tokenizer = train_bpe_tokenizer(iter(texts), 400)
    tokenizer.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    save_tokenizer_dir(tokenizer, out / "tokenizer")
    return {name: len(rows) for name, rows in files.items()}


def read_heldout(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(answers: list[str], rows: list[dict]) -> dict[str, float]:
    """Exact-match accuracy (the fact, with or without the house style) and house-style rate."""
    exact = style = 0
    for got, row in zip(answers, rows, strict=True):
        got = got.strip()
        styled = got.startswith(HOUSE_STYLE)
        style += styled
        exact += got.removeprefix(HOUSE_STYLE).strip() == row["answer"]
    n = max(len(rows), 1)
    return {"n": len(rows), "exact_match": exact / n, "house_style": style / n}


Answerer = Callable[[list[list[dict[str, str]]]], list[str]]


def offline_answerer(model: str, lora: str | None, max_tokens: int) -> Answerer:
    """Greedy answers from the offline engine (with the adapter when `lora` is given)."""
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams

    llm = LLM(model, enable_lora=lora is not None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tok = llm.tokenizer

    def answer(chats):
        prompts = [
            tok.encode(
                tok.apply_chat_template(c, add_generation_prompt=True), add_special_tokens=False
            )
            for c in chats
        ]
        outs = llm.generate(prompts, params, lora=lora) if lora else llm.generate(prompts, params)
        return [o.outputs[0].text for o in outs]

    return answer


def server_answerer(base_url: str, model: str, api_key: str, max_tokens: int) -> Answerer:
    """Greedy answers from an OpenAI-compatible server, through the `openai` client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key)

    def answer(chats):
        return [
            client.chat.completions.create(
                model=model, messages=chat, max_tokens=max_tokens, temperature=0.0
            )
            .choices[0]
            .message.content
            for chat in chats
        ]

    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallm.demo.facts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the synthetic data set")
    data.add_argument("--out", required=True, type=Path)
    data.add_argument("--products", type=int, default=16)
    data.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="exact-match accuracy and house-style rate on held-out data")
    ev.add_argument("--data", required=True, type=Path, help="heldout.jsonl")
    ev.add_argument("--model", required=True, help="model directory, or the served model name")
    ev.add_argument("--lora", help="a LoRA adapter directory (offline) or the served adapter name")
    ev.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    ev.add_argument("--api-key", default="none")
    ev.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    if args.command == "data":
        counts = make_data(args.out, n_products=args.products, seed=args.seed)
        print(json.dumps({"out": str(args.out), **counts}))
        return 0
    rows = read_heldout(args.data)
    if args.base_url:
        name = args.lora or args.model
        answer = server_answerer(args.base_url, name, args.api_key, args.max_tokens)
    else:
        answer = offline_answerer(args.model, args.lora, args.max_tokens)
    print(json.dumps(score(answer([r["prompt"] for r in rows]), rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
