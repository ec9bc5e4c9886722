"""One peer engine's run of `parallm bench infer`, in the peer's own Python: vLLM's offline
`LLM.generate` or `transformers` `generate`, on the same requests parallm runs.

    PEER_PYTHON peer_worker.py RUN_JSON

RUN_JSON (written by `parallm.bench.infer`) names the engine, the mode, the model directory,
the requests (prompt token ids, output lengths), dtype, threads, and the `out` directory where
this writes `result.json`. Nothing of parallm is imported: the peer's environment (e.g.
`.venv-peers` from `make bench-peers`) need not have it. A failure exits non-zero with its
traceback on stderr; the caller records the round as failed.

Modes:
- `throughput`: a warm-up on two requests, then every request at once (timed, with the CPU
  seconds of this process and its children: vLLM's engine core and worker are processes of
  their own), sampled at temperature 1 with EOS ignored; then the first `greedy_n` requests again
  at temperature 0 (untimed), whose token ids the caller compares with parallm's.
- `latency`: one request at a time (batch 1), greedy: `repeats` times a 1-token generation
  (prefill) and `repeats` times the full output length, each after one untimed warm-up.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# -- CPU seconds of a process tree (Linux /proc; no psutil needed) ------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of `pid`, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of `root` (default: this process), every thread, and every
    living descendant process. 0.0 where /proc is missing (not Linux)."""
    root = os.getpid() if root is None else root
    stats = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (s := _stat(int(entry))) is not None:
            stats[int(entry)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats[pid][1] if pid in stats else 0.0
        todo.extend(children.get(pid, []))
    return total


def load_1min() -> float:
    return os.getloadavg()[0]


# -- vLLM ---------------------------------------------------------------------------------------


def vllm_engine(run: dict[str, Any]):
    """vLLM's offline engine on the run's model: the run's dtype, its prompts as token ids (no
    tokenizer), the same batching limits and KV bytes as parallm's CPU default (1 GiB), compiled
    unless `eager`."""
    from vllm import LLM

    return LLM(
        model=run["model_dir"],
        dtype=run["dtype"],
        enforce_eager=run["eager"],
        skip_tokenizer_init=True,
        seed=run["seed"],
        max_num_seqs=256,
        max_num_batched_tokens=run["max_num_batched_tokens"],
        # On the CPU backend this is the fraction of host memory it checks is free; the KV cache
        # itself is sized by kv_cache_memory_bytes.
        gpu_memory_utilization=0.2,
        kv_cache_memory_bytes=run["kv_cache_bytes"],
    )


def vllm_generate(
    llm, prompts: list[list[int]], outputs: list[int], greedy: bool
) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(max_tokens=o, temperature=0.0 if greedy else 1.0, ignore_eos=True)
        for o in outputs
    ]
    results = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
    )
    return [list(r.outputs[0].token_ids) for r in results]


# -- transformers -------------------------------------------------------------------------------


class HfRunner:
    """`transformers` generate on the run's model: batches of `hf_batch` left-padded prompts
    (each batch generates its longest requested output; only requested tokens count) sampled at
    temperature 1, or one prompt at a time greedily."""

    def __init__(self, run: dict[str, Any]) -> None:
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            run["model_dir"], dtype=getattr(torch, run["dtype"])
        ).eval()
        self.batch = run["hf_batch"]

    def generate(self, prompts, outputs, greedy: bool) -> list[list[int]]:
        torch, got = self.torch, []
        step = 1 if greedy else self.batch
        with torch.inference_mode():
            for i in range(0, len(prompts), step):
                batch, outs = prompts[i : i + step], outputs[i : i + step]
                width = max(len(p) for p in batch)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
                sampling = {"do_sample": False} if greedy else {"do_sample": True, "top_k": 0}
                new = self.model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=max(outs),
                    min_new_tokens=max(outs),
                    pad_token_id=0,
                    eos_token_id=None,
                    **sampling,
                )[:, width:]
                got += [row[:o].tolist() for row, o in zip(new, outs, strict=True)]
        return got


# -- the run ------------------------------------------------------------------------------------


def make_generate(run: dict[str, Any]):
    """(engine version, generate(prompts, outputs, greedy) -> token ids per request)."""
    if run["engine"] == "vllm":
        import vllm

        llm = vllm_engine(run)
        return vllm.__version__, lambda p, o, g: vllm_generate(llm, p, o, g)
    if run["engine"] == "transformers":
        import transformers

        return transformers.__version__, HfRunner(run).generate
    raise ValueError(f"engine {run['engine']!r}: this script runs vllm or transformers")


def throughput(generate, run: dict[str, Any]) -> dict[str, Any]:
    """Every request at once (timed, CPU seconds of the process tree), then the first
    `greedy_n` greedily; token counts are checked against the requested ones."""
    prompts, outputs = run["prompts"], run["outputs"]
    generate(prompts[:2], outputs[:2], False)  # warm-up: allocation, first kernels
    cpu, start = tree_cpu_seconds(), time.perf_counter()
    got = generate(prompts, outputs, False)
    seconds, cpu_s = time.perf_counter() - start, tree_cpu_seconds() - cpu
    lengths = [len(t) for t in got]
    if lengths != outputs:
        raise RuntimeError(f"generated {sum(lengths)} tokens, not the {sum(outputs)} requested")
    n = run["greedy_n"]
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "output_tokens": sum(outputs),
        "input_tokens": sum(len(p) for p in prompts),
        "greedy": generate(prompts[:n], outputs[:n], True) if n else [],
    }


def latency(generate, run: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 greedy: 1-token generations (prefill) and full ones, `repeats` each (CPU
    seconds over the full ones); the last full generation's tokens."""
    prompt, n = run["prompts"][:1], run["outputs"][:1]
    result: dict[str, Any] = {"prefill_s": [], "full_s": [], "output_tokens": n[0]}
    for key, outs in (("prefill_s", [1]), ("full_s", n)):
        generate(prompt, outs, True)  # warm-up
        cpu = tree_cpu_seconds()
        for _ in range(run["repeats"]):
            start = time.perf_counter()
            got = generate(prompt, outs, True)
            result[key].append(time.perf_counter() - start)
            if len(got[0]) != outs[0]:
                raise RuntimeError(f"generated {len(got[0])} tokens, not {outs[0]}")
        result["cpu_s_per_run"] = (tree_cpu_seconds() - cpu) / run["repeats"]
    result["greedy"] = got
    return result


def main(path: str) -> int:
    run = json.loads(Path(path).read_text())
    if run["threads"]:
        # The caller also sets OMP_NUM_THREADS; transformers runs in this process.
        import torch

        torch.set_num_threads(run["threads"])
    load = load_1min()
    version, generate = make_generate(run)
    result = {
        "engine": run["engine"],
        "version": version,
        "mode": run["mode"],
        "threads": run["threads"],
        "round": run["round"],
    }
    result.update((throughput if run["mode"] == "throughput" else latency)(generate, run))
    result["load_1min"] = [load, load_1min()]
    out = Path(run["out"]) / "result.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    # vLLM starts its engine core with multiprocessing's spawn: this guard is required.
    sys.exit(main(sys.argv[1]))
