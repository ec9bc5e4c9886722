"""`parallm bench infer`: an offline throughput workload, parallm against a peer engine.

The workload is the one the serving engines of this field publish: N requests of random prompt
token ids, prompt and output lengths drawn uniformly from the given ranges, every request
generating exactly its output length (EOS ignored), sampled at temperature 1. The peer
(`--peer`) runs the same requests on the same weights, dtype and thread count:

- `transformers`: `generate` in batches of `--hf-batch` left-padded prompts (each batch
  generating its longest requested output; only requested tokens count), in this Python;
- `vllm`: vLLM's offline `LLM.generate` on the prompts' token ids (compiled unless
  `--peer-eager`), in the Python of another environment (`--peer-python`, default
  `.venv-peers/bin/python`; `make bench-peers` creates it);
- `none`: parallm alone.

Every round runs each engine in a fresh process, the order alternating between rounds
(`--rounds`). Reported per engine: medians of output and total tokens/s, seconds and CPU seconds
(the process and its children); per round the ratio of parallm's output tokens/s to the peer's
and their median; and greedy token equality (temperature 0, float32) between parallm and the
peer on the first `--greedy-check` requests. A round whose peer crashes is reported as failed;
parallm's figures still come out. Printed, saved as JSON (report.json) and as a bar chart
(report.png, with matplotlib).

`--latency`: batch-1 greedy decode (default: a 128-token prompt, 128 tokens) of parallm,
`transformers` and, with `--peer vllm`, vLLM, in the same rounds: per-token decode latency
((full generation - 1-token generation) / (tokens - 1)), tokens/s, CPU seconds per token.

    parallm bench infer --shape 20m --num-requests 64 --input-len 16:256 --output-len 16:256 \\
        --peer vllm --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parallm.bench import parse_len_range, save_report
from parallm.bench.train import SHAPES
from parallm.errors import UserError

if TYPE_CHECKING:
    import torch

# A ~20M-parameter Llama for CPU runs (the inference issue's CPU target).
INFER_SHAPES = {
    **SHAPES,
    "20m": dict(
        dim=384,
        n_layers=8,
        n_heads=6,
        n_kv_heads=2,
        ffn_dim=1024,
        vocab_size=16384,
        tie_embeddings=True,
        max_seq_len=2048,
    ),
}
PEERS = ("transformers", "vllm", "none")
PEER_WORKER = Path(__file__).parent / "peers" / "peer_worker.py"
DEFAULT_PEER_PYTHON = Path(".venv-peers/bin/python")
KV_CACHE_BYTES = 1 << 30  # parallm's CPU default (at most 1 GiB), given to vLLM too


def random_model_dir(shape: str, out: Path, dtype: torch.dtype) -> Path:
    """A HF directory with random weights of `shape` (made once, then reused)."""
    from parallm.config import JobConfig, ModelConfig
    from parallm.models.build import init_weights
    from parallm.models.hf import save_pretrained
    from parallm.models.registry import family
    from parallm.tokenizer import train_bpe_tokenizer

    if shape not in INFER_SHAPES:
        raise UserError(f"--shape: {shape!r} is not known; valid: {', '.join(INFER_SHAPES)}")
    d = out / f"model-{shape}"
    if (d / "config.json").exists():
        return d
    # The shapes are `[model]` fields, as `bench train` uses them.
    mcfg = ModelConfig(**INFER_SHAPES[shape])
    spec = family(mcfg.architecture)
    model = spec.build(spec.args_from_config(JobConfig(model=mcfg), mcfg.vocab_size), device="cpu")
    init_weights(model, 0)
    # The prompts are random ids, so any tokenizer serves; ids it lacks decode to nothing.
    tokenizer = train_bpe_tokenizer(iter(["def f(x):\n    return x + 1\n"] * 8), 300)
    save_pretrained(model.to(dtype), d, tokenizer=tokenizer)
    return d


def workload(n: int, vocab: int, inp: tuple[int, int], outp: tuple[int, int], seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts, outputs = [], []
    for _ in range(n):
        length = int(torch.randint(inp[0], inp[1] + 1, (1,), generator=g))
        prompts.append(torch.randint(0, vocab, (length,), generator=g).tolist())
        outputs.append(int(torch.randint(outp[0], outp[1] + 1, (1,), generator=g)))
    return prompts, outputs


# -- one engine's run in a fresh process --------------------------------------------------------


@dataclass(kw_only=True)
class EngineRun:
    """One engine's run, as `peers/peer_worker.py` and `--worker` read it (run.json)."""

    engine: str  # parallm | transformers | vllm
    mode: str  # throughput | latency
    round: int
    model_dir: str
    prompts: list[list[int]]
    outputs: list[int]
    dtype: str
    device: str
    threads: int
    seed: int
    greedy_n: int
    eager: bool
    max_num_batched_tokens: int
    kv_cache_bytes: int
    hf_batch: int
    repeats: int  # latency: timed generations of each kind
    tensor_parallel_size: int
    out: str


def parallm_generate(run: EngineRun):
    """parallm's engine as `peer_worker`'s generate(prompts, outputs, greedy) -> token ids."""
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams

    llm = LLM(
        run.model_dir,
        tensor_parallel_size=run.tensor_parallel_size,
        dtype=run.dtype,
        device=None if run.device == "cpu" else run.device,
        max_num_batched_tokens=run.max_num_batched_tokens,
    )

    def generate(prompts, outputs, greedy):
        temperature = 0.0 if greedy else 1.0
        params = [
            SamplingParams(max_tokens=o, temperature=temperature, ignore_eos=True) for o in outputs
        ]
        return [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params)]

    return llm, generate


def worker_main(path: Path) -> int:
    """`python -m parallm.bench.infer --worker RUN_JSON`: parallm's run (a peer's runs in
    `peer_worker.py`, with the same measuring functions)."""
    import torch

    from parallm.bench.peers import peer_worker
    from parallm.utils.fs import write_json_atomic

    run = EngineRun(**json.loads(path.read_text()))
    torch.set_num_threads(run.threads)
    load = peer_worker.load_1min()
    llm, generate = parallm_generate(run)
    measure = peer_worker.throughput if run.mode == "throughput" else peer_worker.latency
    result = {
        "engine": run.engine,
        "version": "parallm",
        "mode": run.mode,
        "round": run.round,
        "threads": torch.get_num_threads(),
        **measure(generate, asdict(run)),
    }
    llm.close()
    result["load_1min"] = [load, peer_worker.load_1min()]
    write_json_atomic(Path(run.out) / "result.json", result)
    return 0


def spawn(run: EngineRun, python: str) -> dict[str, Any]:
    """Run `run` in a fresh process of `python` (output in run.log); its result, or for a run
    that failed {"failed": the last line of its log, "log": path}: never raises for the run."""
    from parallm.utils.fs import write_json_atomic

    out = Path(run.out)
    (out / "result.json").unlink(missing_ok=True)
    write_json_atomic(out / "run.json", asdict(run))
    if run.engine == "parallm":
        cmd = [python, "-m", "parallm.bench.infer", "--worker", str(out / "run.json")]
    else:
        cmd = [python, str(PEER_WORKER), str(out / "run.json")]
    env = dict(os.environ, OMP_NUM_THREADS=str(run.threads))
    # vLLM's CPU backend pins its OpenMP threads (by default one core per NUMA node, another
    # reserved): unpinned, it runs `threads` threads as parallm and transformers do.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    with (out / "run.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc == 0 and (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    lines = [x for x in (out / "run.log").read_text().strip().splitlines() if x.strip()]
    last = lines[-1].strip() if lines else f"exit status {rc}, no output"
    return {
        "engine": run.engine,
        "round": run.round,
        "failed": last[:300],
        "log": str(out / "run.log"),
    }


def check_peer_python(peer: str, given: str | None) -> str:
    """The Python that runs `peer`: this one for transformers; for vLLM `given` (or
    .venv-peers/bin/python) if it can import vllm. A UserError saying how to create it
    otherwise, before anything runs."""
    if peer != "vllm":
        return sys.executable
    python = Path(given) if given else DEFAULT_PEER_PYTHON
    how = "create one with `make bench-peers` (or give --peer-python PATH)"
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UserError(f"--peer-python: {str(python)!r} is not a Python executable; {how}")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        ok = (
            subprocess.run([str(python), "-c", probe], capture_output=True, timeout=120).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise UserError(f"--peer-python: {str(python)!r} cannot import vllm; {how}")
    return str(python.absolute()) if not given else str(python)


# -- the report ---------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def throughput_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's medians over its rounds that did not fail, and the per-round values."""

    def per_round(f) -> list[float | None]:
        return [None if "failed" in r else f(r) for r in results]

    rounds = {
        "output_tokens_per_s": per_round(lambda r: r["output_tokens"] / r["seconds"]),
        "total_tokens_per_s": per_round(
            lambda r: (r["output_tokens"] + r["input_tokens"]) / r["seconds"]
        ),
        "seconds": per_round(lambda r: r["seconds"]),
        "cpu_s": per_round(lambda r: r["cpu_s"]),
        "output_tokens_per_cpu_s": per_round(
            lambda r: r["output_tokens"] / r["cpu_s"] if r["cpu_s"] else None
        ),
    }
    return {
        **{k: _median(v) for k, v in rounds.items()},
        "per_round": rounds,
        "failed_rounds": [
            {"round": r["round"], "error": r["failed"], "log": r["log"]}
            for r in results
            if "failed" in r
        ],
        "version": next((r["version"] for r in results if "version" in r), None),
        "load_1min": [r.get("load_1min") for r in results],
    }


def greedy_equality(
    ours: dict[str, Any] | None, peer: dict[str, Any] | None
) -> dict[str, Any] | None:
    """How many of the greedy requests both engines generated token for token alike, and the
    first position where each of the others differs."""
    if not ours or not peer or "failed" in ours or "failed" in peer:
        return None
    a, b = ours["greedy"], peer["greedy"]
    first = [
        next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), None)
        for p, q in zip(a, b, strict=True)
    ]
    return {
        "requests": len(a),
        "equal": sum(i is None for i in first),
        "first_difference": first,
        "tokens_compared": sum(len(p) for p in a),
    }


def throughput_report(runs: dict[str, list[dict[str, Any]]], peer: str) -> dict[str, Any]:
    out: dict[str, Any] = {e: throughput_figures(rs) for e, rs in runs.items()}
    if peer != "none":
        per_round = [
            None
            if "failed" in a or "failed" in b
            else (b["seconds"] / b["output_tokens"]) / (a["seconds"] / a["output_tokens"])
            for a, b in zip(runs["parallm"], runs[peer], strict=True)
        ]
        out["ratio_output_tokens_per_s"] = {"per_round": per_round, "median": _median(per_round)}
        cpu = out["parallm"]["output_tokens_per_cpu_s"], out[peer]["output_tokens_per_cpu_s"]
        out["ratio_output_tokens_per_cpu_s"] = (
            cpu[0] / cpu[1] if None not in cpu and cpu[1] else None
        )
        out["greedy_equality"] = greedy_equality(runs["parallm"][0], runs[peer][0])
    return out


def latency_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if "failed" not in r]
    if not ok:
        return {"failed_rounds": [{"round": r["round"], "error": r["failed"]} for r in results]}
    n = ok[0]["output_tokens"]
    full = statistics.median(t for r in ok for t in r["full_s"])
    prefill = statistics.median(t for r in ok for t in r["prefill_s"])
    return {
        "output_tokens": n,
        "full_s": full,
        "prefill_s": prefill,
        "per_token_ms": (full - prefill) / max(n - 1, 1) * 1000,
        "tokens_per_s": n / full,
        "cpu_s_per_token": statistics.median(r["cpu_s_per_run"] for r in ok) / n,
        "full_s_per_round": [
            None if "failed" in r else statistics.median(r["full_s"]) for r in results
        ],
        "failed_rounds": [
            {"round": r["round"], "error": r["failed"]} for r in results if "failed" in r
        ],
        "version": ok[0]["version"],
        "load_1min": [r.get("load_1min") for r in results],
    }


def latency_report(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {e: latency_figures(rs) for e, rs in runs.items()}
    ours = out["parallm"].get("tokens_per_s")
    for e in runs:
        theirs = out[e].get("tokens_per_s")
        if e != "parallm" and ours and theirs:
            out[f"ratio_tokens_per_s_vs_{e}"] = ours / theirs
            out[f"greedy_equal_{e}"] = runs["parallm"][0].get("greedy") == runs[e][0].get("greedy")
    return out


def format_report(r: dict[str, Any], engines: list[str], latency: bool) -> str:
    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    lines = []
    if latency:
        lines.append(
            f"{'engine':<13}{'ms/token':>10}{'tok/s':>9}{'prefill ms':>12}{'CPU s/token':>13}"
        )
        for e in engines:
            x = r[e]
            lines.append(
                f"{e:<13}{f(x.get('per_token_ms'), '.2f'):>10}{f(x.get('tokens_per_s')):>9}"
                f"{f(x.get('prefill_s') and x['prefill_s'] * 1000):>12}{f(x.get('cpu_s_per_token'), '.4f'):>13}"
            )
        lines += [
            f"parallm / {e}: {r[f'ratio_tokens_per_s_vs_{e}']:.2f}x tokens/s, greedy tokens equal: {r[f'greedy_equal_{e}']}"
            for e in engines
            if f"ratio_tokens_per_s_vs_{e}" in r
        ]
    else:
        lines.append(
            f"{'engine':<13}{'out tok/s':>10}{'total tok/s':>12}{'seconds':>9}{'CPU s':>8}{'out tok/CPU s':>15}"
        )
        for e in engines:
            x = r[e]
            lines.append(
                f"{e:<13}{f(x['output_tokens_per_s']):>10}{f(x['total_tokens_per_s']):>12}{f(x['seconds'], '.2f'):>9}"
                f"{f(x['cpu_s']):>8}{f(x['output_tokens_per_cpu_s']):>15}"
            )
        if "ratio_output_tokens_per_s" in r:
            ratio = r["ratio_output_tokens_per_s"]
            rounds = ", ".join(f(x, ".2f") for x in ratio["per_round"])
            lines.append(
                f"parallm / {engines[1]} output tok/s: {f(ratio['median'], '.2f')}x median ({rounds})"
            )
            g = r["greedy_equality"]
            if g:
                lines.append(
                    f"greedy tokens equal on {g['equal']} of {g['requests']} requests ({g['tokens_compared']} tokens)"
                )
    for e in engines:
        for fr in r[e].get("failed_rounds", []):
            lines.append(f"{e} round {fr['round'] + 1} FAILED: {fr['error']}")
    return "\n".join(lines)


def save_chart(r: dict[str, Any], engines: list[str], latency: bool, path: Path) -> Path | None:
    """Bars per engine (medians) with each round's value as a point; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from parallm.utils.fs import save_figure_atomic

    keys = (
        [("tokens_per_s", "tokens/s (batch 1)")]
        if latency
        else [("output_tokens_per_s", "output tokens/s"), ("total_tokens_per_s", "total tokens/s")]
    )
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        values = [r[e].get(key) or 0.0 for e in engines]
        ax.bar(engines, values, color=["tab:blue", "tab:orange", "tab:green"][: len(engines)])
        for i, e in enumerate(engines):
            pts = r[e].get("per_round", {}).get(key, [])
            ax.plot([i] * len(pts), [p for p in pts], "k.", alpha=0.6)
            ax.annotate(f"{values[i]:.0f}", (i, values[i]), ha="center", va="bottom")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("batch-1 greedy decode" if latency else "offline throughput (median of rounds)")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return path


# -- command line -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallm bench infer", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a HF directory (default: random --shape)")
    p.add_argument("--shape", default="20m", help=f"random weights: {', '.join(INFER_SHAPES)}")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument(
        "--input-len",
        default=None,
        help="N or LOW:HIGH prompt tokens (default 16:256; --latency 128)",
    )
    p.add_argument(
        "--output-len",
        default=None,
        help="N or LOW:HIGH generated tokens (default 16:256; --latency 128)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the model's)")
    p.add_argument("--device", default=None, help="cpu | cuda")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--peer", default="transformers", help=f"the engine to compare with: {' | '.join(PEERS)}"
    )
    p.add_argument(
        "--peer-python",
        default=None,
        help=f"the peer's Python (vllm; default {DEFAULT_PEER_PYTHON})",
    )
    p.add_argument(
        "--peer-eager", action="store_true", help="vLLM in eager mode (default: compiled)"
    )
    p.add_argument("--hf-batch", type=int, default=16, help="transformers batch size")
    p.add_argument("--no-hf", action="store_true", help="parallm alone (same as --peer none)")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds, each engine in a fresh process"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads of every engine (0: torch's default)"
    )
    p.add_argument(
        "--greedy-check",
        type=int,
        default=8,
        metavar="N",
        help="greedy token equality on the first N requests",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="batch-1 greedy decode: parallm, transformers, the peer",
    )
    p.add_argument("--repeats", type=int, default=5, help="--latency: timed generations per round")
    p.add_argument(
        "--out", default="runs/bench/infer", help="output directory (report.json, report.png)"
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """Every option's one-line error, before torch or any run."""
    if args.no_hf:
        args.peer = "none"
    if args.peer not in PEERS:
        raise UserError(f"--peer: {args.peer!r} is not valid; valid: {', '.join(PEERS)}")
    for name in ("num_requests", "rounds", "repeats", "max_num_batched_tokens", "hf_batch"):
        if getattr(args, name) < 1:
            raise UserError(
                f"--{name.replace('_', '-')}: {getattr(args, name)} is not valid; must be >= 1"
            )
    for name in ("threads", "greedy_check"):
        if getattr(args, name) < 0:
            raise UserError(
                f"--{name.replace('_', '-')}: {getattr(args, name)} is not valid; must be >= 0"
            )
    default = "128" if args.latency else "16:256"
    args.input_len = parse_len_range(args.input_len or default, "--input-len")
    args.output_len = parse_len_range(args.output_len or default, "--output-len")
    if args.peer_python and args.peer != "vllm":
        raise UserError(
            f"--peer-python: only --peer vllm runs in another Python (--peer is {args.peer})"
        )


def main(argv: list[str] | None = None) -> int:
    # Options and the peer's Python are checked before torch is imported or anything runs.
    args = parser().parse_args(argv)
    check_args(args)
    peer_python = check_peer_python(args.peer, args.peer_python)
    import torch

    from parallm.models.hf import read_family, resolve_dtype

    out = Path(args.out)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    model_dir = Path(args.model) if args.model else random_model_dir(args.shape, out, dtype)
    spec, margs = read_family(model_dir)
    facts = spec.facts(margs)
    n = 1 if args.latency else args.num_requests
    prompts, outputs = workload(n, facts.vocab_size, args.input_len, args.output_len, args.seed)
    threads = args.threads or torch.get_num_threads()
    engines = ["parallm"] + (
        ["transformers"] if args.latency and args.peer != "transformers" else []
    )
    engines += [] if args.peer == "none" else [args.peer]
    pythons = {"parallm": sys.executable, "transformers": sys.executable, "vllm": peer_python}
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for k in range(args.rounds):
        for engine in engines if k % 2 == 0 else engines[::-1]:
            run = EngineRun(
                engine=engine,
                mode="latency" if args.latency else "throughput",
                round=k,
                model_dir=str(model_dir.absolute()),
                prompts=prompts,
                outputs=outputs,
                dtype=str(dtype).removeprefix("torch."),
                device=args.device or "cpu",
                threads=threads,
                seed=args.seed,
                greedy_n=args.greedy_check if k == 0 else 0,
                eager=args.peer_eager,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_bytes=KV_CACHE_BYTES,
                hf_batch=args.hf_batch,
                repeats=args.repeats,
                tensor_parallel_size=args.tensor_parallel_size,
                out=str((out / f"round{k}-{engine}").absolute()),
            )
            Path(run.out).mkdir(parents=True, exist_ok=True)
            result = spawn(run, pythons[engine])
            runs[engine].append(result)
            what = result.get("failed") or (
                f"{result['output_tokens'] / statistics.median(result['full_s']):.1f} tok/s"
                if args.latency
                else f"{result['output_tokens'] / result['seconds']:.1f} output tok/s"
            )
            print(f"round {k + 1}/{args.rounds} {engine}: {what}", flush=True)
    if all("failed" in r for r in runs["parallm"]):
        first = runs["parallm"][0]
        raise UserError(
            f"bench infer: every parallm round failed; first: {first['failed']} (see {first['log']})"
        )
    body = latency_report(runs) if args.latency else throughput_report(runs, args.peer)
    result: dict[str, Any] = {
        "mode": "latency" if args.latency else "throughput",
        "model": str(model_dir),
        "parameters": facts.num_params,
        "num_requests": n,
        "input_len": list(args.input_len),
        "output_len": list(args.output_len),
        "dtype": str(dtype).removeprefix("torch."),
        "device": args.device or "cpu",
        "tensor_parallel_size": args.tensor_parallel_size,
        "threads": threads,
        "rounds": args.rounds,
        "peer": args.peer,
        "peer_mode": ("eager" if args.peer_eager else "compiled") if args.peer == "vllm" else None,
        "peer_python": peer_python if args.peer == "vllm" else None,
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        **body,
    }
    print(format_report(result, engines, args.latency), flush=True)
    save_report(result, out)
    chart = save_chart(result, engines, args.latency, out / "report.png")
    print(
        f"saved {chart}"
        if chart
        else "matplotlib is not installed: no chart (pip install matplotlib)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(Path(sys.argv[2])))
    sys.exit(main())
