"""Rollouts for online RL: parallm's serving engine samples from the weights being trained.

`Rollouts` owns an `LLMEngine` over this rank's policy. Where the rank holds the whole model as
plain tensors (one process, or data parallelism without sharding), the engine runs on the
trainer's own module: no checkpoint, no copy; after an optimizer step only its prefix cache is
dropped (`weights_updated`), since every KV block it holds was computed with the old weights.
Where the policy is sharded (ZeRO, tensor parallelism: DTensor parameters), the engine gets a
plain model of its own, filled once with every parameter's full value gathered rank to rank
(`full_tensor`, a collective), and after each step only the parameters that train are gathered
again (under LoRA: the adapter alone).

Each data-parallel rank generates `group_size` completions for each of its prompts, seeded by
(train.seed, the prompt's global sample index), so a prompt gets the same draws on any layout;
rewards are computed where the completions are, advantages are normalised within each group (a
group never spans ranks) or, with `scale_rewards = "batch"`, by the standard deviation of the
whole global batch (gathered over the data-parallel ranks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from parallm.errors import UserError
from parallm.inference.config import EngineConfig
from parallm.inference.engine import LLMEngine
from parallm.inference.model_runner import kv_bytes_per_block
from parallm.inference.sampling import SamplingParams
from parallm.models.build import canonical_name, materialize
from parallm.models.lora import LoraSpec, apply_lora
from parallm.models.registry import family_of_args
from parallm.train.rewards import load_rewards, score
from parallm.train.tasks import Batch
from parallm.train.tasks.grpo import GRPO, Prompt
from parallm.train.tasks.sft import pad_id


@dataclass
class Completion:
    """A sampled completion: its tokens, the log-probability each was sampled with, its text,
    and whether it stopped at `max_completion_tokens` rather than at EOS."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    truncated: bool


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str, batch_std: torch.Tensor | None = None
) -> torch.Tensor:
    """Rewards (N,) less their group's mean (groups of `group_size` consecutive completions),
    divided by the group's standard deviation + 1e-4 (`scale = "group"`), by `batch_std` + 1e-4
    (the global batch's, "batch") or not at all ("none"), as TRL's GRPOTrainer."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
        advantages = advantages / (std + 1e-4)
    elif scale == "batch":
        assert batch_std is not None
        advantages = advantages / (batch_std + 1e-4)
    return advantages


def sample_seed(seed: int, sample_index: int) -> int:
    """The sampling seed of a prompt: a function of the job's seed and its global sample index;
    its completions use seed, seed + 1, ... (the engine's rule for `n`)."""
    return int(np.random.SeedSequence([seed, sample_index]).generate_state(1)[0] >> 8)


def _is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


class Rollouts:
    """The engine in the training loop of a task with `online` batches (GRPO)."""

    def __init__(
        self,
        task: GRPO,
        parts: list[nn.Module],
        args: Any,
        tokenizer,
        *,
        lora: LoraSpec | None,
        device: torch.device,
        seed: int,
        local_prompts: int,
        dp_group=None,
    ) -> None:
        assert len(parts) == 1, "GRPO runs without pipeline parallelism"
        self.task, self.cfg, self.tokenizer = task, task.cfg, tokenizer
        self.policy, self.seed, self.dp_group = parts[0], seed, dp_group
        c = self.cfg
        facts = family_of_args(args).facts(args)
        self.rewards = load_rewards(
            c.rewards, format_pattern=c.format_pattern, answer_field=c.answer_field
        )
        self.weights = c.reward_weights or [1.0] * len(self.rewards)
        longest = max(task.prompts, key=lambda p: len(p.ids))
        if len(longest.ids) + c.max_completion_tokens > facts.max_seq_len:
            raise UserError(
                f"data.paths: {longest.where}: the prompt has {len(longest.ids)} tokens; with "
                f"task.max_completion_tokens={c.max_completion_tokens} that exceeds the model's "
                f"context of {facts.max_seq_len} tokens; shorten the prompt or lower "
                "task.max_completion_tokens"
            )
        self.shared = not _is_sharded(self.policy)
        model = self.policy if self.shared else self._plain_copy(args, lora, device)
        seqs = local_prompts * c.group_size
        block = 16
        blocks_per_seq = -(-(len(longest.ids) + c.max_completion_tokens) // block) + 1
        dtype = next(model.parameters()).dtype
        config = EngineConfig(
            max_model_len=facts.max_seq_len,
            kv_cache_memory=seqs * blocks_per_seq * kv_bytes_per_block(model, block, 1, dtype),
            block_size=block,
            max_num_seqs=seqs,
            max_num_batched_tokens=max(2048, seqs),
            logprobs_mode="processed",
        )
        self.engine = LLMEngine.from_model(model, tokenizer, config)
        self.stale = False  # the engine's weights are behind the policy's
        self.rounds = 0

    # -- weights -----------------------------------------------------------------------------

    def _plain_copy(self, args, lora: LoraSpec | None, device: torch.device) -> nn.Module:
        """A plain (unsharded) model like the policy, every parameter its full value."""
        model = family_of_args(args).build(args)
        if lora is not None:
            apply_lora(model, lora)
        materialize(model, device)
        self._engine_params = {canonical_name(n): p for n, p in model.named_parameters()}
        self._gather(trainable_only=False)
        return model.eval()

    @torch.no_grad()
    def _gather(self, *, trainable_only: bool) -> None:
        """Copy the policy's parameters (every rank takes part: `full_tensor` is a collective)
        into the engine's plain model."""
        for name, p in self.policy.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            full = p.full_tensor() if isinstance(p, DTensor) else p
            target = self._engine_params[canonical_name(name)]
            target.copy_(full.to(target.dtype))

    def weights_changed(self) -> None:
        """The policy took an optimizer step: the engine catches up before its next rollout."""
        self.stale = True

    def _sync(self) -> None:
        if not self.stale:
            return
        if not self.shared:
            self._gather(trainable_only=True)
        self.engine.weights_updated()
        self.stale = False

    # -- a rollout batch ---------------------------------------------------------------------

    def sample(self, prompts: list[Prompt], sample_index: list[int]) -> list[list[Completion]]:
        """`group_size` completions of each prompt from the engine, on the current weights, with
        the log-probabilities they were sampled with (log_softmax(logits / temperature))."""
        c = self.cfg
        self._sync()
        for k, (p, s) in enumerate(zip(prompts, sample_index, strict=True)):
            params = SamplingParams(
                n=c.group_size,
                max_tokens=c.max_completion_tokens,
                temperature=c.temperature,
                seed=sample_seed(self.seed, s),
                logprobs=0,
            )
            self.engine.add_request(f"rollout-{self.rounds}-{k}", p.ids, params)
        done = self.engine.run_to_completion()  # in eval mode (LoRA dropout off)
        groups = []
        for k, p in enumerate(prompts):
            out = done[f"rollout-{self.rounds}-{k}"]
            if out.error is not None:
                raise UserError(f"{p.where}: the engine refused the prompt ({out.error})")
            groups.append(
                [
                    Completion(
                        o.token_ids,
                        [lp["logprob"] for lp in o.logprobs],
                        o.text,
                        o.finish_reason == "length",
                    )
                    for o in out.outputs
                ]
            )
        return groups

    def generate(self, prompt_index: list[int], sample_index: list[int]) -> tuple[Batch, dict]:
        """Sample `group_size` completions for each prompt (indices into the task's prompts),
        score them and make the training batch; returns it with the rollout's metrics."""
        c, task = self.cfg, self.task
        start = time.perf_counter()
        prompts = [task.prompts[i] for i in prompt_index]
        groups = self.sample(prompts, sample_index)
        rollout_s = time.perf_counter() - start
        prompt_ids, completion_ids, old_logps, texts, rows, cut = [], [], [], [], [], []
        for p, group in zip(prompts, groups, strict=True):
            for completion in group:
                prompt_ids.append(p.ids)
                completion_ids.append(completion.token_ids)
                old_logps.append(completion.logprobs)
                texts.append(completion.text)
                rows.append(p)
                cut.append(float(completion.truncated))
        self.rounds += 1
        scored = score(
            self.rewards,
            self.weights,
            [p.prompt for p in rows],
            texts,
            [p.row for p in rows],
        )
        rewards = torch.tensor(scored.total, dtype=torch.float32)
        batch_std = self._global_std(rewards) if c.scale_rewards == "batch" else None
        advantages = group_advantages(rewards, c.group_size, c.scale_rewards, batch_std)
        batch = task.rollout_batch(
            prompt_ids, completion_ids, old_logps, advantages, pad_id=pad_id(self.tokenizer)
        )
        lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float32)
        prompt_lengths = torch.tensor([len(ids) for ids in prompt_ids], dtype=torch.float32)
        metrics = self._global_metrics(
            {
                "reward": rewards,
                "completion_length": lengths,
                "sequence_length": lengths + prompt_lengths,
                "truncated": torch.tensor(cut),
                **{
                    f"rewards/{r.name}": torch.tensor(scored.means[r.name]).expand(len(texts))
                    for r in self.rewards
                },
            },
            errors={r.name: scored.errors.get(r.name, 0) for r in self.rewards},
            group_std=rewards.view(-1, c.group_size).std(dim=1),
        )
        metrics["rollout_s"] = rollout_s
        # Generated tokens of the global batch per second (the ranks generate side by side).
        generated = metrics["completion_length"] * metrics["completions"]
        metrics["rollout_tokens_per_s"] = generated / rollout_s
        self.first_errors = scored.first_error  # for the log: what a failing reward raised
        return batch, metrics

    def _global_std(self, rewards: torch.Tensor) -> torch.Tensor:
        """The unbiased standard deviation of every data-parallel rank's rewards."""
        if self.dp_group is None:
            return rewards.std()
        every = [torch.empty_like(rewards) for _ in range(dist.get_world_size(self.dp_group))]
        dist.all_gather(every, rewards, group=self.dp_group)
        return torch.cat(every).std()

    def _global_metrics(
        self, values: dict[str, torch.Tensor], *, errors: dict[str, int], group_std: torch.Tensor
    ) -> dict[str, Any]:
        """Means over the global batch's completions of `values` (each (N,)), the spread of the
        rewards (standard deviation over the batch, and the mean within groups), and the
        reward functions' error counts, summed over the data-parallel ranks."""
        names = sorted(values)
        n = len(values["reward"])
        sums = torch.stack(
            [values[k].sum() for k in names]
            + [(values["reward"] ** 2).sum(), group_std.sum(), torch.tensor(float(n))]
            + [torch.tensor(float(errors[k])) for k in sorted(errors)]
        ).double()
        if self.dp_group is not None:
            dist.all_reduce(sums, group=self.dp_group)
        total = float(sums[len(names) + 2])
        out: dict[str, Any] = {k: float(sums[i]) / total for i, k in enumerate(names)}
        mean_sq = float(sums[len(names)]) / total
        groups = total / self.cfg.group_size
        out["reward_std"] = max(mean_sq - out["reward"] ** 2, 0.0) ** 0.5
        out["reward_group_std"] = float(sums[len(names) + 1]) / groups
        for i, k in enumerate(sorted(errors)):
            out[f"reward_errors/{k}"] = int(sums[len(names) + 3 + i])
        out["completions"] = int(total)
        return out
