"""Runs the model on one scheduled step over the paged KV cache and returns next-token logits.

The step's tokens (prompt chunks and single decode tokens of every scheduled sequence) are one
flat (1, N) batch; only sequences whose last token is in this step get a logits row to sample,
and prompt positions whose logits a request wants (prompt log-probabilities) get one each.

With tensor parallelism every rank runs the same step on its shard: rank 0 `prepare`s the step
from its sequences and sends the resulting `StepInputs` to the other ranks (`execute`), which
receive and run them in `follow`. The inputs are plain lists of ints, so they travel as one
tensor and the workers never see a `Sequence`.

With LoRA slots (`lora`), each sequence's slot travels with the step; the bank turns the slots
into rows per adapter before the forward, so the model call itself does not change. Adapters
are loaded between steps (`load_lora`), on every rank.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from parallm.inference.flex_attention import make_backend
from parallm.inference.host_memory import keep_freed_memory
from parallm.inference.lora import LoraBank
from parallm.inference.packed_linear import PackedLinears
from parallm.inference.paged_attention import KVPool, StepMetadata
from parallm.inference.sequence import Sequence
from parallm.inference.step_inputs import LoadLora, StepInputs
from parallm.inference.tp import TPGroup
from parallm.models.peft_format import Adapter, read_adapter
from parallm.models.registry import family_of_model

GiB = 2**30


def local_kv_heads(model: nn.Module, tp_size: int = 1) -> int:
    """KV heads this process holds (all of them, or its tensor-parallel share)."""
    return family_of_model(model).facts(model.args).n_kv_heads // tp_size


def kv_bytes_per_block(model: nn.Module, block_size: int, tp_size: int, dtype) -> int:
    facts = family_of_model(model).facts(model.args)
    return KVPool.bytes_per_block(facts, block_size, local_kv_heads(model, tp_size), dtype)


@dataclass
class PromptRows:
    """Logits rows `first_row .. first_row + count - 1` of a step are those of `seq`'s prompt
    positions `first_position ..` (each scores the prompt token after it)."""

    seq: Sequence
    first_position: int
    count: int
    first_row: int


@dataclass
class StepOutput:
    """One step's logits (R, vocab) in the model's dtype (None when R = 0): the rows
    `sample_rows[i]` belong to `sampled[i]`, which reached its last token; `prompt_rows` name
    the others."""

    logits: torch.Tensor | None
    sampled: list[Sequence]
    sample_rows: list[int]
    prompt_rows: list[PromptRows]


class ModelRunner:
    """Owns the KV pool and the paged backend; `execute` runs one step.

    `tp`: the tensor-parallel group when the model is a shard (rank 0 sends each step to it).
    `lora`: the model's adapter slots (None: adapters not enabled).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_blocks: int,
        block_size: int,
        tp: TPGroup | None = None,
        attention_backend: str = "auto",
        lora: LoraBank | None = None,
        packed_linears: bool = True,
        decode_kernel: bool = True,
    ) -> None:
        self.model = model
        self.lora = lora
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.device.type == "cpu":
            keep_freed_memory()  # steps reuse their freed tensors' pages (host_memory.py)
        self.block_size = block_size
        self.tp = tp
        spec = family_of_model(model)
        self.pool = KVPool(
            spec.facts(model.args),
            num_blocks=num_blocks,
            block_size=block_size,
            n_kv_heads=local_kv_heads(model, tp.size if tp is not None else 1),
            dtype=self.dtype,
            device=self.device,
        )
        self.backend = make_backend(attention_backend, self.pool, decode_kernel=decode_kernel)
        # What each step's tokens may attend to: the family's rule (causal for language models).
        self.attention = spec.attention
        # On a CPU, linear layers run on oneDNN-packed weights during steps (packed_linear.py).
        self.packed = PackedLinears(model) if packed_linears else None

    def execute(self, seqs: list[Sequence], num_new_tokens: list[int]) -> StepOutput:
        """Compute the step: the logits of the sequences that reach their last token this step
        (to be sampled) and of the prompt positions whose logits are wanted."""
        step, out = self.prepare(seqs, num_new_tokens)
        if self.tp is not None:
            self.tp.send_step(step)
        out.logits = self.run(step)
        return out

    def prepare(
        self, seqs: list[Sequence], num_new_tokens: list[int]
    ) -> tuple[StepInputs, StepOutput]:
        """The step's inputs, and which logits row will belong to what (logits still None)."""
        step = StepInputs([], [], list(num_new_tokens), [], [])
        out = StepOutput(None, [], [], [])
        offset = 0
        for seq, n in zip(seqs, num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            step.lora_slots.append(seq.lora_slot)
            step.token_ids.extend(seq.token_ids[start : start + n])
            step.starts.append(start)
            # Only the blocks holding positions [0, start + n): the rest may be pre-allocated.
            step.block_tables.append(seq.block_table[: -(-(start + n) // self.block_size)])
            if seq.prompt_logits_from is not None:
                # Positions [lo, hi) score prompt tokens lo + 1 .. hi; the last prompt position
                # is the sampled row. Positions before `prompt_logits_from` were taken already.
                lo = max(start, seq.prompt_logits_from)
                hi = min(start + n, seq.num_prompt_tokens - 1)
                if lo < hi:
                    out.prompt_rows.append(PromptRows(seq, lo, hi - lo, len(step.logit_rows)))
                    step.logit_rows.extend(range(offset + lo - start, offset + hi - start))
            offset += n
            if start + n == seq.num_tokens:  # the step ends at the sequence's last token
                out.sample_rows.append(len(step.logit_rows))
                step.logit_rows.append(offset - 1)
                out.sampled.append(seq)
        return step, out

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor | None:
        """Run the model on `step`: logits (R, vocab) in the model's dtype, or None when R = 0
        (prompt chunks that need no logits only fill the cache)."""
        positions = [
            p for s, n in zip(step.starts, step.lengths, strict=True) for p in range(s, s + n)
        ]
        self.backend.metadata = StepMetadata.build(
            step.starts, step.lengths, step.block_tables, self.block_size, self.device
        )
        input_ids = torch.tensor([step.token_ids], device=self.device)  # (1, N)
        pos = torch.tensor([positions], device=self.device)  # (1, N)
        rows = torch.tensor(step.logit_rows, dtype=torch.long, device=self.device)  # (R,)
        if self.lora is not None:
            self.lora.set_step(
                step.lora_slots or [-1] * len(step.lengths), step.lengths, self.device
            )
        with self.packed.active() if self.packed is not None else nullcontext():
            logits = self.model(
                input_ids, pos, attention=self.attention, backend=self.backend, logit_rows=rows
            )[0]
        return logits if step.logit_rows else None

    def load_lora(self, slot: int, adapter: Adapter, path: str) -> None:
        """Rank 0: put `adapter` (checked against the bank), read from `path`, into `slot` on
        every rank."""
        assert self.lora is not None, "adapters are not enabled"
        if self.tp is not None:
            self.tp.send_lora(LoadLora(slot, path))
        self.lora.load(slot, adapter)

    def follow(self) -> None:
        """On a tensor-parallel worker: run rank 0's steps, and load the adapters it names,
        until it stops the group."""
        assert self.tp is not None and self.tp.rank != 0, "only a worker rank follows"
        while (message := self.tp.recv_step()) is not None:
            if isinstance(message, LoadLora):
                assert self.lora is not None, "adapters are not enabled"
                self.lora.load(message.slot, read_adapter(message.path, self.model.args))
            else:
                self.run(message)
