"""What rank 0 tells the tensor-parallel workers: the inputs of one engine step (plain lists of
ints, so a step travels as one tensor and the workers never see a `Sequence`), or an adapter to
load into a LoRA slot between steps."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepInputs:
    """Everything a rank needs to run one step. B sequences, N = sum(lengths) tokens."""

    token_ids: list[int]  # (N,) the new tokens, sequence after sequence
    starts: list[int]  # (B,) first position each sequence computes
    lengths: list[int]  # (B,) how many tokens it computes
    block_tables: list[list[int]]  # (B, ceil(context / block_size)) the blocks in use
    logit_rows: list[int]  # (R,) flat indices of the tokens whose logits are needed, ascending
    lora_slots: list[int] = field(default_factory=list)  # (B,) adapter slot, -1: base; [] all base


@dataclass(frozen=True)
class LoadLora:
    """Load the peft adapter directory `path` (absolute) into LoRA slot `slot` (rank 0 has
    checked it against the base model already)."""

    slot: int
    path: str
