"""Group relative policy optimisation (GRPO) on prompts, with parallm's engine in the loop.

Data: `.jsonl` / `.parquet` rows with `prompt` (a string, or a message list rendered with the
chat template and its generation prompt) and any other fields (an `answer`, ...), which the
reward functions receive. The dataset is the prompts; a step's batch is not read from it but
made by `train/rollout.py`: `group_size` completions per prompt sampled by the serving engine
from the weights being trained, scored by the rewards, with group-normalised advantages and
the log-probabilities the engine sampled them with (the old policy's). This task then scores
the policy on those rows as TRL's `GRPOTrainer` does (`importance_sampling_level = "token"`):

    ratio = exp(logp - old_logp)        logp = log_softmax(logits / temperature)[completion token]
    loss_t = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
             + beta * (exp(ref - logp) - (ref - logp) - 1) [* ratio: kl_bias_correction]

summed over completion tokens and divided by their number over the global batch
(`loss_normalization = "token"`: TRL's "dapo") or averaged per sequence, then over sequences
("sequence": TRL's "grpo"). The counted unit is a completion token or a sequence accordingly, so
the step's global normalisation gives the single-process loss on every layout it allows.

A row of the batch is prompt + completion, right-padded; labels are the completion tokens (EOS
included when sampled), and `extras` carry per row: the label mask, the advantage, the old and
(with beta > 0) the reference log-probabilities per position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from parallm.errors import UserError
from parallm.train.data import EpochOrder
from parallm.train.tasks import IGNORE_INDEX, Batch, Task, refuse_degrees, register_task
from parallm.train.tasks.dpo import render_chat
from parallm.train.tasks.sft import check_messages, read_rows


class PromptDataset(EpochOrder):
    """The prompts in a seeded order per epoch; a sample is its prompt's index (1,)."""

    def __init__(self, n: int, *, seed: int, shuffle: bool) -> None:
        self._total, self.seed, self.shuffle = n, seed, shuffle

    def row(self, sample_id: int) -> np.ndarray:
        return np.array([sample_id], dtype=np.int64)


class Prompt:
    """One prompt: its token ids, the prompt as written, and the row's other fields."""

    __slots__ = ("ids", "prompt", "row", "where")

    def __init__(self, ids: list[int], prompt: Any, row: dict, where: str) -> None:
        self.ids, self.prompt, self.row, self.where = ids, prompt, row, where


def read_prompts(tokenizer, files: list[Path]) -> list[Prompt]:
    """Every row's prompt, tokenised (a message list through the chat template); a UserError
    naming the row for one that is not a prompt."""
    prompts = []
    for path in files:
        for where, row in read_rows(path, "grpo"):
            if not isinstance(row, dict) or row.get("prompt") is None:
                raise UserError(f"{where}: a GRPO row is an object with a 'prompt'")
            prompt = row["prompt"]
            if isinstance(prompt, list):
                check_messages(prompt, where, "prompt")
                ids = render_chat(tokenizer, prompt, where, generation_prompt=True)
            elif isinstance(prompt, str):
                ids = tokenizer.encode(prompt)
            else:
                raise UserError(f"{where}: 'prompt' must be a string or a list of messages")
            if not ids:
                raise UserError(f"{where}: 'prompt' has no tokens")
            fields = {k: v for k, v in row.items() if k != "prompt"}
            prompts.append(Prompt(ids, prompt, fields, where))
    return prompts


def label_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) at each label (0 where not counted), float32, shaped
    like `labels`; vocabulary-sharded logits work under `loss_parallel`."""
    nll = F.cross_entropy(
        (logits.float() / temperature).flatten(0, 1),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    if isinstance(nll, DTensor):
        nll = nll.full_tensor()
    return -nll.view_as(labels)


def token_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    kl_bias_correction: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token GRPO loss, k3 KL (None without beta; times the ratio with
    `kl_bias_correction`, an importance-sampling correction for completions sampled by the old
    policy) and whether the ratio was clipped, for tensors of one shape (completion tokens);
    the formulas of TRL's `GRPOTrainer`."""
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    kl = None
    if beta != 0.0:
        assert ref_logps is not None, "beta > 0 needs the reference's log-probabilities"
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if kl_bias_correction:
            kl = kl * coef_1
        loss = loss + beta * kl
    clipped = ((coef_1 < 1 - epsilon_low) & (advantages < 0)) | (
        (coef_1 > 1 + epsilon_high) & (advantages > 0)
    )
    return loss, kl, clipped


@register_task
class GRPO(Task):
    name = "grpo"
    random_tokens = False
    labelled_logits_only = True  # the loss reads the completion tokens' logits only
    online = True  # batches come from rollouts (train/rollout.py), not from the data rows

    def __init__(self, cfg, *, tokenizer=None, job=None) -> None:
        super().__init__(cfg, tokenizer=tokenizer, job=job)
        self.prompts: list[Prompt] = []
        self.epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    def needs_reference(self) -> bool:
        return self.cfg.beta > 0

    def check_layout(self, dims) -> None:
        refuse_degrees(
            "grpo",
            dims,
            {
                "pp": "rollouts and the reference forward run outside a pipeline schedule",
                "cp": "rollouts generate whole sequences on one rank",
            },
        )

    def check_data(self, files: list[Path]) -> None:
        """The reward functions import and, on the first data row with an empty completion,
        return a number (before any rollout, before launch)."""
        from parallm.train.rewards import check_rewards, load_rewards

        c = self.cfg
        rewards = load_rewards(
            c.rewards, format_pattern=c.format_pattern, answer_field=c.answer_field
        )
        for path in files:
            for where, row in read_rows(path, "grpo"):
                if isinstance(row, dict) and row.get("prompt") is not None:
                    fields = {k: v for k, v in row.items() if k != "prompt"}
                    check_rewards(rewards, fields, row["prompt"], where=where)
                return

    def dataset(self, files: list[Path], data_cfg, *, seed: int) -> PromptDataset:
        if self.tokenizer is None:
            raise UserError("task.name: 'grpo' needs a tokenizer (tokenizer.path or model.path)")
        if data_cfg.eval_fraction > 0:
            raise UserError(
                f"data.eval_fraction: {data_cfg.eval_fraction} is not supported by "
                "task.name='grpo' (it has no held-out loss); valid: 0"
            )
        self.prompts = read_prompts(self.tokenizer, files)
        if not self.prompts:
            raise UserError("data.paths: no prompt found in the data files")
        longest = max(len(p.ids) for p in self.prompts)
        c = self.cfg
        self.data_summary = (
            f"grpo: {len(self.prompts)} prompts (longest {longest} tokens), {c.group_size} "
            f"completions each of at most {c.max_completion_tokens} tokens at temperature "
            f"{c.temperature}; rewards {', '.join(c.rewards)}; beta {c.beta}, epsilon "
            f"[{c.epsilon}, {self.epsilon_high}], {c.loss_normalization}-level loss, "
            f"{c.iterations} optimizer step(s) per rollout batch"
        )
        return PromptDataset(len(self.prompts), seed=seed, shuffle=data_cfg.shuffle)

    def batch(self, rows: torch.Tensor) -> Batch:
        raise NotImplementedError("GRPO batches are made by rollouts (train/rollout.py)")

    def rollout_batch(
        self,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        old_logps: list[list[float]],
        advantages: torch.Tensor,
        *,
        pad_id: int,
    ) -> Batch:
        """The batch of rows prompt + completion (one per completion, right-padded), labelled
        on the completion, with the sampling log-probabilities and the advantages."""
        n = len(completion_ids)
        width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        old = torch.zeros(n, width, dtype=torch.float32)
        for i, (p, c, lp) in enumerate(zip(prompt_ids, completion_ids, old_logps, strict=True)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            # Position t predicts token t + 1: the completion's tokens are the labels of the
            # positions from the prompt's last token on.
            labels[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c)
            old[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(lp, dtype=torch.float32)
        labels, old = labels[:, : width - 1], old[:, : width - 1]
        extras = {
            "mask": labels != IGNORE_INDEX,
            "advantages": advantages.float(),
            "old_logps": old,
        }
        return Batch(ids[:, :-1], labels, extras=extras)

    def count(self, batch: Batch) -> torch.Tensor:
        mask = batch.extras["mask"]
        if self.cfg.loss_normalization == "token":
            return mask.sum()
        return (mask.sum(1) > 0).sum()

    def reference_extras(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ref_logps": label_logps(logits, batch.labels, self.cfg.temperature)}

    def loss_sum(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss_and_metrics(logits, batch)[0]

    def loss_and_metrics(
        self, logits: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss of the counted units, and the sums of their KL and clip fraction."""
        cfg, x = self.cfg, batch.extras
        mask = x["mask"]  # (B, T)
        logps = label_logps(logits, batch.labels, cfg.temperature)
        # The step may have kept only the labelled positions: (1, N) in the mask's row order.
        logps = logps[0] if logps.shape != mask.shape else logps[mask]
        rows = mask.nonzero()[:, 0]  # each completion token's row
        ref = x["ref_logps"][mask] if "ref_logps" in x else None
        loss, kl, clipped = token_terms(
            logps,
            x["old_logps"][mask],
            x["advantages"][rows],
            epsilon_low=cfg.epsilon,
            epsilon_high=self.epsilon_high,
            beta=cfg.beta,
            ref_logps=ref,
            kl_bias_correction=cfg.kl_bias_correction,
        )
        if cfg.loss_normalization == "token":
            weight = torch.ones_like(loss)
        else:  # each sequence's tokens share its one unit
            weight = 1.0 / mask.sum(1).clamp_min(1)[rows].to(loss.dtype)
        with torch.no_grad():
            metrics = {"clip_fraction": (clipped * weight).sum()}
            if kl is not None:
                metrics["kl"] = (kl * weight).sum()
        return (loss * weight).sum(), metrics
