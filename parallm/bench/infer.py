"""`parallm bench infer`: an offline throughput workload, parallm against `transformers`.

The workload is the one the serving engines of this field publish: N requests of random prompt
token ids, prompt and output lengths drawn uniformly from the given ranges, every request
generating exactly its output length (EOS ignored). The same requests run through parallm's
engine and, in the same process, through `transformers` `generate` on the same weights
(batches of `--hf-batch` left-padded prompts, each batch generating its longest requested
output; only requested tokens count). Reports output and total tokens/s for both and their
ratio, printed and saved as JSON.

    parallm bench infer --shape 20m --num-requests 64 --input-len 16:256 --output-len 16:256
"""

from __future__ import annotations

import argparse
import sys
import time
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
        dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1024, vocab_size=16384,
        tie_embeddings=True, max_seq_len=2048,
    ),
}  # fmt: skip


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


def run_parallm(model_dir: Path, prompts, outputs, args) -> float:
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams

    llm = LLM(
        model_dir,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        device=args.device,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    params = [
        SamplingParams(max_tokens=o, temperature=1.0, seed=i, ignore_eos=True)
        for i, o in enumerate(outputs)
    ]
    llm.generate(prompts[:2], params[:2])  # warm-up: allocation, first kernels
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    got = [len(r.outputs[0].token_ids) for r in results]
    assert got == outputs, "parallm generated a different number of tokens than requested"
    llm.close()
    return elapsed


def run_transformers(model_dir: Path, prompts, outputs, args) -> float:
    import torch
    import transformers

    device = args.device or "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=args.dtype)
    model = model.to(device).eval()
    pad = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), args.hf_batch):
            batch, outs = prompts[i : i + args.hf_batch], outputs[i : i + args.hf_batch]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = [[0] * (width - len(p)) + [1] * len(p) for p in batch]
            model.generate(
                ids,
                attention_mask=torch.tensor(mask, device=device),
                do_sample=True,
                top_k=0,
                max_new_tokens=max(outs),
                min_new_tokens=max(outs),
                pad_token_id=pad,
                eos_token_id=None,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallm bench infer", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a HF directory (default: random --shape)")
    p.add_argument("--shape", default="20m", help=f"random weights: {', '.join(INFER_SHAPES)}")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", default="16:256", help="N or LOW:HIGH prompt tokens")
    p.add_argument("--output-len", default="16:256", help="N or LOW:HIGH generated tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the model's)")
    p.add_argument("--device", default=None, help="cpu | cuda")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--hf-batch", type=int, default=16, help="transformers batch size")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers run")
    p.add_argument("--out", default="runs/bench/infer", help="output directory (report.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    # Options are checked before torch is imported: --help and their errors answer at once.
    args = parser().parse_args(argv)
    out = Path(args.out)
    inp, outp = (
        parse_len_range(args.input_len, "--input-len"),
        parse_len_range(args.output_len, "--output-len"),
    )
    if args.num_requests < 1:
        raise UserError(f"--num-requests: {args.num_requests} is not valid; must be >= 1")
    from parallm.models.hf import read_family, resolve_dtype

    dtype = resolve_dtype(args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    args.dtype = str(dtype).removeprefix("torch.")
    model_dir = Path(args.model) if args.model else random_model_dir(args.shape, out, dtype)
    spec, margs = read_family(model_dir)
    facts = spec.facts(margs)
    prompts, outputs = workload(args.num_requests, facts.vocab_size, inp, outp, args.seed)
    n_out, n_in = sum(outputs), sum(len(p) for p in prompts)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "parameters": facts.num_params,
        "num_requests": args.num_requests,
        "input_len": list(inp),
        "output_len": list(outp),
        "dtype": args.dtype,
        "device": args.device or "cpu",
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    t = run_parallm(model_dir, prompts, outputs, args)
    result["parallm"] = {
        "seconds": t,
        "output_tokens_per_s": n_out / t,
        "total_tokens_per_s": (n_in + n_out) / t,
    }
    print(
        f"parallm:      {n_out / t:10.1f} output tok/s  {(n_in + n_out) / t:10.1f} total tok/s",
        flush=True,
    )
    if not args.no_hf:
        t_hf = run_transformers(model_dir, prompts, outputs, args)
        result["transformers"] = {
            "seconds": t_hf,
            "output_tokens_per_s": n_out / t_hf,
            "total_tokens_per_s": (n_in + n_out) / t_hf,
            "batch": args.hf_batch,
        }
        result["ratio_output_tokens_per_s"] = t_hf / t
        print(
            f"transformers: {n_out / t_hf:10.1f} output tok/s  {(n_in + n_out) / t_hf:10.1f} total tok/s",
            flush=True,
        )
        print(f"ratio parallm / transformers: {t_hf / t:.2f}x", flush=True)
    save_report(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
