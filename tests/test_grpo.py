"""GRPO with the engine in the loop (`task.name = "grpo"`): rollouts from parallm's engine on the
trainer's own weights (one process) or a gathered copy (sharded layouts), whose sampling
log-probabilities equal the trainer's forward after every update (full fine-tuning and LoRA);
group-normalised advantages as TRL computes them; several optimizer steps per rollout batch;
ZeRO-3 and tensor parallelism equal one process; bad input is one line before any rollout.

The loss against TRL's GRPOTrainer is in test_grpo_trl.py; learning on the shipped arithmetic
job in test_demo_arithmetic.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import save_hf_model
from parallel_jobs import assert_weights_close

from parallm.cli import main
from parallm.config import JobConfig, TaskConfig, load_config
from parallm.errors import UserError
from parallm.testing.distributed import run_distributed
from parallm.testing.timeouts import scaled
from parallm.tokenizer import DEFAULT_CHAT_TEMPLATE, train_bpe_tokenizer
from parallm.train.rollout import group_advantages
from parallm.train.tasks.grpo import label_logps
from parallm.train.trainer import Trainer


def rows() -> list[dict]:
    out = []
    for a in range(6):
        for b in range(6):
            if (a + b) % 2:  # half the prompts as chat messages, half as plain text
                prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
            else:
                prompt = f"Q: {a} + {b} =\nA:"
            out.append({"prompt": prompt, "answer": str(a + b)})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """Prompts and a tiny random Llama whose tokenizer has parallm's chat template."""
    d = tmp_path_factory.mktemp("grpo")
    data = d / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    texts = [json.dumps(r) for r in rows()] + ["<|user|>\n<|assistant|>\n"] * 4
    tok = train_bpe_tokenizer(iter(texts), 300)
    tok.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    save_hf_model("llama3", d / "model", seed=3, vocab_size=tok.vocab_size)
    tok.save(d / "model")
    return data, d / "model"


def job_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--data.paths={data}",
        "--data.extensions=['.jsonl']",
        "--data.seq_len=64",
        "--data.shuffle=false",
        f"--model.path={model}",
        "--task.name=grpo",
        "--task.group_size=4",
        "--task.max_completion_tokens=6",
        "--task.temperature=0.9",
        "--task.rewards=['numeric', 'test_grpo:shorter']",
        "--train.steps=2",
        "--train.batch_size=4",
        "--train.warmup_steps=1",
        "--train.lr=3e-2",
        "--train.eps=1e-5",
        "--train.log_every=100",
        "--checkpoint.every=0",
        "--checkpoint.export_hf=false",
        f"--output.dir={out}",
        "--generate.max_tokens=0",
        *extra,
    ]


def shorter(prompt, completion, **row) -> float:
    """A reward a random model's completions differ in (the numeric one is 0 for all)."""
    return -len(completion) / 10


def job(data: Path, model: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(JobConfig, None, job_args(data, model, out, *extra))


# -- advantages --------------------------------------------------------------------------------


def test_group_advantages_as_trl():
    """TRL's formulas: rewards less the group mean, over the group's (or the batch's) unbiased
    standard deviation + 1e-4, or not scaled."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    g = r.view(2, 4)
    centred = (g - g.mean(1, keepdim=True)).flatten()
    std = torch.tensor([g[0].std().item()] * 4 + [0.0] * 4)
    assert torch.allclose(group_advantages(r, 4, "group"), centred / (std + 1e-4))
    assert torch.equal(group_advantages(r, 4, "none"), centred)
    batch = group_advantages(r, 4, "batch", r.std())
    assert torch.allclose(batch, centred / (r.std() + 1e-4))
    assert torch.equal(group_advantages(r, 4, "group")[4:], torch.zeros(4))  # one reward: no signal


# -- the loop on one process -------------------------------------------------------------------


def policy_logps(trainer: Trainer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The trainer's forward (the step's call) on prompt + completion: log_softmax(logits / T)
    of each completion token."""
    task = trainer.task
    batch = task.rollout_batch(
        [prompt], [completion], [[0.0] * len(completion)], torch.zeros(1), pad_id=0
    )
    model = trainer.model.parts[0]
    with torch.no_grad(), trainer.runner._loss_ctx():  # vocabulary-sharded logits under TP
        logits = task.forward(model, batch)
        return label_logps(logits, batch.labels, task.cfg.temperature)[batch.loss_mask]


def engine_matches_trainer(trainer: Trainer) -> float:
    """Roll out one prompt through the trainer's engine and compare the log-probabilities it
    sampled with against the trainer's forward; the largest difference."""
    rollouts = trainer.rollouts
    batch, _ = rollouts.generate([0, 1], [100, 101])
    worst = 0.0
    for i in range(batch.rows):
        mask = batch.extras["mask"][i]
        ids = batch.input_ids[i]
        n = int(mask.nonzero()[-1]) + 1  # positions up to the last completion token's
        first = int(mask.nonzero()[0])
        prompt = ids[: first + 1].tolist()
        completion = batch.labels[i][mask].tolist()
        assert ids[first + 1 : n].tolist() == completion[:-1]
        ours = policy_logps(trainer, prompt, completion)
        worst = max(worst, float((ours - batch.extras["old_logps"][i][mask]).abs().max()))
    return worst


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_reads_trainer_weights(setup, tmp_path, lora):
    """On one process the engine runs the trainer's own module: after each optimizer step
    (full fine-tuning, or the LoRA adapter alone) its sampling log-probabilities equal the
    trainer's forward within 1e-5, with no checkpoint written, and they changed with the step."""
    data, model = setup
    extra = ("--lora.r=4", "--lora.alpha=8", "--lora.target_modules=all-linear") if lora else ()
    trainer = Trainer(job(data, model, tmp_path / "out", *extra), resume="never")
    assert trainer.rollouts.shared and trainer.rollouts.engine.model is trainer.model.parts[0]
    before = engine_matches_trainer(trainer)
    ref = policy_logps(trainer, [1, 2, 3], [4, 5, 6])
    records = trainer.fit()
    assert len(records) == 2
    after = policy_logps(trainer, [1, 2, 3], [4, 5, 6])
    assert (after - ref).abs().max() > 1e-3, "the steps did not change the policy"
    assert max(before, engine_matches_trainer(trainer)) < 1e-5
    r = records[0]
    for name in (
        "reward",
        "reward_std",
        "kl",
        "clip_fraction",
        "completion_length",
        "rollout_tokens_per_s",
        "training_tokens_per_s",
        "rollout_share",
        "reward_errors/numeric",
    ):
        assert name in r, name
    assert r["completions"] == 4 * 4 and 0 < r["rollout_share"] < 1


def test_iterations_reuse_the_rollout(setup, tmp_path):
    """`task.iterations = 2`: one rollout per two optimizer steps; the first step's policy is
    the one that sampled, so no ratio is clipped and the KL to the starting policy is 0; the
    second step's ratios have moved."""
    data, model = setup
    cfg = job(data, model, tmp_path / "out", "--task.iterations=2", "--train.steps=4")
    records = Trainer(cfg, resume="never").fit()
    assert [r["rollout_s"] > 0 for r in records] == [True, False, True, False]
    assert records[0]["clip_fraction"] == 0 and records[0]["kl"] < 1e-9
    assert records[1]["kl"] > 0
    assert records[0]["reward"] == records[1]["reward"]  # the same rollout batch


def count_calls(prompt, completion, **row):
    raise ValueError("a reward that always fails")


def test_raising_reward_is_counted(setup, tmp_path):
    """A reward that raises on every sample is counted per sample in the metrics (and its
    error logged), not a crashed job; the other rewards still score."""
    data, model = setup
    cfg = job(
        data,
        model,
        tmp_path / "out",
        "--task.rewards=['numeric', 'test_grpo:count_calls']",
        "--train.steps=1",
    )
    (record,) = Trainer(cfg, resume="never").fit()
    assert record["reward_errors/test_grpo:count_calls"] == 16
    assert record["reward_errors/numeric"] == 0


# -- layouts -----------------------------------------------------------------------------------


def _layout_worker(rank: int, world: int, args: list[str], out: str):
    from parallm.train.trainer import Trainer

    cfg = load_config(JobConfig, None, [*args, f"--output.dir={out}/run"])
    trainer = Trainer(cfg, resume="never")
    assert not trainer.rollouts.shared  # sharded: the engine has a gathered copy
    records = trainer.fit()
    worst = engine_matches_trainer(trainer)  # after the updates, the copy follows
    state = trainer.full_state_dict()
    return [r["loss"] for r in records], [r["reward"] for r in records], worst, state


LAYOUTS = {
    "zero3-full": ("--parallel.dp_shard=2", "--parallel.zero_stage=3"),
    "tp2-lora": (
        "--parallel.tp=2",
        "--lora.r=4",
        "--lora.alpha=8",
        "--lora.target_modules=all-linear",
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_layouts_equal_one_process(setup, tmp_path, layout):
    """ZeRO-3 (each rank rolls out its half of the prompts) and tensor parallelism under LoRA
    (the adapter alone is gathered after each step): the engine's gathered copy of the policy
    follows every step (its log-probabilities equal the sharded trainer's forward within 1e-5);
    losses, rewards and weights equal one process's."""
    data, model = setup
    flags = LAYOUTS[layout]
    lora = tuple(f for f in flags if f.startswith("--lora"))
    args = job_args(data, model, tmp_path / "single", *lora)
    single = Trainer(load_config(JobConfig, None, args), resume="never")
    ref = single.fit()
    dist_args = [a for a in args if not a.startswith("--output.dir")]
    dist_args += [f for f in flags if f.startswith("--parallel")]
    results = run_distributed(
        _layout_worker, 2, tmp_path / "dist", dist_args, str(tmp_path), timeout_s=scaled(240)
    )
    losses, rewards, _, state = results[0]
    assert max(r[2] for r in results) < 1e-5
    assert rewards == pytest.approx([r["reward"] for r in ref], abs=1e-6)
    assert losses == pytest.approx([r["loss"] for r in ref], abs=1e-5)
    assert_weights_close(state, single.full_state_dict())


# -- bad input ---------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_bad_input_is_one_line_before_launch(setup, tmp_path, capsys):
    """A reward module that does not import, a reward returning a non-number and a group of 1
    are one line, exit 2, before any rank is launched (`--nproc 2`)."""
    data, model = setup
    (tmp_path / "bad_reward.py").write_text(
        "def says(prompt, completion, **row):\n    return 'x'\n"
    )
    base = job_args(data, model, tmp_path / "out")
    cases = [
        (["--task.rewards=['no_such_module:f']"], "task.rewards", "does not import"),
        (["--task.rewards=['bad_reward:says']"], "task.rewards", "not a number"),
        (["--task.group_size=1"], "task.group_size", ">= 2"),
    ]
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        for extra, field, needle in cases:
            config = tmp_path / "job.toml"
            config.write_text("")
            code, err = run_cli(capsys, "train", str(config), "--nproc", "2", *base, *extra)
            assert code == 2, err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and field in lines[0] and needle in lines[0], err
            assert not (tmp_path / "out").exists()  # nothing launched, nothing written
    finally:
        sys.path.remove(str(tmp_path))


def test_prompt_longer_than_context(setup, tmp_path):
    data, model = setup
    max_len = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    cfg = job(data, model, tmp_path / "out", f"--task.max_completion_tokens={max_len}")
    with pytest.raises(UserError, match=r"task.max_completion_tokens.*context"):
        Trainer(cfg, resume="never")


def test_config_checks():
    for kw, field in (
        ({"group_size": 1}, "task.group_size"),
        ({"beta": -0.1}, "task.beta"),
        ({"loss_normalization": "dr"}, "task.loss_normalization"),
        ({"scale_rewards": "rank"}, "task.scale_rewards"),
        ({"rewards": ["numeric"], "reward_weights": [1.0, 2.0]}, "task.reward_weights"),
        ({"temperature": 0.0}, "task.temperature"),
    ):
        with pytest.raises(UserError, match=field):
            TaskConfig(name="grpo", **kw)
    assert TaskConfig(name="grpo", beta=0.0).beta == 0.0
    with pytest.raises(UserError, match="task.beta"):
        TaskConfig(name="dpo", beta=0.0)


def test_resume_equals_an_unbroken_run(setup, tmp_path):
    """A run stopped after step 2 and resumed from its checkpoint makes the rollouts, losses and
    weights of an unbroken run: the prompts follow the data position and each prompt's draws
    its global sample index, so nothing about rollouts needs saving (one optimizer step per
    rollout batch; with `task.iterations` > 1 a resume inside a cycle rolls out afresh)."""
    data, model = setup
    unbroken = Trainer(job(data, model, tmp_path / "a", "--train.steps=3"), resume="never")
    ref = unbroken.fit()
    first = Trainer(job(data, model, tmp_path / "b", "--train.steps=3"), resume="never")
    first.fit(until_step=2)
    first.save_checkpoint()
    first.checkpointer.wait()
    resumed = Trainer(job(data, model, tmp_path / "b", "--train.steps=3"), resume="always")
    assert resumed.step == 2
    (last,) = resumed.fit()
    assert last["reward"] == ref[2]["reward"]
    assert last["loss"] == pytest.approx(ref[2]["loss"], abs=1e-6)
    assert_weights_close(resumed.full_state_dict(), unbroken.full_state_dict())
