"""One generation request's token stream and its bookkeeping for the scheduler.

Plain Python, no tensors: the scheduler, the block manager and the model runner all read and
advance the same `Sequence`.
"""

import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued (no KV blocks), running (holds blocks), or done."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """A prompt and the tokens generated after it.

    `token_ids` is the prompt followed by the generated tokens. `num_computed_tokens` counts the
    leading tokens whose KV is in the cache (prefix-cache hits included); the next step computes
    tokens from there. After a preemption by recompute it is reset to 0 and the whole of
    `token_ids` (prompt and generated so far) is prefilled again, while `max_tokens` keeps counting
    only tokens after the first `num_prompt_tokens`.

    `prompt_logits_from`: for a request with prompt log-probabilities, the first prompt position
    whose logits are still wanted (the logits at position i score prompt token i + 1); None when
    none are. While it is set the sequence takes no prefix-cache hits: cached tokens are never
    computed, so they have no logits.

    `lora_slot`: the LoRA adapter slot the model applies to its tokens (-1: the base model);
    `lora_key`: which load of an adapter that is (0: none), unique per load, so that its KV
    blocks are cached apart from the base's and another adapter's (a slot is reused).

    Identity equality (`eq=False`): two requests with the same tokens are different sequences.
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    prompt_logits_from: int | None = None
    lora_slot: int = -1
    lora_key: int = 0
    finish_reason: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        # Own copies: the caller's prompt list must not grow as tokens are generated.
        self.token_ids = list(self.token_ids)
        self.stop_token_ids = frozenset(self.stop_token_ids)
        if not 0 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(
                f"num_prompt_tokens: {self.num_prompt_tokens} must lie in "
                f"[0, len(token_ids)={len(self.token_ids)}]"
            )

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        """Tokens after the prompt."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt (what repetition penalties count besides the output)."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def generated_ids(self) -> list[int]:
        """A copy of the tokens after the prompt."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add one sampled token; its KV is computed by the next step."""
        self.token_ids.append(token_id)
