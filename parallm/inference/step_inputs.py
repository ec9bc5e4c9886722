"""What one engine step runs: plain lists of ints, so a step travels to tensor-parallel workers
as one tensor and the workers never see a `Sequence`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepInputs:
    """Everything a rank needs to run one step. B sequences, N = sum(lengths) tokens."""

    token_ids: list[int]  # (N,) the new tokens, sequence after sequence
    starts: list[int]  # (B,) first position each sequence computes
    lengths: list[int]  # (B,) how many tokens it computes
    block_tables: list[list[int]]  # (B, ceil(context / block_size)) the blocks in use
    logit_rows: list[int]  # (R,) flat indices of the tokens whose logits are needed, ascending
