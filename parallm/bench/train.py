"""`parallm bench train`: training throughput of a named model shape.

Pretraining (`--task pretrain`, the default): a fixed number of steps on random token ids (no
files, no tokenizer), a fresh model of the named shape, the usual trainer on whatever layout
`--set parallel.*` asks for. Reports tokens/s per device, MFU (model FLOPs, 6 x non-embedding
params + output head + causal attention, over the device's dense bf16 peak) and peak memory, as
medians over the steps after warm-up, printed and saved as JSON.

SFT (`--task sft`): seeded synthetic conversations of mixed length, a tokenizer trained on them
in-process and a random model of the shape saved as a HF directory; then, interleaved over
`--rounds`, each in a fresh process: parallm full fine-tuning, parallm LoRA (`--lora R`), the same
LoRA through `transformers` + `peft` (the peer, `bench/train_peer.py`) and parallm with padding
instead of packing. Reports tokens/s, tokens per CPU-second and peak memory per engine (medians),
and the per-round ratios (LoRA / peer, packing / padding), printed and saved as JSON (and a PNG
when matplotlib is installed).

    parallm bench train --shape llama3.2-1b --seq-len 4096 --batch 8 --steps 20
    parallm bench train --shape tiny --nproc 2 --set parallel.dp_shard=2
    parallm bench train --task sft --lora 16 --shape tiny --seq-len 512 --batch 8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from parallm.bench import save_report
from parallm.bench.train_peer import SftRun
from parallm.utils.fs import save_figure_atomic

# Published shapes (config.json of each model family's release), for benchmarks only.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
        tie_embeddings=True, rope_theta=500000.0, max_seq_len=131072,
    ),
    "llama3.2-3b": dict(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
        tie_embeddings=True, rope_theta=500000.0, max_seq_len=131072,
    ),
    "llama3.1-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
        tie_embeddings=False, rope_theta=500000.0, max_seq_len=131072,
    ),
    "qwen3-0.6b": dict(
        architecture="qwen3", dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
        ffn_dim=3072, vocab_size=151936, tie_embeddings=True, rope_theta=1000000.0,
        max_seq_len=40960,
    ),
    "tiny": dict(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, vocab_size=4096,
        max_seq_len=4096,
    ),
}  # fmt: skip


def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The job (as --section.key overrides) that the benchmark trains."""
    if args.shape not in SHAPES:
        from parallm.errors import UserError

        raise UserError(f"--shape: {args.shape!r} is not known; valid: {', '.join(SHAPES)}")
    steps = args.warmup + args.steps
    batch_tokens = args.batch * args.seq_len
    out = [f"--model.{k}={v}" for k, v in SHAPES[args.shape].items()]
    out += [
        f"--data.seq_len={args.seq_len}",
        f"--data.random_tokens={max(batch_tokens * steps + 1, 2 * args.seq_len + 1)}",
        f"--train.steps={steps}",
        f"--train.batch_size={args.batch}",
        f"--train.micro_batch_size={args.micro_batch or 'auto'}",
        "--train.warmup_steps=0",
        f"--train.log_every={max(steps // 10, 1)}",
        "--checkpoint.every=0",
        "--checkpoint.export_hf=false",
        "--generate.max_tokens=0",
        f"--output.dir={args.out}",
    ]
    return out + [f"--{s}" for s in args.set]


def report(records: list[dict[str, Any]], args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Medians over the measured steps (the first `warmup` steps compile, allocate, warm up)."""
    measured = records[args.warmup :] or records

    def median(key: str) -> float | None:
        values = [r[key] for r in measured if key in r]
        return statistics.median(values) if values else None

    return {
        "shape": args.shape,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "devices": world,
        "layout": args.set,
        "steps_measured": len(measured),
        "tokens_per_s": median("tokens_per_s"),
        "tokens_per_s_per_device": median("tokens_per_s_per_device"),
        "step_time_s": median("step_time_s"),
        "mfu": median("mfu"),
        "peak_memory_gib": max(
            (r["peak_memory_gib"] for r in records if "peak_memory_gib" in r), default=None
        ),
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
    }


# -- SFT: the workload ------------------------------------------------------------------------

# What each engine of the SFT comparison is, in run order and in the report.
SFT_ENGINES = {
    "full": "parallm, full fine-tuning",
    "lora": "parallm, LoRA",
    "peer": "transformers + peft, LoRA",
    "padded": "parallm, padding instead of packing",
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def synthetic_conversations(
    n: int, turns: tuple[int, int], words: tuple[int, int], seed: int
) -> list[list[dict[str, str]]]:
    """`n` seeded conversations of pseudo-words: a system line, then a uniform number of
    user / assistant exchanges in `turns`, each message a uniform number of words in `words`.
    Words are Zipf-distributed over a fixed lexicon, so a BPE tokenizer finds merges."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    lexicon = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(3000)]
    zipf = 1.0 / np.arange(1, len(lexicon) + 1)
    zipf /= zipf.sum()

    def text(k: int) -> str:
        return " ".join(rng.choice(lexicon, size=k, p=zipf)) + "."

    convs = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(8)}]
        for _ in range(int(rng.integers(turns[0], turns[1] + 1))):
            for role in ("user", "assistant"):
                k = int(rng.integers(words[0], words[1] + 1))
                messages.append({"role": role, "content": text(k)})
        convs.append(messages)
    return convs


def sft_workload(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """The conversations (`.jsonl`) and a model directory: random weights of `--shape` and a
    BPE tokenizer trained on the conversations, with parallm's chat template."""
    import itertools

    from parallm.config import JobConfig, ModelConfig
    from parallm.models.build import init_weights
    from parallm.models.hf import save_pretrained
    from parallm.models.registry import family
    from parallm.tokenizer import DEFAULT_CHAT_TEMPLATE, train_bpe_tokenizer
    from parallm.utils.fs import write_lines_atomic

    n = args.conversations or args.batch * (args.warmup + args.steps)
    convs = synthetic_conversations(n, args.turns, args.words, args.seed)
    data = out / "data" / "conversations.jsonl"
    write_lines_atomic(data, [json.dumps({"messages": m}) for m in convs])
    mcfg = ModelConfig(**SHAPES[args.shape])
    texts = itertools.chain((m["content"] for c in convs for m in c), ["<|user|> <|assistant|>"])
    tok = train_bpe_tokenizer(texts, mcfg.vocab_size)
    tok.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    spec = family(mcfg.architecture)
    margs = spec.args_from_config(JobConfig(model=mcfg), mcfg.vocab_size)
    margs.bos_token_id, margs.eos_token_id = tok.bos_token_id, tok.eos_token_id
    margs.pad_token_id = tok.pad_token_id
    model = spec.build(margs, device="cpu")
    init_weights(model, args.seed)
    save_pretrained(model, out / "model", tokenizer=tok)
    return data, out / "model"


# -- SFT: rounds of fresh processes, the report -----------------------------------------------

METRICS = (
    "tokens_per_s",
    "label_tokens_per_s",
    "tokens_per_cpu_s",
    "label_tokens_per_cpu_s",
    "step_time_s",
    "peak_memory_mib",
    "training_memory_mib",
)


def spawn(run: SftRun) -> dict[str, Any]:
    """Run `run` in a fresh Python process (its output in `run.log`); its result."""
    import subprocess

    from parallm.errors import UserError
    from parallm.utils.fs import write_json_atomic

    out = Path(run.out)
    write_json_atomic(out / "run.json", asdict(run))
    cmd = [sys.executable, "-m", "parallm.bench.train_peer", "--worker", str(out / "run.json")]
    with (out / "run.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = (out / "run.log").read_text().strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise UserError(f"{run.engine} (round {run.round + 1}) failed: see {out / 'run.log'}")
    return json.loads((out / "result.json").read_text())


def row_stats(model_dir: Path, data: Path, seq_len: int, seed: int) -> dict[str, Any]:
    """Lengths of the conversations and how full packed and padded rows are."""
    import numpy as np

    from parallm.config import DataConfig, TaskConfig
    from parallm.tokenizer import Tokenizer
    from parallm.train.tasks import make_task
    from parallm.train.tasks.sft import IDS, read_conversations, tokenize_conversation

    tok = Tokenizer.from_dir(model_dir)
    lengths = [len(tokenize_conversation(tok, m, w)[0]) for w, m in read_conversations(data)]
    out: dict[str, Any] = {
        "conversations": len(lengths),
        "conversation_tokens": {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        },
    }
    for packing in (True, False):
        task = make_task(TaskConfig(name="sft", packing=packing), tokenizer=tok)
        rows = task.dataset([data], DataConfig(seq_len=seq_len, shuffle=False), seed=seed).rows
        labels = task.batch(torch_rows(rows)).loss_mask
        name = "packed" if packing else "padded"
        out[f"rows_{name}"] = len(rows)
        # A row is filled up to where its padding starts (the last document's tokens are pad).
        pad = tok.pad_token_id
        out[f"fill_{name}"] = float(np.mean(rows[:, IDS, :-1] != pad))
        out[f"label_share_{name}"] = float(labels.float().mean())
    return out


def torch_rows(rows):
    import torch

    return torch.from_numpy(rows)


def ratio(runs: dict[str, list[dict]], num: str, den: str, key: str) -> dict[str, Any]:
    """`num` over `den` on `key`: per round (the two ran next to each other) and the median.
    A round whose denominator is 0 (a tiny run's training memory can round to nothing) has no
    ratio (None); the median is over the others (None if there are none)."""
    per_round = [
        a[key] / b[key] if b[key] else None for a, b in zip(runs[num], runs[den], strict=True)
    ]
    valid = [r for r in per_round if r is not None]
    return {"per_round": per_round, "median": statistics.median(valid) if valid else None}


def sft_report(runs: dict[str, list[dict]], meta: dict[str, Any]) -> dict[str, Any]:
    engines = {
        e: {
            "what": SFT_ENGINES[e],
            "median": {k: statistics.median(r[k] for r in rs) for k in METRICS},
            "runs": rs,
        }
        for e, rs in runs.items()
    }
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    if "lora" in runs:
        keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_memory_mib")
        ratios["lora_vs_full"] = {k: ratio(runs, "lora", "full", k) for k in keys}
    if "peer" in runs:
        keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_memory_mib", "training_memory_mib")
        ratios["lora_vs_peer"] = {k: ratio(runs, "lora", "peer", k) for k in keys}
        for k, op, bound in (
            ("tokens_per_s", ">=", 1.2),
            ("tokens_per_cpu_s", ">=", 1.2),
            ("peak_memory_mib", "<=", 1.0),
        ):
            value = ratios["lora_vs_peer"][k]["median"]
            met = value is not None and (value >= bound if op == ">=" else value <= bound)
            targets[f"lora_vs_peer.{k} {op} {bound}"] = {"median": value, "met": met}
    packed = "lora" if "lora" in runs else "full"
    keys = ("label_tokens_per_s", "label_tokens_per_cpu_s")
    ratios["packing_vs_padding"] = {k: ratio(runs, packed, "padded", k) for k in keys}
    for k in keys:
        value = ratios["packing_vs_padding"][k]["median"]
        met = value is not None and value >= 1.5
        targets[f"packing_vs_padding.{k} >= 1.5"] = {"median": value, "met": met}
    return {**meta, "engines": engines, "ratios": ratios, "targets": targets}


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_sft(report: dict[str, Any]) -> str:
    w, lo = report["workload"], report["lora"]
    lines = [
        f"sft: {report['shape']} ({report['parameters'] / 1e6:.2f}M parameters) on "
        f"{report['device']}, {w['rounds']} rounds of {w['warmup']} + {w['steps']} steps, "
        f"batch {w['batch']} x {w['seq_len']} tokens"
        + (f"; LoRA r={lo['r']} alpha={lo['alpha']} on {','.join(lo['targets'])}" if lo else ""),
        f"conversations: {w['conversations']}, {w['conversation_tokens']['min']}-"
        f"{w['conversation_tokens']['max']} tokens (median {w['conversation_tokens']['median']}); "
        f"rows filled {w['fill_packed']:.0%} packed, {w['fill_padded']:.0%} padded",
        "tokens/s: every input position of a row (batch x seq_len, padding included); "
        "label tok/s: positions with a label (assistant tokens)",
        "",
        f"{'engine':<38}{'tokens/s':>10}{'label tok/s':>12}{'tok/CPU-s':>11}{'step s':>8}"
        f"{'peak MiB':>10}{'(training)':>11}  loss first -> last",
    ]
    for info in report["engines"].values():
        m, r0 = info["median"], info["runs"][0]
        lines.append(
            f"{info['what']:<38}{m['tokens_per_s']:>10.0f}{m['label_tokens_per_s']:>12.0f}"
            f"{m['tokens_per_cpu_s']:>11.0f}{m['step_time_s']:>8.3f}{m['peak_memory_mib']:>10.0f}"
            f"{m['training_memory_mib']:>11.0f}  {r0['loss_first']:.4f} -> {r0['loss_last']:.4f}"
        )
    lines += ["", "ratios, median of per-round ratios (each round: the engines side by side):"]
    for name, keys in report["ratios"].items():
        parts = []
        for k, v in keys.items():
            rounds = ", ".join(_times(x) for x in v["per_round"])
            parts.append(f"{k} {_times(v['median'])}x ({rounds})")
        lines.append(f"  {name}: " + "; ".join(parts))
    lines += ["", "targets:"]
    for name, t in report["targets"].items():
        lines.append(f"  {name}: {_times(t['median'])} {'met' if t['met'] else 'NOT met'}")
    lines.append(f"load average (1 min) during the runs: {report['machine']['load_1min']}")
    return "\n".join(lines)


def save_sft_chart(report: dict[str, Any], path: Path) -> None:
    """Bars of each engine's medians (tokens/s, per CPU-second, label tokens/s, peak memory),
    each round a dot; written through a temporary name."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = report["engines"]
    panels = (
        ("tokens_per_s", "tokens/s (all row positions)"),
        ("tokens_per_cpu_s", "tokens per CPU-second"),
        ("label_tokens_per_s", "label tokens/s (assistant)"),
        ("peak_memory_mib", "peak memory (MiB)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5))
    for ax, (key, title) in zip(axes, panels, strict=True):
        names = list(engines)
        ax.bar(range(len(names)), [engines[e]["median"][key] for e in names], color="#8ab")
        for i, e in enumerate(names):
            values = [r[key] for r in engines[e]["runs"]]
            ax.plot([i] * len(values), values, "k.", alpha=0.6)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"SFT on {report['shape']}, {report['device']}: medians of interleaved rounds")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def check_sft_args(args: argparse.Namespace) -> bool:
    """One-line errors before anything is made; whether the peer runs."""
    import importlib.util

    from parallm.errors import UserError

    if args.nproc != 1:
        raise UserError("--nproc: --task sft runs one process per engine; leave --nproc at 1")
    for name in ("rounds", "steps", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: {getattr(args, name)} is not valid; must be >= 1")
    if args.batch % (args.micro_batch or args.batch):
        raise UserError(f"--micro-batch: {args.micro_batch} must divide --batch {args.batch}")
    if args.lora < 0:
        raise UserError(f"--lora: {args.lora} is not valid; give a rank >= 1 (0: no LoRA)")
    peer = args.lora > 0 and not args.no_peer
    if peer and not all(importlib.util.find_spec(m) for m in ("transformers", "peft")):
        raise UserError("--lora: the peer needs transformers and peft; install them or --no-peer")
    return peer


def run_rounds(
    base: SftRun, engines: list[str], rounds: int
) -> tuple[dict[str, list[dict]], list[float]]:
    """Every engine once per round, each in a fresh process, the order rotated by one per round
    (no engine always runs first, after the workload is made, or after the same neighbour);
    the results by engine, and the machine's load at each run in the order they ran."""
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    loads = []
    for r in range(rounds):
        for engine in engines[r % len(engines) :] + engines[: r % len(engines)]:
            run = replace(
                base,
                engine=engine,
                round=r,
                packing=engine != "padded",
                lora_r=0 if engine == "full" else base.lora_r,
                out=str(Path(base.out) / "runs" / f"{r}-{engine}"),
            )
            result = spawn(run)
            runs[engine].append(result)
            loads.append(result["load_1min"])
            print(
                f"round {r + 1}/{rounds} {engine:<7} {result['tokens_per_s']:9.0f} tok/s "
                f"{result['tokens_per_cpu_s']:9.0f} tok/CPU-s  peak {result['peak_memory_mib']:.0f} "
                f"MiB  load {result['load_1min']:.2f}",
                flush=True,
            )
    return runs, loads


def sft_meta(args: argparse.Namespace, base: SftRun, peer: bool, loads: list[float]) -> dict:
    """What was measured, on what: the report's fields beside the engines."""
    import os
    import platform

    import torch

    from parallm.models.hf import read_family

    spec, margs = read_family(base.model_dir)
    versions = {"torch": torch.__version__}
    if peer:
        import peft
        import transformers

        versions |= {"transformers": transformers.__version__, "peft": peft.__version__}
    lora = {"r": args.lora, "alpha": base.lora_alpha, "targets": base.targets}
    return {
        "task": "sft",
        "shape": args.shape,
        "parameters": spec.facts(margs).num_params,
        "device": base.device,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_1min": [round(x, 2) for x in loads],
            **versions,
        },
        "tokens_counted": (
            "tokens_per_s: every input position of a row, batch x seq_len per step (padding "
            "included); label_tokens_per_s: positions with a label (assistant tokens)"
        ),
        "memory": "peak RSS of the run's process"
        if base.device == "cpu"
        else "max_memory_allocated",
        "workload": {
            "seq_len": args.seq_len,
            "batch": args.batch,
            "micro_batch": base.micro_batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "seed": args.seed,
            "turns": list(args.turns),
            "words": list(args.words),
            **row_stats(Path(base.model_dir), Path(base.data), args.seq_len, args.seed),
        },
        "lora": lora if args.lora else None,
    }


def sft_main(args: argparse.Namespace) -> int:
    """Make the workload, run the engines interleaved in fresh processes, report."""
    import importlib.util

    import torch

    peer = check_sft_args(args)
    out = Path(args.out)
    data, model_dir = sft_workload(args, out)
    targets = ALL_LINEAR if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    base = SftRun(
        engine="",
        round=0,
        model_dir=str(model_dir),
        data=str(data),
        seq_len=args.seq_len,
        batch=args.batch,
        micro_batch=args.micro_batch or args.batch,
        warmup=args.warmup,
        steps=args.steps,
        packing=True,
        lora_r=args.lora,
        lora_alpha=args.lora_alpha or 2.0 * args.lora,
        targets=list(targets),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        threads=args.threads,
        seed=args.seed,
        sets=list(args.set),
        out=str(out),
    )
    engines = ["full", *(["lora"] if args.lora else []), *(["peer"] if peer else []), "padded"]
    runs, loads = run_rounds(base, engines, args.rounds)
    report = sft_report(runs, sft_meta(args, base, peer, loads))
    print(format_sft(report), flush=True)
    save_report(report, out)
    if importlib.util.find_spec("matplotlib"):
        save_sft_chart(report, out / "report.png")
        print(f"saved {out / 'report.png'}", flush=True)
    return 0


# -- command line -----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallm bench train", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pretrain", choices=("pretrain", "sft"))
    p.add_argument("--shape", default="tiny", help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="per forward (0: each data-parallel rank's share)",
    )
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="any job override, e.g. parallel.tp=2 or parallel.activation_checkpoint=full "
        "(sft: parallm's jobs; the peer takes their train.* settings)",
    )  # fmt: skip
    p.add_argument("--out", default="runs/bench/train", help="output directory (report.json)")
    sft = p.add_argument_group("sft")
    sft.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning only)")
    sft.add_argument("--lora-alpha", type=float, default=0.0, help="default: 2 x rank")
    sft.add_argument(
        "--lora-targets", default="all-linear", help="all-linear or module names, comma-separated"
    )
    sft.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every engine")
    sft.add_argument("--conversations", type=int, default=0, help="0: batch x (warmup + steps)")
    sft.add_argument("--turns", default="1:4", help="N or LOW:HIGH exchanges per conversation")
    sft.add_argument("--words", default="4:64", help="N or LOW:HIGH words per message")
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    sft.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (0: torch's default)"
    )
    sft.add_argument("--no-peer", action="store_true", help="skip transformers + peft")
    return p


def preflight_job(args: argparse.Namespace, world_size: int):
    """The pretraining job's checks that need no rank (`train.preflight`): one line, exit 2,
    before any rank starts or waits on another."""
    from parallm.config import JobConfig, load_config
    from parallm.errors import UserError
    from parallm.train.preflight import preflight

    if args.micro_batch < 0:
        raise UserError(f"--micro-batch: {args.micro_batch} is not valid; >= 1, or 0 (auto)")
    cfg = load_config(JobConfig, None, bench_overrides(args))
    preflight(cfg, world_size, resume="never")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on this process (pretrain under an agent: on every rank)."""
    args = parser().parse_args(argv)
    if args.task == "sft":
        from parallm.bench import parse_len_range
        from parallm.errors import UserError

        if args.shape not in SHAPES:
            raise UserError(f"--shape: {args.shape!r} is not known; valid: {', '.join(SHAPES)}")
        args.turns = parse_len_range(args.turns, "--turns")
        args.words = parse_len_range(args.words, "--words")
        return sft_main(args)
    return pretrain_main(args)


def pretrain_main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from parallm.distributed.launch import init_distributed, launched_world_size
    from parallm.train.trainer import Trainer

    cfg = preflight_job(args, launched_world_size())
    local_rank = init_distributed(cfg.parallel.timeout_s)
    trainer = Trainer(cfg, resume="never", local_rank=local_rank)  # a measurement starts afresh
    records = trainer.fit()
    if trainer.rank == 0:
        result = report(records, args, trainer.world)
        save_report(result, args.out, show=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # a rank started by `parallm bench train --nproc N`
    from parallm.distributed.launch import leave, rank_main

    leave(rank_main(main))
