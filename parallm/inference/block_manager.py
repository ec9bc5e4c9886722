"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

Pure Python: it hands out block ids and never touches a tensor, so it is tested in milliseconds.

Every block is in exactly one of three states:

- free, uncached: ref count 0, no hash; handed out first.
- free, cached (evictable): ref count 0, but its full, computed KV is still registered under its
  prefix hash, so a later sequence with the same prefix can revive it. Evicted least recently
  freed first, and only when no uncached free block is left.
- in use: ref count > 0 (more than 1 when sequences share a prefix).

A full block's hash is chained: `hash_block(parent_hash, tokens)` covers the hash of the block
before it, so a block only matches after the very same prefix. The chain of a sequence served
through a LoRA adapter starts from a root of its own (`root_hash`): the same tokens give other
KV there, so nothing is shared across adapters. When the model's weights change in place (a
trainer's step), `reset_prefix_cache` forgets every cached prefix.
"""

from collections import OrderedDict, deque

from parallm.inference.sequence import Sequence

# Parent hash of a sequence's first block. An int, since `hash(None)` is address-based (and so
# differs between processes) before Python 3.12.
_ROOT_HASH = 0


def root_hash(seq: Sequence) -> int:
    """The parent hash of the first block of `seq`: the base model's, or one per adapter load."""
    return _ROOT_HASH if seq.lora_key == 0 else hash((-1, seq.lora_key))


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Prefix hash of one full block: chained over the hash of the block before it.

    Python's `hash` of a tuple of ints is deterministic (hash randomisation touches only str and
    bytes), so this is stable across processes of one Python version. It is 64 bits wide; a hit
    also compares the block's tokens, so a false hit needs a collision of the whole chain.
    """
    return hash((parent_hash, token_ids))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Allocates KV-cache blocks to sequences, with reference counts and prefix caching.

    `num_computed_tokens` on a sequence drives the prefix cache: `allocate` sets it to the length
    of the reused prefix, the caller advances it after each model step and calls `mark_computed`
    to publish the blocks that became full.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: {num_blocks}; need at least 1")
        if block_size < 1:
            raise ValueError(f"block_size: {block_size}; need at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free, uncached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, cached; oldest first
        self._cached: dict[int, int] = {}  # prefix hash -> block id
        # seq_id -> hashes of the sequence's leading full blocks already hashed (hit or published).
        self._seq_hashes: dict[int, list[int]] = {}
        self.prefix_queries = 0  # prompt tokens looked up, over all allocations
        self.prefix_hits = 0  # of those, tokens served from the prefix cache

    # -- state -----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out: uncached free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (evictable cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hits over prompt tokens looked up; 0 before any allocation."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        """How many sequences hold `block_id`."""
        return self._ref_counts[block_id]

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat KV-cache slot of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + (
            position % self.block_size
        )

    # -- prefix lookup ---------------------------------------------------------------------------

    def _match(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks (and their hashes) for the leading full blocks of `seq`; pure.

        The block holding the last token is never reused: that token has to be recomputed so the
        model yields logits for the next one (and the block stays private, so no copy-on-write).
        A sequence that wants prompt logits reuses nothing (it still publishes its blocks).
        """
        if not self.enable_prefix_caching or seq.prompt_logits_from is not None:
            return [], []
        bs = self.block_size
        blocks: list[int] = []
        hashes: list[int] = []
        parent = root_hash(seq)
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block = self._cached.get(h)
            if block is None or self._block_tokens[block] != tokens:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def prefix_hit_tokens(self, seq: Sequence) -> int:
        """Tokens of `seq` that `allocate` would take from the prefix cache now (no side effects)."""
        return len(self._match(seq)[0]) * self.block_size

    # -- allocation ------------------------------------------------------------------------------

    def _blocks_needed(self, seq: Sequence, hits: list[int]) -> int:
        # Hits on blocks in use cost nothing; hits on evictable blocks take one from the free pool.
        shared = sum(1 for b in hits if self._ref_counts[b] > 0)
        return _cdiv(seq.num_tokens, self.block_size) - shared

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for all of `seq.token_ids` are available (after prefix reuse)."""
        return self._blocks_needed(seq, self._match(seq)[0]) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence without blocks blocks for all its tokens, reusing cached prefix blocks.

        Sets `num_computed_tokens` and `num_cached_tokens` to the length of the reused prefix.
        """
        assert not seq.block_table, f"seq {seq.seq_id} already holds blocks"
        assert seq.seq_id not in self._seq_hashes, f"seq {seq.seq_id} allocated twice"
        hits, hashes = self._match(seq)
        assert self._blocks_needed(seq, hits) <= self.num_free_blocks, "allocate without room"
        for block in hits:  # claim the hits first so taking new blocks cannot evict them
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        new = _cdiv(seq.num_tokens, self.block_size) - len(hits)
        seq.block_table = hits + [self._take_free() for _ in range(new)]
        self._seq_hashes[seq.seq_id] = hashes
        cached = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += cached

    def _new_blocks_for(self, seq: Sequence, num_new_tokens: int) -> int:
        end = seq.num_computed_tokens + num_new_tokens
        return max(0, _cdiv(end, self.block_size) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `append_slots(seq, num_new_tokens)` would find enough free blocks."""
        return self._new_blocks_for(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make `block_table` cover positions up to `num_computed_tokens + num_new_tokens - 1`."""
        new = self._new_blocks_for(seq, num_new_tokens)
        assert new <= self.num_free_blocks, "append_slots without room"
        seq.block_table.extend(self._take_free() for _ in range(new))

    def _take_free(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            h = self._block_hash[block]
            assert h is not None and self._cached.get(h) == block
            del self._cached[h]
            self._block_hash[block] = self._block_tokens[block] = None
        assert self._ref_counts[block] == 0
        self._ref_counts[block] = 1
        return block

    # -- publishing and freeing ------------------------------------------------------------------

    def mark_computed(self, seq: Sequence) -> None:
        """Publish the full blocks of `seq` whose KV is now computed (per `num_computed_tokens`)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = self._seq_hashes[seq.seq_id]
        num_full = seq.num_computed_tokens // bs
        assert num_full <= len(seq.block_table) and seq.num_computed_tokens <= seq.num_tokens
        parent = hashes[-1] if hashes else root_hash(seq)
        for i in range(len(hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block = seq.block_table[i]
            # Past the reused prefix every block is this sequence's own, never published before.
            assert self._block_hash[block] is None and self._ref_counts[block] == 1
            # Another sequence may have computed the same prefix concurrently: keep the first
            # copy published; this one is freed uncached.
            if h not in self._cached:
                self._cached[h] = block
                self._block_hash[block] = h
                self._block_tokens[block] = tokens
            hashes.append(h)
            parent = h

    def free(self, seq: Sequence) -> None:
        """Release all blocks of `seq` and clear its block table (its counters are left alone)."""
        # Tail first: the tail of a prompt is the least likely to be shared, so it is evicted first.
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0, f"block {block} freed more often than taken"
            if self._ref_counts[block] == 0:
                if self._block_hash[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        seq.block_table = []
        self._seq_hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (their KV was computed with weights that changed): cached
        free blocks become uncached free ones. Only when no block is in use: a sequence holding
        blocks would publish more of its old KV, and a block that stayed cached after a later
        prefix was recomputed would be matched again (RuntimeError)."""
        in_use = sum(1 for rc in self._ref_counts if rc > 0)
        if in_use:
            raise RuntimeError(f"reset_prefix_cache: {in_use} blocks are in use by sequences")
        for block in self._evictable:
            self._block_hash[block] = self._block_tokens[block] = None
            self._free.append(block)
        self._evictable.clear()
        self._cached.clear()

    def check_invariants(self) -> None:
        """Assert the free/cached/in-use partition and the hash map agree (for tests)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is twice in the free list"
        hashed = 0
        for block in range(self.num_blocks):
            rc = self._ref_counts[block]
            assert rc >= 0, f"block {block}: ref count {rc}"
            states = (rc > 0) + (block in free) + (block in self._evictable)
            assert states == 1, f"block {block} is in {states} states"
            h = self._block_hash[block]
            if block in free:
                assert h is None, f"free block {block} keeps a hash"
            if block in self._evictable:
                assert h is not None, f"evictable block {block} has no hash"
            if h is not None:
                hashed += 1
                assert self._cached.get(h) == block and self._block_tokens[block] is not None
        assert hashed == len(self._cached), "the hash map names blocks that do not carry the hash"
