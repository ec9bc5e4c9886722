"""Continuous batching: which sequences compute how many tokens in the next model step.

Policy (vLLM v1 / nano-vllm style), per step:

1. A token budget of `max_num_batched_tokens`. Running sequences are served first, oldest first:
   a decode takes 1 token, an unfinished chunked prefill takes min(remaining, budget).
2. A running sequence that needs a block when none is free (after evicting cached free blocks)
   preempts by recompute the most recently admitted running sequence, possibly itself: its blocks
   are freed, `num_computed_tokens` is reset to 0 and it goes back to the front of the waiting
   queue with its generated tokens, to be prefilled again in full on re-admission.
3. If nothing was preempted, waiting sequences are admitted in strict FIFO order (the head blocks
   the queue) while blocks, budget and `max_num_seqs` allow. With chunked prefill a prompt larger
   than the remaining budget is split; without it a prompt must fit the remaining budget whole.

Requests that could never run (too long for `max_model_len`, the cache or, without chunking, the
step budget) are finished at `add` with `finish_reason="error"` and a message naming the lengths;
they, and aborted sequences, are handed out once by `pop_finished`.

Plain Python: no tensors.
"""

from collections import deque
from dataclasses import dataclass, field

from parallm.errors import UserError
from parallm.inference.block_manager import BlockManager
from parallm.inference.sequence import Sequence, SequenceStatus


@dataclass(kw_only=True)
class SchedulerConfig:
    """Limits of one scheduling step and the size of the KV cache (in blocks)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int
    block_size: int = 16
    num_blocks: int
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks"):
            value = getattr(self, name)
            if value < 1:
                raise UserError(f"{name}: {value}; need at least 1")
        if self.max_model_len < 2:
            raise UserError(
                f"max_model_len: {self.max_model_len}; need at least 2 (a prompt token and a "
                "generated one)"
            )


@dataclass
class ScheduledBatch:
    """One model step: `seqs[i]` computes `num_new_tokens[i]` tokens from its
    `num_computed_tokens`; it yields a next token when that reaches its `num_tokens`."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Admits, batches, preempts and finishes sequences; owns the `BlockManager`."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self._unfinished: dict[int, Sequence] = {}
        self._finished: list[Sequence] = []  # add() errors and aborts, until pop_finished()
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- requests join and leave between steps -------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence, or finish it at once with an error if it could never run."""
        if seq.seq_id in self._unfinished:
            raise ValueError(f"seq_id: {seq.seq_id} is already scheduled")
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
        error = self._admission_error(seq)
        if error is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "error"
            seq.error = error
            self._finished.append(seq)
            return
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self._unfinished[seq.seq_id] = seq
        self.waiting.append(seq)

    def _admission_error(self, seq: Sequence) -> str | None:
        found = admission_error(self.config, seq.num_prompt_tokens, seq.max_tokens)
        return None if found is None else found[1]

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish a waiting or running sequence with "abort" and free its blocks.

        Returns it, or None when no unfinished sequence has that id.
        """
        seq = self._unfinished.get(seq_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, "abort")
        self._finished.append(seq)
        return seq

    def pop_finished(self) -> list[Sequence]:
        """Sequences finished by `add` errors or `abort` since the last call."""
        finished, self._finished = self._finished, []
        return finished

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        del self._unfinished[seq.seq_id]

    # -- the step --------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Choose the next step's sequences and token counts, allocating their blocks."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n >= 1, f"running seq {seq.seq_id} has nothing to compute"
            while not bm.can_append(seq, n):
                victim = self.running.pop()
                # Alone in the cache and still short of blocks: add() should have refused it.
                assert self.running or victim is not seq, f"seq {seq.seq_id} outgrew the cache"
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                bm.append_slots(seq, n)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        # Blocks ran short this step: admitting more would only preempt again.
        if not preempted:
            self._admit(batch, budget)
        assert not batch.is_empty or not self.has_unfinished, "no progress with work queued"
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens - bm.prefix_hit_tokens(seq)
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break  # strict FIFO: later prompts do not overtake the head
                n = budget
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            assert seq.num_tokens - seq.num_computed_tokens >= n
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Account for a finished model step; returns the sequences it finished (blocks freed).

        `sampled` maps seq_id to the next token for every scheduled sequence whose computed
        tokens reach its `num_tokens` this step; other entries are ignored. Sequences aborted
        since `schedule` are skipped.
        """
        finished: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += n
            assert seq.num_computed_tokens <= seq.num_tokens
            self.block_manager.mark_computed(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk that does not reach the end yields no token
            token = sampled[seq.seq_id]
            seq.append_token(token)
            if not seq.ignore_eos and token in seq.stop_token_ids:
                reason = "stop"
            elif seq.num_generated_tokens >= seq.max_tokens:
                reason = "length"
            else:
                continue
            self._finish(seq, reason)
            finished.append(seq)
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished


def admission_error(c: SchedulerConfig, p: int, k: int) -> tuple[str, str] | None:
    """Why a request of `p` prompt tokens and `max_tokens` `k` could never run, as (the
    field at fault, the message); None if it can. Front ends check it before queueing (a
    server's process that does not run the engine too: it needs only the config)."""
    if p < 1:
        return "prompt", "prompt is empty; give at least one token"
    if k < 1:
        return "max_tokens", f"max_tokens: {k}; need at least 1"
    if p > c.max_model_len - 1:
        return "prompt", (
            f"prompt has {p} tokens, but max_model_len={c.max_model_len} leaves room for at "
            f"most {c.max_model_len - 1} prompt tokens (one must be generated)"
        )
    if p + k > c.max_model_len:
        return "max_tokens", (
            f"prompt ({p} tokens) + max_tokens ({k}) = {p + k} exceeds "
            f"max_model_len={c.max_model_len}; lower max_tokens to at most {c.max_model_len - p}"
        )
    # KV is needed for every token but the last generated one.
    longest = p + k - 1
    blocks = -(-longest // c.block_size)
    if blocks > c.num_blocks:
        return "max_tokens", (
            f"prompt ({p} tokens) + max_tokens ({k}) needs KV for {longest} tokens = {blocks} "
            f"blocks of {c.block_size}, but the whole cache has {c.num_blocks} blocks "
            f"({c.num_blocks * c.block_size} tokens)"
        )
    if not c.enable_chunked_prefill and longest > c.max_num_batched_tokens:
        # Without chunking a sequence is prefilled in one step, and after a preemption its
        # prompt and generated tokens are prefilled again: all of it must fit one step.
        if p > c.max_num_batched_tokens:
            what = f"prompt has {p} tokens"
        else:
            what = f"prompt ({p} tokens) + max_tokens ({k}) - 1 = {longest} tokens (recomputed "
            what += "after a preemption)"
        return "max_tokens", (
            f"{what}, more than max_num_batched_tokens={c.max_num_batched_tokens}, and "
            "enable_chunked_prefill is off so it must be computed in one step; enable "
            "chunked prefill or raise max_num_batched_tokens"
        )
    return None
