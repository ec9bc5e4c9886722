"""Scheduler: token budget, chunked prefill, FIFO admission, preemption by recompute, aborts,
admission errors and stop conditions, driven by a fake model over a simulated paged KV cache."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parallm.errors import UserError
from parallm.inference.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from parallm.inference.sequence import Sequence, SequenceStatus

ROOT = Path(__file__).resolve().parents[1]


def make_seq(seq_id: int, prompt: list[int], max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        token_ids=prompt,
        num_prompt_tokens=len(prompt),
        max_tokens=max_tokens,
        **kw,
    )


def make_sched(**kw) -> Scheduler:
    kw = {"max_model_len": 64, "num_blocks": 64, "block_size": 4, **kw}
    return Scheduler(SchedulerConfig(**kw))


def next_token(tokens: list[int]) -> int:
    """The fake model: depends on the last token and its position."""
    return (tokens[-1] * 7 + len(tokens)) % 100


class FakeModel:
    """Runs a batch over a simulated paged KV cache that stores (position, token) per slot.

    Before computing, every earlier position of each scheduled sequence must read back its own
    token from the cache: a block wrongly shared, overwritten or evicted fails here.
    """

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv: dict[int, tuple[int, int]] = {}
        self.batches: list[list[tuple[int, int]]] = []  # (seq_id, num_new_tokens) per step

    def step(self) -> tuple[ScheduledBatch, list[Sequence]]:
        sched, bm = self.sched, self.sched.block_manager
        batch = sched.schedule()
        c = sched.config
        assert batch.num_batched_tokens <= c.max_num_batched_tokens
        assert sched.num_running <= c.max_num_seqs
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
        sampled = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            assert seq.status is SequenceStatus.RUNNING and n >= 1
            start = seq.num_computed_tokens
            for p in range(start):
                assert self.kv[bm.slot(seq, p)] == (p, seq.token_ids[p]), (seq.seq_id, p)
            for p in range(start, start + n):
                assert bm.ref_count(seq.block_table[p // bm.block_size]) == 1  # private block
                self.kv[bm.slot(seq, p)] = (p, seq.token_ids[p])
            if start + n == seq.num_tokens:
                sampled[seq.seq_id] = next_token(seq.token_ids)
        self.batches.append(
            [(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
        )
        finished = sched.update(batch, sampled)
        sched.block_manager.check_invariants()
        return batch, finished

    def run(self, max_steps: int = 1000) -> list[Sequence]:
        finished = []
        for _ in range(max_steps):
            if not self.sched.has_unfinished:
                break
            finished += self.step()[1]
        assert not self.sched.has_unfinished
        assert_all_freed(self.sched)
        return finished


def assert_all_freed(sched: Scheduler) -> None:
    bm = sched.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0


def expected_generation(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def test_steps_after_prefill_are_decode_only():
    sched = make_sched()
    seqs = [make_seq(i, [i + 1] * (3 + i), max_tokens=5) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    model = FakeModel(sched)
    finished = model.run()
    assert model.batches[0] == [(0, 3), (1, 4), (2, 5)]
    assert model.batches[1:] == [[(0, 1), (1, 1), (2, 1)]] * 4
    assert finished == seqs
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.generated_ids == expected_generation(seq.token_ids[: seq.num_prompt_tokens], 5)


def test_chunked_prefill_splits_a_long_prompt_and_shares_steps_with_decodes():
    sched = make_sched(max_num_batched_tokens=16)
    short, long = make_seq(0, [1, 2, 3, 4], max_tokens=6), make_seq(1, list(range(40)), 2)
    sched.add(short)
    sched.add(long)
    model = FakeModel(sched)
    model.run()
    assert model.batches[:4] == [
        [(0, 4), (1, 12)],
        [(0, 1), (1, 15)],
        [(0, 1), (1, 13)],  # the last chunk completes the prompt and yields a token
        [(0, 1), (1, 1)],
    ]
    assert long.generated_ids == expected_generation(list(range(40)), 2)
    assert short.num_generated_tokens == 6


def test_without_chunking_a_prompt_waits_for_budget_and_later_ones_do_not_overtake():
    sched = make_sched(max_num_batched_tokens=16, enable_chunked_prefill=False)
    a, b, c = make_seq(0, [1] * 10), make_seq(1, [2] * 12), make_seq(2, [3] * 2)
    for seq in (a, b, c):
        sched.add(seq)
    model = FakeModel(sched)
    model.step()
    assert model.batches[0] == [(0, 10)]  # b does not fit the 6 left; c waits behind b
    assert sched.num_waiting == 2
    model.step()
    assert model.batches[1] == [(0, 1), (1, 12), (2, 2)]
    model.run()


def test_without_chunking_a_prompt_over_the_budget_is_an_error_at_add():
    sched = make_sched(max_num_batched_tokens=8, enable_chunked_prefill=False)
    long, regrow = make_seq(0, list(range(9)), max_tokens=1), make_seq(1, [1] * 4, max_tokens=6)
    sched.add(long)
    sched.add(regrow)  # 4 + 6 - 1 = 9 tokens to prefill again after a preemption
    assert long.finish_reason == "error" and "prompt has 9 tokens" in long.error
    assert "max_num_batched_tokens=8" in long.error
    assert regrow.finish_reason == "error" and "= 9 tokens" in regrow.error
    assert sched.pop_finished() == [long, regrow]
    assert not sched.has_unfinished


def test_fifo_admission_respects_max_num_seqs():
    sched = make_sched(max_num_seqs=2)
    seqs = [make_seq(i, [i + 1] * 2, max_tokens=2 + (i == 0)) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    model = FakeModel(sched)
    model.run()
    admitted = [sid for batch in model.batches for sid, n in batch if n == 2]
    assert admitted == [0, 1, 2, 3]
    assert model.batches[2] == [(0, 1), (2, 2)]  # 1 finished; 2 takes its place, 3 waits


def test_preemption_recomputes_the_newest_sequence_and_it_resumes_from_the_front():
    sched = make_sched(block_size=2, num_blocks=4, max_model_len=8, max_num_seqs=2)
    a, b, c = make_seq(0, [1, 2]), make_seq(1, [3, 4]), make_seq(2, [5])
    for seq in (a, b, c):
        sched.add(seq)
    model = FakeModel(sched)
    for _ in range(3):  # a and b prefill, then decode into their second blocks; c waits
        model.step()
    assert sched.num_preemptions == 0
    model.step()  # a's position 4 needs a block: b, the newest, is preempted
    assert model.batches[3] == [(0, 1)]
    assert sched.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_generated_tokens == 3
    assert list(sched.waiting) == [b, c]
    assert a.finish_reason == "length"  # a's last token: b and c are admitted next step
    model.step()
    # b's tail block went to a (evicted tail first); its first block still hits the cache.
    assert model.batches[4] == [(1, 3), (2, 1)]
    assert b.num_cached_tokens == 2
    model.run()
    for seq in (a, b, c):
        assert seq.finish_reason == "length"
        assert seq.generated_ids == expected_generation(seq.token_ids[: seq.num_prompt_tokens], 4)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preempted_sequences_complete_exactly_like_an_unconstrained_run(chunked, prefix_caching):
    prompts = [[(7 * i + t) % 50 for t in range(6 + i)] for i in range(5)] + [[1, 2, 3, 4, 5, 6]]
    results = {}
    for num_blocks in (100, 10):
        sched = make_sched(
            num_blocks=num_blocks,
            max_num_batched_tokens=24,
            enable_chunked_prefill=chunked,
            enable_prefix_caching=prefix_caching,
        )
        seqs = [make_seq(i, p, max_tokens=12) for i, p in enumerate(prompts)]
        for seq in seqs:
            sched.add(seq)
        finished = FakeModel(sched).run()
        assert sorted(s.seq_id for s in finished) == list(range(len(prompts)))
        assert all(s.num_generated_tokens == 12 and s.finish_reason == "length" for s in seqs)
        results[num_blocks] = ([s.token_ids for s in seqs], sched.num_preemptions)
    assert results[100][1] == 0 and results[10][1] > 0
    assert results[10][0] == results[100][0]


def test_prefix_cache_hits_skip_computed_tokens():
    sched = make_sched()
    first = make_seq(0, list(range(10)), max_tokens=1)
    sched.add(first)
    model = FakeModel(sched)
    model.run()
    second = make_seq(1, list(range(10)) + [42], max_tokens=1)
    sched.add(second)
    model.run()
    assert second.num_cached_tokens == 8
    assert model.batches[-1] == [(1, 3)]
    assert sched.block_manager.prefix_hits == 8


def test_abort_waiting_and_running_sequences_frees_their_blocks():
    sched = make_sched(max_num_seqs=1)
    running, waiting = make_seq(0, [1] * 9, max_tokens=20), make_seq(1, [2] * 3)
    sched.add(running)
    sched.add(waiting)
    model = FakeModel(sched)
    model.step()
    assert sched.block_manager.num_free_blocks < sched.block_manager.num_blocks
    assert sched.abort(1) is waiting and sched.abort(0) is running
    assert sched.abort(0) is None and sched.abort(123) is None
    for seq in (running, waiting):
        assert seq.is_finished and seq.finish_reason == "abort" and seq.block_table == []
    assert sched.pop_finished() == [waiting, running]
    assert sched.pop_finished() == []
    assert not sched.has_unfinished
    assert_all_freed(sched)


def test_abort_between_schedule_and_update_is_skipped_by_update():
    sched = make_sched()
    a, b = make_seq(0, [1, 2]), make_seq(1, [3, 4])
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.abort(0)
    assert sched.update(batch, {0: 5, 1: 6}) == []
    assert a.num_generated_tokens == 0 and b.generated_ids == [6]
    sched.abort(1)
    assert_all_freed(sched)


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "message"),
    [
        (64, 1, "prompt has 64 tokens, but max_model_len=64 leaves room for at most 63"),
        (60, 5, "prompt (60 tokens) + max_tokens (5) = 65 exceeds max_model_len=64"),
        (30, 20, "needs KV for 49 tokens = 13 blocks of 4, but the whole cache has 12 blocks"),
        (0, 1, "prompt is empty"),
        (3, 0, "max_tokens: 0"),
    ],
)
def test_impossible_requests_finish_with_an_error_naming_the_lengths(
    prompt_len, max_tokens, message
):
    sched = make_sched(num_blocks=12)
    seq = make_seq(7, [1] * prompt_len, max_tokens=max_tokens)
    sched.add(seq)
    assert seq.is_finished and seq.finish_reason == "error"
    assert message in seq.error
    assert seq.token_ids == [1] * prompt_len  # never truncated
    assert not sched.has_unfinished and sched.schedule().is_empty
    assert sched.pop_finished() == [seq]
    assert_all_freed(sched)


def test_stop_token_finishes_unless_ignore_eos():
    gen = expected_generation([3], 6)
    stop = gen[2]
    assert stop not in gen[:2]
    sched = make_sched()
    stopped = make_seq(0, [3], max_tokens=6, stop_token_ids=frozenset({stop}))
    ignored = make_seq(1, [3], max_tokens=6, stop_token_ids=frozenset({stop}), ignore_eos=True)
    sched.add(stopped)
    sched.add(ignored)
    FakeModel(sched).run()
    assert stopped.finish_reason == "stop" and stopped.generated_ids == gen[:3]
    assert ignored.finish_reason == "length" and ignored.generated_ids == gen


def test_duplicate_seq_id_and_bad_config_are_user_errors():
    sched = make_sched()
    sched.add(make_seq(0, [1]))
    with pytest.raises(ValueError, match="seq_id: 0"):
        sched.add(make_seq(0, [2]))
    sched.abort(0)
    with pytest.raises(UserError, match="num_blocks: 0"):
        SchedulerConfig(max_model_len=8, num_blocks=0)
    with pytest.raises(UserError, match="max_model_len: 1"):
        SchedulerConfig(max_model_len=1, num_blocks=4)


def test_sequence_copies_its_prompt():
    prompt = [1, 2]
    seq = make_seq(0, prompt)
    seq.append_token(3)
    assert prompt == [1, 2] and seq.generated_ids == [3] and seq.num_generated_tokens == 1
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        Sequence(seq_id=1, token_ids=[1], num_prompt_tokens=2, max_tokens=1)


def test_scheduler_block_manager_and_sequence_never_import_torch():
    # Stub the parent packages: `parallm/__init__` itself loads torch-backed model code.
    code = textwrap.dedent(
        f"""
        import sys, types
        sys.modules["torch"] = None
        for name, path in [("parallm", {str(ROOT / "parallm")!r}),
                           ("parallm.inference", {str(ROOT / "parallm" / "inference")!r})]:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
        import parallm.inference.sequence, parallm.inference.block_manager
        import parallm.inference.scheduler
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
