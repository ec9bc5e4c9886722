"""`parallm` command line: thin wrappers over the Python API.

A `UserError` (or a bad argument) prints one line on stderr and exits 2; a bug keeps its
traceback and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from parallm.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        sub = self.prog.removeprefix("parallm").strip()
        raise UserError(f"{sub}: {message}" if sub else message)


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from parallm.config import JobConfig, load_config
    from parallm.train.trainer import Trainer, summary

    cfg = load_config(JobConfig, args.job, overrides)
    trainer = Trainer(cfg, resume=args.resume)
    records = trainer.fit()
    print(summary(records), flush=True)
    if trainer.step == cfg.train.steps and cfg.checkpoint.export_hf:
        print(f"saved Hugging Face directory {trainer.out / 'hf'}", flush=True)
    if cfg.generate.max_tokens > 0:
        print("--- sample ---\n" + trainer.sample(), flush=True)
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from parallm.generate import SamplingOptions, generate_tokens
    from parallm.models.hf import load_pretrained
    from parallm.tokenizer import Tokenizer

    opts = SamplingOptions(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    model = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    tokenizer = Tokenizer.from_dir(args.model)
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt = tokenizer.encode(args.prompt)
    out: list[int] = []
    shown = ""
    with torch.inference_mode():
        for token in generate_tokens(model, prompt, opts, stop_token_ids=tokenizer.eos_token_ids):
            out.append(token)
            text = tokenizer.decode(out, skip_special_tokens=True)
            # Print only whole characters: a partial UTF-8 sequence decodes to U+FFFD.
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
    sys.stdout.write(tokenizer.decode(out, skip_special_tokens=True)[len(shown) :] + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="parallm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="train a model from a TOML job file",
        description="Train from a TOML job file; override any field as --section.key value.",
    )
    train.add_argument("job", help="job file (TOML), e.g. configs/demo.toml")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")

    gen = sub.add_parser("generate", help="generate text from a Hugging Face model directory")
    gen.add_argument("--model", required=True, help="model directory (HF format)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: model's)"
    )
    gen.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command == "train":
            return _train(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _generate(args)
    except UserError as e:
        print(f"parallm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parallm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
