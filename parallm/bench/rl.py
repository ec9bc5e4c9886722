"""`parallm bench rl`: the GRPO step with parallm's engine as the rollout backend, against
`transformers` `generate` on the same weights (what TRL's GRPOTrainer does without a server).

Both backends run the same job: a random model of a named shape (`bench infer`'s shapes) with
a byte-level BPE tokenizer and parallm's chat template; made-up sums as chat prompts
("What is 37 + 48?", `answer` "85"), new ones each step; `group_size` completions per prompt of
at most `max_completion_tokens` at `temperature`; the rewards `numeric` (a random model's
answers are ~never right) plus `brevity` below (minus the completion's characters / 100; it
differs within a group, so the advantages and the gradients are not zero); TRL's defaults
otherwise (beta 0: no reference model; scale_rewards "group"; one optimizer step per rollout).
The trainer and its step are parallm's in both; only `Rollouts.sample` differs:

- parallm: the default `Rollouts` (the paged engine on the trainer's own tensors);
- peer (`GenerateRollouts`): a `transformers` LlamaForCausalLM whose parameters are the
  policy's tensors (shared, not copied), one `generate` over the left-padded prompts with
  `do_sample`, `temperature`, `num_return_sequences = group_size`, `max_new_tokens`, top-k and
  top-p off, stopping at EOS; the old log-probabilities are log_softmax(logits / temperature) of
  the sampled tokens from `output_logits`.

Every round runs each backend in a fresh process (the order alternating between rounds) with the
same torch thread count; each process runs `--steps` GRPO steps, the first a warm-up that is not
counted. Reported per backend: medians of the whole step, rollout and training seconds, rollout
tokens/s, CPU seconds per step (all threads of the process); per round the ratio of the peer's
median step to parallm's, and the median of those ratios.

    parallm bench rl --shape 20m --prompts-per-step 8 --group-size 8 --max-completion-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parallm.bench import save_report
from parallm.bench.infer import INFER_SHAPES
from parallm.errors import UserError

if TYPE_CHECKING:
    import torch

    from parallm.train.rollout import Completion, Prompt

BACKENDS = ("parallm", "peer")
NO_DIGITS = str.maketrans("", "", "0123456789")


def brevity(prompt: Any, completion: str, **row: Any) -> float:
    """A reward that differs within a group of a random model's completions."""
    return -len(completion) / 100


# -- the workload ------------------------------------------------------------------------------


def workload(out: Path, n: int, seed: int) -> tuple[Path, Path]:
    """`n` sums as chat prompts with their answers (`prompts.jsonl`) and a tokenizer with
    parallm's chat template trained on them (`tokenizer/`), under `out`."""
    from parallm.tokenizer import DEFAULT_CHAT_TEMPLATE, save_tokenizer_dir, train_bpe_tokenizer
    from parallm.utils.fs import write_lines_atomic

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        # Operands of one to three digits: prompts of different lengths, left-padded by the peer.
        a, b = (rng.randrange(10 ** rng.randint(1, 3)) for _ in range(2))
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)})  # fmt: skip
    data = out / "prompts.jsonl"
    write_lines_atomic(data, [json.dumps(r) for r in rows])
    # Trained without the digits, so that every digit stays its own token (as the arithmetic
    # demo's tokenizer): a prompt's length follows its operands'.
    texts = [f"<|user|>\n{r['prompt'][0]['content']}\n<|assistant|>\n".translate(NO_DIGITS) for r in rows]  # fmt: skip
    tokenizer = train_bpe_tokenizer(iter(texts), 300)
    tokenizer.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    save_tokenizer_dir(tokenizer, out / "tokenizer")
    return data, out / "tokenizer"


@dataclass(kw_only=True)
class RlRun:
    """One backend's run in its own process, and where it writes `result.json`."""

    backend: str  # one of BACKENDS
    round: int
    model_dir: str
    tokenizer_dir: str
    data: str
    prompts_per_step: int
    group_size: int
    max_completion_tokens: int
    temperature: float
    steps: int  # the first is a warm-up
    threads: int  # torch's intra-op threads (0: its default)
    seed: int
    out: str

    def overrides(self) -> list[str]:
        """The GRPO job both backends train."""
        return [
            f"--model.path={self.model_dir}",
            f"--tokenizer.path={self.tokenizer_dir}",
            f"--data.paths={json.dumps([self.data])}",
            "--data.extensions=['.jsonl']",
            "--data.shuffle=false",
            "--task.name=grpo",
            f"--task.group_size={self.group_size}",
            f"--task.max_completion_tokens={self.max_completion_tokens}",
            f"--task.temperature={self.temperature}",
            "--task.beta=0.0",
            "--task.rewards=['numeric', 'parallm.bench.rl:brevity']",
            f"--train.steps={self.steps}",
            f"--train.batch_size={self.prompts_per_step}",
            "--train.warmup_steps=0",
            "--train.lr=1e-5",
            f"--train.seed={self.seed}",
            f"--train.log_every={self.steps + 1}",
            "--checkpoint.every=0",
            "--checkpoint.export_hf=false",
            "--generate.max_tokens=0",
            f"--output.dir={Path(self.out) / 'job'}",
        ]


# -- the peer: transformers generate on the policy's tensors ------------------------------------


def hf_view(policy: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
    """The `transformers` model of `model_dir`'s config whose every parameter is the policy's
    own tensor (parallm's names are HF's without the `model.` prefix, the same layouts), so it
    follows every optimizer step with nothing copied."""
    import transformers

    from parallm.models.build import canonical_name
    from parallm.models.registry import family_of_args

    spec = family_of_args(policy.args)
    ours = {canonical_name(n): p for n, p in policy.named_parameters(remove_duplicate=False)}
    config = transformers.AutoConfig.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_config(
        config, dtype=next(policy.parameters()).dtype
    )
    used = set()
    for key, theirs in list(hf.named_parameters(remove_duplicate=False)):
        name = spec.hf.parallm_key(key)
        p = ours.get(name)
        assert p is not None and p.shape == theirs.shape, f"{key}: no policy tensor of its shape"
        path, _, leaf = key.rpartition(".")
        setattr(hf.get_submodule(path), leaf, p)
        used.add(name)
    assert used == set(ours), f"policy tensors without a HF parameter: {set(ours) - used}"
    return hf.eval()


def _rollouts_class():
    from parallm.train.rollout import Completion, Rollouts, sample_seed

    class GenerateRollouts(Rollouts):
        """Rollouts from `transformers` `generate` on the policy's tensors, as TRL's
        GRPOTrainer samples without an inference server; everything else is `Rollouts`'."""

        def __init__(self, *args, model_dir: Path, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.engine = None  # the base class's engine is not used: its cache is freed
            self.hf = hf_view(self.policy, model_dir)
            from parallm.train.tasks.sft import pad_id

            self.pad = pad_id(self.tokenizer)
            self.eos = set(self.tokenizer.eos_token_ids)

        def _sync(self) -> None:
            self.stale = False  # the HF model holds the policy's own tensors

        def sample(self, prompts: list[Prompt], sample_index: list[int]) -> list[list[Completion]]:
            import torch
            import transformers

            c, g = self.cfg, self.cfg.group_size
            width = max(len(p.ids) for p in prompts)
            device = next(self.hf.parameters()).device
            ids = [[self.pad] * (width - len(p.ids)) + p.ids for p in prompts]
            mask = [[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts]
            ids, mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
            config = transformers.GenerationConfig(
                do_sample=True,
                temperature=c.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=c.max_completion_tokens,
                num_return_sequences=g,
                eos_token_id=sorted(self.eos),
                pad_token_id=self.pad,
                output_logits=True,
                return_dict_in_generate=True,
                disable_compile=True,
            )
            torch.manual_seed(sample_seed(self.seed, sample_index[0]))
            out = self.hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new = out.sequences[:, width:]  # (P * G, L): a prompt's G rows are consecutive
            logits = torch.stack(out.logits, dim=1).float() / c.temperature  # (P * G, L, V)
            logps = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])[..., 0]
            groups: list[list[Completion]] = [[] for _ in prompts]
            for row, (tokens, lps) in enumerate(zip(new.tolist(), logps.tolist(), strict=True)):
                end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos), None)
                tokens, lps = tokens[:end], lps[:end]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                groups[row // g].append(Completion(tokens, lps, text, end is None))
            return groups

    return GenerateRollouts


def build_trainer(run: RlRun):
    """parallm's trainer on the run's job, its rollouts from the run's backend."""
    from parallm.config import JobConfig, load_config
    from parallm.train.trainer import Trainer

    trainer = Trainer(load_config(JobConfig, None, run.overrides()), resume="never")
    if run.backend == "peer":
        trainer.rollouts = _rollouts_class()(
            trainer.task,
            trainer.model.parts,
            trainer.args,
            trainer.tokenizer,
            lora=None,
            device=trainer.device,
            seed=trainer.cfg.train.seed,
            local_prompts=trainer.cfg.train.batch_size,
            model_dir=Path(run.model_dir),
        )
        print("rollouts: transformers generate on the policy's tensors (the peer)", flush=True)
    return trainer


# -- a run's process ---------------------------------------------------------------------------


def run_steps(run: RlRun) -> dict[str, Any]:
    """The run's GRPO steps; per step the wall and CPU seconds (all threads) of the whole step
    and of its rollout, and the trainer's metrics."""
    trainer = build_trainer(run)
    rollouts, cpu_rollout = trainer.rollouts, []
    sample = rollouts.sample

    def timed_sample(*args):
        start = time.process_time()
        groups = sample(*args)
        cpu_rollout.append(time.process_time() - start)
        return groups

    rollouts.sample = timed_sample
    steps = []
    for _ in range(run.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        r = trainer.train_step()
        steps.append(
            {
                "step_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "rollout_cpu_s": cpu_rollout[-1],
                **{
                    k: r[k]
                    for k in (
                        "rollout_s",
                        "rollout_tokens_per_s",
                        "training_tokens_per_s",
                        "completion_length",
                        "reward",
                        "reward_std",
                        "loss",
                    )
                },
            }
        )
    return {"steps": steps}


def worker_main(path: Path) -> int:
    import torch

    from parallm.utils.fs import write_json_atomic

    run = RlRun(**json.loads(path.read_text()))
    if run.threads:
        torch.set_num_threads(run.threads)
    load = os.getloadavg()[0]
    result = {"backend": run.backend, "round": run.round, "threads": torch.get_num_threads()}
    result.update(run_steps(run))
    result["load_1min"] = [load, os.getloadavg()[0]]
    write_json_atomic(Path(run.out) / "result.json", result)
    return 0


def spawn(run: RlRun) -> dict[str, Any]:
    """Run `run` in a fresh Python process (its output in `run.log`); its result."""
    import subprocess

    from parallm.utils.fs import write_json_atomic

    out = Path(run.out)
    write_json_atomic(out / "run.json", asdict(run))
    cmd = [sys.executable, "-m", "parallm.bench.rl", "--worker", str(out / "run.json")]
    env = dict(os.environ)
    if run.threads:
        env["OMP_NUM_THREADS"] = str(run.threads)
    with (out / "run.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = (out / "run.log").read_text().strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise UserError(f"{run.backend} (round {run.round + 1}) failed: see {out / 'run.log'}")
    return json.loads((out / "result.json").read_text())


# -- the report --------------------------------------------------------------------------------


def backend_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over every round's steps after the first."""
    steps = [s for r in results for s in r["steps"][1:]]

    def med(key: str) -> float:
        return statistics.median(s[key] for s in steps)

    return {
        "step_s": med("step_s"),
        "rollout_s": med("rollout_s"),
        "training_s": statistics.median(s["step_s"] - s["rollout_s"] for s in steps),
        "rollout_tokens_per_s": med("rollout_tokens_per_s"),
        "training_tokens_per_s": med("training_tokens_per_s"),
        "cpu_s_per_step": med("cpu_s"),
        "rollout_cpu_s": med("rollout_cpu_s"),
        "completion_length": med("completion_length"),
        "reward": med("reward"),
        "steps_measured": len(steps),
        "step_s_per_round": [statistics.median(s["step_s"] for s in r["steps"][1:]) for r in results],
    }  # fmt: skip


def report(runs: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> dict[str, Any]:
    out = {**meta, **{b: backend_figures(runs[b]) for b in BACKENDS}}
    ratios = [
        peer / ours
        for peer, ours in zip(
            out["peer"]["step_s_per_round"], out["parallm"]["step_s_per_round"], strict=True
        )
    ]
    out["ratio_step_per_round"] = ratios
    out["ratio_step"] = statistics.median(ratios)
    out["ratio_cpu_s"] = out["peer"]["cpu_s_per_step"] / out["parallm"]["cpu_s_per_step"]
    out["ratio_rollout"] = out["peer"]["rollout_s"] / out["parallm"]["rollout_s"]
    out["load_1min"] = {b: [r["load_1min"] for r in runs[b]] for b in BACKENDS}
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"GRPO on {r['shape']} ({r['parameters'] / 1e6:.1f}M parameters): {r['prompts_per_step']} "
        f"prompts x G={r['group_size']}, <= {r['max_completion_tokens']} tokens, "
        f"{r['threads']} threads, {r['rounds']} rounds",
        f"{'backend':<9}{'step s':>9}{'rollout s':>11}{'train s':>9}{'rollout tok/s':>15}"
        f"{'CPU s/step':>12}",
    ]
    for b in BACKENDS:
        f = r[b]
        lines.append(
            f"{b:<9}{f['step_s']:9.2f}{f['rollout_s']:11.2f}{f['training_s']:9.2f}"
            f"{f['rollout_tokens_per_s']:15.1f}{f['cpu_s_per_step']:12.2f}"
        )
    per_round = ", ".join(f"{x:.2f}" for x in r["ratio_step_per_round"])
    lines.append(
        f"whole step, peer / parallm: {r['ratio_step']:.2f}x median ({per_round}); "
        f"CPU s {r['ratio_cpu_s']:.2f}x; rollout {r['ratio_rollout']:.2f}x"
    )
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parallm bench rl", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    p.add_argument("--shape", default="20m", help=f"random weights: {', '.join(INFER_SHAPES)}")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-completion-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per run, the first a warm-up")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both backends")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/rl", help="output directory (report.json)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The options' one-line errors, before torch."""
    if args.shape not in INFER_SHAPES:
        raise UserError(f"--shape: {args.shape!r} is not known; valid: {', '.join(INFER_SHAPES)}")
    if args.group_size < 2:
        raise UserError(f"--group-size: {args.group_size} is not valid; must be >= 2")
    if args.steps < 2:
        raise UserError(f"--steps: {args.steps} is not valid; must be >= 2 (one is a warm-up)")
    for name in ("prompts_per_step", "max_completion_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if args.temperature <= 0:
        raise UserError(f"--temperature: {args.temperature} is not valid; must be > 0")
    if args.threads < 0:
        raise UserError(f"--threads: {args.threads} is not valid; must be >= 0")


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    args = parser().parse_args(argv)
    check_args(args)
    if importlib.util.find_spec("transformers") is None:
        raise UserError("bench rl: the peer needs transformers; pip install transformers")
    import torch

    from parallm.bench.infer import random_model_dir
    from parallm.models.hf import read_family

    out = Path(args.out)
    model_dir = random_model_dir(args.shape, out, torch.float32)
    data, tokenizer_dir = workload(out, args.prompts_per_step * args.steps, args.seed)
    spec, margs = read_family(model_dir)
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in BACKENDS}
    for k in range(args.rounds):
        for backend in BACKENDS if k % 2 == 0 else BACKENDS[::-1]:
            run = RlRun(
                backend=backend,
                round=k,
                model_dir=str(model_dir),
                tokenizer_dir=str(tokenizer_dir),
                data=str(data),
                prompts_per_step=args.prompts_per_step,
                group_size=args.group_size,
                max_completion_tokens=args.max_completion_tokens,
                temperature=args.temperature,
                steps=args.steps,
                threads=args.threads,
                seed=args.seed,
                out=str(out / f"round{k}-{backend}"),
            )
            result = spawn(run)
            runs[backend].append(result)
            last = result["steps"][-1]
            print(
                f"round {k + 1}/{args.rounds} {backend}: step {last['step_s']:.2f} s "
                f"(rollout {last['rollout_s']:.2f} s)",
                flush=True,
            )
    import transformers

    meta = {
        "shape": args.shape,
        "parameters": spec.facts(margs).num_params,
        "prompts_per_step": args.prompts_per_step,
        "group_size": args.group_size,
        "max_completion_tokens": args.max_completion_tokens,
        "temperature": args.temperature,
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "threads": runs["parallm"][0]["threads"],
        "rewards": ["numeric", "parallm.bench.rl:brevity"],
        "beta": 0.0,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
    }
    result = report(runs, meta)
    print(format_report(result), flush=True)
    save_report(result, out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(Path(sys.argv[2])))
    sys.exit(main())
