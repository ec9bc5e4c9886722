"""`parallm bench rl`: both rollout backends run the GRPO step in their own processes and the
report has its fields; the peer (`transformers` `generate` on the policy's tensors) is a fair
GRPO rollout: its old log-probabilities equal the policy's forward and it samples from the whole
distribution (no top-k); bad options are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from parallm.bench import rl
from parallm.bench.infer import random_model_dir
from parallm.cli import main
from parallm.train.tasks.grpo import label_logps

pytest.importorskip("transformers")


def test_both_backends_report(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--shape", "tiny", "--prompts-per-step", "2", "--group-size", "2"]
    argv += ["--max-completion-tokens", "4", "--steps", "2", "--rounds", "1", "--threads", "1"]
    assert main(["bench", "rl", *argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for backend in rl.BACKENDS:
        f = report[backend]
        assert f["steps_measured"] == 1  # the first step of a run is its warm-up
        for key in ("step_s", "rollout_s", "training_s", "rollout_tokens_per_s", "cpu_s_per_step"):
            assert f[key] > 0, (backend, key)
        assert f["rollout_s"] + f["training_s"] == pytest.approx(f["step_s"])
    ratio = report["peer"]["step_s"] / report["parallm"]["step_s"]
    assert report["ratio_step_per_round"] == [pytest.approx(ratio)]
    assert "whole step, peer / parallm" in capsys.readouterr().out


def test_peer_is_a_fair_rollout(tmp_path):
    """The peer's completions of prompts of different lengths (left-padded together): the
    log-probabilities it records equal the trainer's forward within 1e-4, completions end at
    their first EOS, and sampled tokens lie outside the top 50 (top-k is off)."""
    model_dir = random_model_dir("tiny", tmp_path, torch.float32)
    data, tokenizer_dir = rl.workload(tmp_path, 4, seed=1)
    run = rl.RlRun(
        backend="peer", round=0, model_dir=str(model_dir), tokenizer_dir=str(tokenizer_dir),
        data=str(data), prompts_per_step=4, group_size=3, max_completion_tokens=6,
        temperature=0.7, steps=1, threads=0, seed=0, out=str(tmp_path / "run"),
    )  # fmt: skip
    trainer = rl.build_trainer(run)
    rollouts, task = trainer.rollouts, trainer.task
    assert len({len(p.ids) for p in task.prompts}) > 1, "the prompts should differ in length"
    groups = rollouts.sample(task.prompts, [0, 1, 2, 3])
    assert [len(g) for g in groups] == [3] * 4
    eos = set(trainer.tokenizer.eos_token_ids)
    prompt_ids, completion_ids, old = [], [], []
    for p, group in zip(task.prompts, groups, strict=True):
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) <= 6
            assert not eos & set(c.token_ids[:-1]) and c.truncated == (c.token_ids[-1] not in eos)
            prompt_ids.append(p.ids)
            completion_ids.append(c.token_ids)
            old.append(c.logprobs)
    batch = task.rollout_batch(prompt_ids, completion_ids, old, torch.zeros(12), pad_id=0)
    with torch.no_grad():
        logits = task.forward(trainer.model.parts[0], batch)
    ours = label_logps(logits, batch.labels, 0.7)[batch.extras["mask"]]
    recorded = batch.extras["old_logps"][batch.extras["mask"]]
    assert (ours - recorded).abs().max() < 1e-4
    # Each sampled token's rank among its position's logits: near-uniform random weights put
    # most of them far beyond 50.
    ranks = (logits > logits.gather(-1, batch.labels.clamp_min(0)[..., None])).sum(-1)
    assert int(ranks[batch.extras["mask"]].max()) > 50


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [("--shape", "nope", "--shape: 'nope' is not known"), ("--group-size", "1", "--group-size")],
)
def test_bad_input_is_one_line(tmp_path, capsys, option, value, needle):
    code = main(["bench", "rl", option, value, "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bench").exists()
