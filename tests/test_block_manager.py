"""BlockManager: allocation, reference counts, chained prefix hashes, LRU eviction, invariants."""

import random

import pytest

from parallm.inference.block_manager import BlockManager, hash_block
from parallm.inference.sequence import Sequence

BS = 4  # small blocks keep the token lists readable


def make_seq(seq_id: int, tokens: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(
        seq_id=seq_id, token_ids=tokens, num_prompt_tokens=len(tokens), max_tokens=max_tokens
    )


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does after a step that prefilled the whole sequence."""
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)


def assert_all_free(bm: BlockManager) -> None:
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.usage == 0.0


def test_allocate_free_round_trip_returns_every_block():
    bm = BlockManager(8, BS)
    seqs = [make_seq(i, list(range(100 * i, 100 * i + 5 + i))) for i in range(3)]
    for seq in seqs:
        assert bm.can_allocate(seq)
        bm.allocate(seq)
        assert len(seq.block_table) == -(-seq.num_tokens // BS)
        assert seq.num_computed_tokens == seq.num_cached_tokens == 0
    tables = [b for s in seqs for b in s.block_table]
    assert len(set(tables)) == len(tables) == 2 + 2 + 2
    assert bm.num_free_blocks == 2 and bm.usage == pytest.approx(6 / 8)
    assert not bm.can_allocate(make_seq(9, list(range(9))))  # 3 blocks, 2 free
    for seq in seqs:
        compute_all(bm, seq)
        bm.free(seq)
        assert seq.block_table == []
    assert_all_free(bm)


def test_slot_maps_positions_through_the_block_table():
    bm = BlockManager(8, BS)
    seq = make_seq(0, list(range(6)))
    bm.allocate(seq)
    seq.block_table = [5, 2]  # a table in any order: slots follow it
    assert [bm.slot(seq, p) for p in range(6)] == [20, 21, 22, 23, 8, 9]
    seq.block_table = []


def test_shared_prefix_reuses_blocks_with_ref_counts():
    bm = BlockManager(16, BS)
    prefix = list(range(8))  # two full blocks
    a = make_seq(0, prefix + [50, 51, 52])
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(1, prefix + [60])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 16 - 3
    bm.free(b)
    assert_all_free(bm)


def test_chained_hash_matches_only_after_the_same_prefix():
    x, y, z = (1, 2, 3, 4), (5, 6, 7, 8), (9, 9, 9, 9)
    assert hash_block(hash_block(0, x), y) != hash_block(hash_block(0, z), y)
    bm = BlockManager(16, BS)
    a = make_seq(0, [*x, *y, 0])
    b = make_seq(1, [*z, *y, 0])
    for seq in (a, b):
        bm.allocate(seq)
        assert seq.num_cached_tokens == 0  # b's second block equals a's, its prefix does not
        compute_all(bm, seq)
    # Both copies of `y` were published, under different chained hashes.
    c = make_seq(2, [*z, *y, 1])
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == b.block_table[:2]
    d = make_seq(3, [*y, *y, 1])  # `y` first: matches neither copy
    bm.allocate(d)
    assert d.num_cached_tokens == 0
    for seq in (a, b, c, d):
        bm.free(seq)
    assert_all_free(bm)


def test_whole_prompt_hit_backs_off_to_recompute_the_last_token():
    bm = BlockManager(16, BS)
    prompt = list(range(8))  # exactly two full blocks
    a = make_seq(0, prompt)
    bm.allocate(a)
    compute_all(bm, a)
    again = make_seq(1, prompt)
    assert bm.prefix_hit_tokens(again) == 4  # the block with the last token is not reused
    bm.allocate(again)
    assert again.num_computed_tokens == again.num_cached_tokens == 4
    assert again.block_table[0] == a.block_table[0]
    assert again.block_table[1] != a.block_table[1]  # private: the model rewrites token 7
    longer = make_seq(2, prompt + [8])
    bm.allocate(longer)
    assert longer.num_cached_tokens == 8 and longer.block_table[:2] == a.block_table
    for seq in (a, again, longer):
        bm.free(seq)
    assert_all_free(bm)


def test_one_token_prompt_and_disabled_cache_never_hit():
    bm = BlockManager(4, BS)
    one = make_seq(0, [7])
    bm.allocate(one)
    assert one.num_cached_tokens == 0
    compute_all(bm, one)
    bm.free(one)
    off = BlockManager(4, BS, enable_prefix_caching=False)
    for i in range(2):
        seq = make_seq(i, list(range(9)))
        off.allocate(seq)
        assert seq.num_cached_tokens == 0
        compute_all(off, seq)
        off.free(seq)
    assert off.prefix_hits == 0 and off.hit_rate == 0.0
    assert_all_free(bm)
    assert_all_free(off)


def test_freed_cached_blocks_are_evicted_least_recently_used_first():
    bm = BlockManager(6, BS)
    prompts = {i: [10 * i + t for t in range(BS)] + [99] for i in range(3)}  # 1 full block each
    for i, prompt in prompts.items():  # free in order 0, 1, 2: block of 0 is the oldest
        seq = make_seq(i, prompt)
        bm.allocate(seq)
        compute_all(bm, seq)
        bm.free(seq)
    assert_all_free(bm)  # cached blocks still count as free
    # Revive prompt 0's block: it becomes the most recently used.
    hit = make_seq(10, prompts[0])
    bm.allocate(hit)
    assert hit.num_cached_tokens == BS
    bm.free(hit)
    # 3 uncached blocks are left; a 5-block sequence uses them first, then evicts 2 cached ones,
    # oldest first: prompt 1's, then prompt 2's block (of prompt 0's, only the tail was evicted).
    big = make_seq(11, list(range(1000, 1000 + 5 * BS)))
    bm.allocate(big)
    assert bm.num_free_blocks == 1
    hits = {i: bm.prefix_hit_tokens(make_seq(20 + i, prompts[i])) for i in prompts}
    assert hits == {0: BS, 1: 0, 2: 0}
    bm.free(big)
    assert_all_free(bm)


def test_free_releases_the_tail_first_so_prefix_blocks_survive_eviction():
    bm = BlockManager(4, BS)
    seq = make_seq(0, list(range(3 * BS + 1)))  # 4 blocks, 3 full
    bm.allocate(seq)
    compute_all(bm, seq)
    bm.free(seq)
    other = make_seq(1, list(range(500, 500 + BS + 1)))  # needs 2 blocks: takes the uncached
    bm.allocate(other)  # tail block and evicts the last full block of `seq`
    assert bm.prefix_hit_tokens(make_seq(2, list(range(3 * BS + 1)))) == 2 * BS
    bm.free(other)
    assert_all_free(bm)


def test_hit_rate_and_usage_counters():
    bm = BlockManager(10, BS)
    a = make_seq(0, list(range(10)))  # 3 blocks
    bm.allocate(a)
    assert bm.usage == pytest.approx(0.3) and bm.hit_rate == 0.0
    compute_all(bm, a)
    b = make_seq(1, list(range(10)))  # 2 full blocks cached, neither holds the last token
    bm.allocate(b)
    assert (bm.prefix_queries, bm.prefix_hits) == (20, 8)
    assert bm.hit_rate == pytest.approx(8 / 20)
    assert bm.usage == pytest.approx(0.4)  # b shares 2 blocks, owns 1
    bm.free(a)
    bm.free(b)
    assert_all_free(bm)


def test_append_slots_grows_the_table_one_block_at_a_time():
    bm = BlockManager(3, BS)
    seq = make_seq(0, list(range(BS)))
    bm.allocate(seq)
    compute_all(bm, seq)
    assert bm.can_append(seq, 1)
    seq.append_token(1)
    bm.append_slots(seq, 1)  # position BS opens block 2
    assert len(seq.block_table) == 2
    bm.append_slots(seq, 1)  # same position: nothing new
    assert len(seq.block_table) == 2
    assert bm.can_append(seq, BS + 1) and not bm.can_append(seq, 2 * BS + 1)
    bm.free(seq)
    assert_all_free(bm)


def test_random_operations_keep_the_partition_and_the_cached_contents_right():
    """Model-based check: random allocate / compute / append / free, against a simulated cache.

    The fake KV cache records, per slot, the (position, token) written there; a prefix hit must
    find exactly the hit tokens of the new sequence, which catches any wrong sharing or eviction.
    """
    rng = random.Random(0)
    bm = BlockManager(24, BS)
    kv: dict[int, tuple[int, int]] = {}
    live: list[Sequence] = []
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(4)]
    next_id = 0

    def write(seq: Sequence, start: int, end: int) -> None:
        for p in range(start, end):
            kv[bm.slot(seq, p)] = (p, seq.token_ids[p])

    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            tail = [rng.randrange(5) for _ in range(rng.randrange(1, 8))]
            seq = make_seq(next_id, rng.choice(prefixes) + tail)
            next_id += 1
            if bm.can_allocate(seq):
                bm.allocate(seq)
                assert seq.num_cached_tokens % BS == 0 and seq.num_cached_tokens < seq.num_tokens
                for p in range(seq.num_cached_tokens):
                    assert kv[bm.slot(seq, p)] == (p, seq.token_ids[p])
                live.append(seq)
        elif op < 0.65 and live:  # compute a chunk
            seq = rng.choice(live)
            left = seq.num_tokens - seq.num_computed_tokens
            if left:
                n = rng.randrange(1, left + 1)
                write(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
                seq.num_computed_tokens += n
                bm.mark_computed(seq)
        elif op < 0.85 and live:  # decode one token when the prompt is done
            seq = rng.choice(live)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(5))
                if bm.can_append(seq, 1):
                    bm.append_slots(seq, 1)
                else:
                    bm.free(seq)
                    live.remove(seq)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        bm.check_invariants()
        refs = [0] * bm.num_blocks
        for seq in live:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for b in seq.block_table:
                refs[b] += 1
        assert refs == [bm.ref_count(b) for b in range(bm.num_blocks)]
        assert bm.num_free_blocks == refs.count(0)
    assert bm.prefix_hits > 0  # the run exercised sharing
    for seq in live:
        bm.free(seq)
    assert_all_free(bm)
