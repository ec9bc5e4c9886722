"""GRPO loss parity (issue 14, item 5): on the same prompts, completions, advantages and
old / reference log-probabilities, parallm's GRPO step (a `Trainer` with `task.name = "grpo"`,
its `StepRunner.forward_backward` on the batch `GRPO.rollout_batch` makes) has TRL 1.16
`GRPOTrainer._compute_loss`'s loss, gradient and KL / clip metrics, float32 on CPU.

How the two sides get the same inputs. The reference of a parallm step is a frozen copy of the
starting weights, which the step runs itself (beta > 0), and TRL's reference is the model loaded
again from the policy's path. So both start from one HF directory; after the Trainer is built its
policy's weights are perturbed (seeded noise), and TRL's policy is the HF model with those
perturbed weights copied in (through `hf_adapter.hf_key`): the policies agree, the references
(the unperturbed directory) agree, and they differ from each other, so the KL term is not zero.
The old log-probabilities are the policy's own (TRL's forward at the temperature) plus noise,
large enough that ratios clip on both sides (the test asserts TRL's clip metrics are non-zero).
Every prompt has the same token length: TRL left-pads prompts, parallm right-pads rows, and
with equal prompts both see positions 0..T-1, so the comparison is about the loss alone.

Metrics: TRL logs its KL and clip ratio as token means over the batch; parallm's are means over
its counted unit, a token under "token" normalisation (compared with TRL's batch numbers) and a
sequence under "sequence" (compared with the mean of TRL's numbers on each sequence alone).

TRL 1.16 multiplies the KL term by the (differentiable) ratio by default
(`use_bias_correction_kl = True`, DeepSeek-V3.2's unbiased KL gradient), as parallm does with
`task.kl_bias_correction = true` (its default); both settings are compared.

Test-only: `trl`, `transformers` and `datasets` are references, never used by parallm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import save_hf_model

from parallm.config import JobConfig, load_config
from parallm.models.build import canonical_name
from parallm.models.llama.hf_adapter import hf_key
from parallm.tokenizer import train_bpe_tokenizer
from parallm.train.rollout import group_advantages
from parallm.train.tasks.sft import pad_id
from parallm.train.trainer import Trainer

G = 4  # completions per prompt
PROMPTS = [f"Question: what is {a} + {b}?\nAnswer:" for a, b in ((2, 3), (4, 1), (7, 5))]
# Completion lengths per prompt's group; True: the completion ends with EOS (counted).
LENGTHS = [(5, 9, 3, 12), (7, 2, 11, 6), (4, 10, 8, 1)]
ENDS_EOS = [(True, False, True, False), (False, True, True, False), (True, False, False, True)]
MAX_COMPLETION = max(max(g) for g in LENGTHS)
EPSILON, EPSILON_HIGH, TEMPERATURE = 0.2, 0.28, 0.7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random transformers Llama with a byte-level BPE tokenizer trained on the prompts."""
    d = tmp_path_factory.mktemp("grpo_trl") / "model"
    tok = train_bpe_tokenizer(iter(PROMPTS * 8 + [str(i) for i in range(10)] * 8), 300)
    save_hf_model("llama3", d, seed=5, vocab_size=tok.vocab_size)
    tok.save(d)
    return d


def job(data: Path, model: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(
        JobConfig,
        None,
        [
            f"--data.paths={data}",
            "--data.extensions=['.jsonl']",
            "--data.seq_len=64",
            "--data.shuffle=false",
            f"--model.path={model}",
            "--task.name=grpo",
            f"--task.group_size={G}",
            f"--task.max_completion_tokens={MAX_COMPLETION}",
            f"--task.temperature={TEMPERATURE}",
            f"--task.epsilon={EPSILON}",
            f"--task.epsilon_high={EPSILON_HIGH}",
            f"--train.batch_size={len(PROMPTS)}",
            f"--train.micro_batch_size={len(PROMPTS)}",
            "--train.steps=1",
            "--checkpoint.every=0",
            f"--output.dir={out}",
            "--generate.max_tokens=0",
            *extra,
        ],
    )


def completions(tokenizer, gen: torch.Generator) -> list[list[int]]:
    """Random completions of the LENGTHS, EOS last where ENDS_EOS says (never before)."""
    eos = tokenizer.eos_token_id
    out = []
    for lengths, ends in zip(LENGTHS, ENDS_EOS, strict=True):
        for n, end in zip(lengths, ends, strict=True):
            ids = torch.randint(3, tokenizer.vocab_size, (n,), generator=gen)
            ids[ids == eos] = 3
            if end:
                ids[-1] = eos
            out.append(ids.tolist())
    return out


@torch.no_grad()
def perturb(trainer: Trainer, hf_model, gen: torch.Generator) -> None:
    """Add seeded noise to every weight of the parallm policy, and copy the result into the HF
    model (which then is the same policy)."""
    hf_params = dict(hf_model.named_parameters())
    names = set()
    for name, p in trainer.model.parts[0].named_parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std())
        key = hf_key(canonical_name(name))
        hf_params[key].copy_(p)
        names.add(key)
    assert names == set(hf_params)


def trl_trainer(
    model_dir: Path, hf_model, out: Path, *, beta: float, loss_type: str, correction: bool
):
    """TRL's trainer on `hf_model` for CPU float32, GRPO as parallm's settings."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    n = len(PROMPTS) * G
    config = GRPOConfig(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        bf16=False,
        beta=beta,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        loss_type=loss_type,
        temperature=TEMPERATURE,
        num_generations=G,
        max_completion_length=MAX_COMPLETION,
        importance_sampling_level="token",
        use_bias_correction_kl=correction,
        per_device_train_batch_size=n,
        per_device_eval_batch_size=n,
    )
    return GRPOTrainer(
        model=hf_model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def trl_inputs(prompt_ids, completion_ids, pad) -> dict[str, torch.Tensor]:
    """`_compute_loss`'s inputs without old / reference log-probabilities: prompts (of one
    length, so no padding), completions right-padded with their mask."""
    width = max(len(c) for c in completion_ids)
    completion = torch.full((len(completion_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(completion)
    for i, c in enumerate(completion_ids):
        completion[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    prompt = torch.tensor(prompt_ids)
    return {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": mask,
        "num_items_in_batch": mask.sum(),
    }


@torch.no_grad()
def trl_logps(trl, model, inputs) -> torch.Tensor:
    """TRL's per-token log-probabilities of the completions under `model` (at its temperature)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trl._get_per_token_logps_and_entropies(
        model, ids, attention, inputs["completion_ids"].size(1)
    )
    return logps


def select(inputs: dict, i: int) -> dict:
    """Sequence `i` of TRL's inputs alone, its completion cut to its length."""
    n = int(inputs["completion_mask"][i].sum())
    one = {}
    for k, v in inputs.items():
        if k == "num_items_in_batch":
            one[k] = torch.tensor(n)
        elif v.dim() == 2 and k.startswith(("completion", "old", "ref")):
            one[k] = v[i : i + 1, :n]
        else:
            one[k] = v[i : i + 1]
    return one


@pytest.mark.parametrize(
    ("normalization", "loss_type", "beta", "correction"),
    [
        ("token", "dapo", 0.0, True),
        ("token", "dapo", 0.04, True),
        ("token", "dapo", 0.04, False),
        ("sequence", "grpo", 0.0, True),
        ("sequence", "grpo", 0.04, True),
        ("sequence", "grpo", 0.04, False),
    ],
)
def test_grpo_loss_equals_trl(model_dir, tmp_path, normalization, loss_type, beta, correction):
    """parallm's GRPO loss, gradient (every weight) and KL / clip fraction equal TRL
    GRPOTrainer's on the same batch within 1e-5: asymmetric clipping (epsilon 0.2, epsilon_high
    0.28) active on both sides, temperature 0.7, beta 0 (no reference) and 0.04, the KL term
    with and without TRL's bias correction."""
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": p, "answer": "5"} for p in PROMPTS]
    data = tmp_path / "data" / "prompts.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = (
        f"--task.beta={beta}",
        f"--task.loss_normalization={normalization}",
        f"--task.kl_bias_correction={str(correction).lower()}",
    )
    trainer = Trainer(job(data.parent, model_dir, tmp_path / "out", *extra))
    assert (trainer.reference is not None) == (beta > 0)
    prompts = [p.ids for p in trainer.task.prompts]
    assert len({len(p) for p in prompts}) == 1, "the prompts must have one token length"
    prompt_ids = [p for p in prompts for _ in range(G)]

    gen = torch.Generator().manual_seed(0)
    completion_ids = completions(trainer.tokenizer, gen)
    hf_policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    perturb(trainer, hf_policy, gen)
    trl = trl_trainer(
        model_dir,
        hf_policy,
        tmp_path / "trl",
        beta=beta,
        loss_type=loss_type,
        correction=correction,
    )
    trl.model.eval()  # TRL's "eval" mode: no gradient-accumulation scaling of the loss

    inputs = trl_inputs(prompt_ids, completion_ids, pad_id(trainer.tokenizer))
    mask = inputs["completion_mask"].bool()
    policy = trl_logps(trl, trl.model, inputs)
    old = (policy + 0.3 * torch.randn(policy.shape, generator=gen)) * mask
    inputs["old_per_token_logps"] = old
    if beta > 0:
        inputs["ref_per_token_logps"] = trl_logps(trl, trl.ref_model, inputs)
    rewards = torch.randint(0, 3, (len(completion_ids),), generator=gen).float()
    rewards[:G] = torch.tensor([0.0, 1.0, 2.0, 1.0])  # no group is all ties: every one counts
    advantages = group_advantages(rewards, G, "group")
    inputs["advantages"] = advantages

    # TRL: loss and gradient of the batch, metrics of the batch and of each sequence alone.
    trl.model.zero_grad()
    their_loss = trl._compute_loss(trl.model, inputs)
    their_loss.backward()
    logged = {k: v[-1] for k, v in trl._metrics["eval"].items()}
    assert logged["clip_ratio/low_mean"] > 0 and logged["clip_ratio/high_mean"] > 0
    with torch.no_grad():
        for i in range(len(completion_ids)):
            trl._compute_loss(trl.model, select(inputs, i))
    n = len(completion_ids)
    per_sequence = {k: sum(v[-n:]) / n for k, v in trl._metrics["eval"].items()}

    # parallm: the rollout batch of the same rows through the step.
    old_logps = [old[i, : len(c)].tolist() for i, c in enumerate(completion_ids)]
    batch = trainer.task.rollout_batch(
        prompt_ids, completion_ids, old_logps, advantages, pad_id=pad_id(trainer.tokenizer)
    )
    model = trainer.model.parts[0]
    model.zero_grad()
    loss = trainer.runner.forward_backward([batch])
    metrics = trainer.runner.metrics

    assert loss == pytest.approx(their_loss.item(), rel=1e-5, abs=1e-7)
    hf_grads = {k: q.grad for k, q in trl.model.named_parameters()}
    for name, p in model.named_parameters():
        theirs = hf_grads[hf_key(canonical_name(name))]
        scale = theirs.abs().max().item()
        assert scale > 0, name
        assert (p.grad - theirs).abs().max().item() <= 1e-5 * scale + 1e-7, name

    reference = logged if normalization == "token" else per_sequence
    assert metrics["clip_fraction"] == pytest.approx(
        reference["clip_ratio/region_mean"], rel=1e-5, abs=1e-7
    )
    if beta > 0:
        # The policy is not its reference, and the KL term moves the loss well past the tolerance.
        assert beta * reference["kl"] > 1e-4 * abs(loss)
        assert metrics["kl"] == pytest.approx(reference["kl"], rel=1e-5, abs=1e-7)
    else:
        assert "kl" not in metrics
