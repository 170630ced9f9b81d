"""Paged KV-cache allocation: one pool of fixed-size blocks, refcounts, block tables, prefix caching.

Every block is in exactly one of three states:
- used:   ref_count > 0 (in some sequence's block table);
- cached: ref_count == 0 but it holds a full block of known tokens, keyed by a chained hash, and can
          be revived by a later prompt with the same prefix until it is evicted (least recently freed first);
- free:   ref_count == 0 and holds nothing worth keeping.
Invariant (checked by tests): free + cached + used == total.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engines.torch.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify a hash hit, not trusting the hash alone


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # stack: pop() takes low ids first
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_cached(self) -> int:
        return len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        return self.num_free + self.num_cached

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    # ---- allocation ---------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.pop()
        else:
            block_id, _ = self.cached_free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.block_hash is not None  # only blocks with a hash are cached (_unref)
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.cached_free.pop(block_id)
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            if block.block_hash is not None:
                self.cached_free[block_id] = None
            else:
                self.free_ids.append(block_id)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` the blocks for its next `num_new_tokens` tokens; False (and nothing taken) if the pool is
        short."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_available:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_block())
        return True

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so a shared prefix's head blocks are the last to be evicted.
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def trim(self, seq) -> None:
        """Free the blocks past `seq.num_computed_tokens` (KV of rejected speculative tokens). They were
        never registered in the prefix cache, so they go straight back to the free list."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        for block_id in reversed(seq.block_table[keep:]):
            self._unref(block_id)
        del seq.block_table[keep:]
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, keep)

    # ---- prefix caching -----------------------------------------------------------------------
    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        bs = self.block_size
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(chain_hash(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        return seq.block_hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding `seq`'s leading tokens. At most num_tokens - 1 tokens are matched,
        so at least one token is computed and yields logits. A request that wants its prompt's logprobs matches
        nothing: cached positions would have none, so its prompt is computed in full (vLLM does the same)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        hashes = self._full_block_hashes(seq, (seq.num_tokens - 1) // bs)
        hits = []
        for i, h in enumerate(hashes):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def allocate_with_prefix(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Attach cached prefix blocks `hits` and allocate the rest for `num_new_tokens` after them."""
        assert not seq.block_table
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        total = -(-(len(hits) * self.block_size + num_new_tokens) // self.block_size)
        if total - len(hits) > self.num_available - revived:
            return False
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        for _ in range(total - len(hits)):
            seq.block_table.append(self._take_block())
        return True

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Key the blocks `seq` has just filled, so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_hashed_blocks:
            return
        hashes = self._full_block_hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self.hash_to_block:
                block.block_hash = hashes[i]
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.hash_to_block[hashes[i]] = block.block_id
        seq.num_hashed_blocks = num_full

    # ---- n > 1 ----------------------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None | bool:
        """Share `parent`'s blocks with `child`. A partly filled last block is copied (copy on write
        at fork time), returned as (src, dst) for the runner to copy; True when nothing needs
        copying; None when no block is free for the copy (the child then recomputes instead)."""
        partial = parent.num_computed_tokens % self.block_size != 0
        if partial and self.num_available == 0:
            return None
        for block_id in parent.block_table:
            self._ref(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.block_hashes = list(parent.block_hashes)
        if not partial:
            return True
        src = child.block_table[-1]
        self._unref(src)
        dst = self._take_block()
        child.block_table[-1] = dst
        return src, dst

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        """Refcounts equal the number of block tables holding each block; states partition the pool."""
        expected = [0] * self.num_blocks
        for seq in live_seqs:
            for block_id in seq.block_table:
                expected[block_id] += 1
        actual = [b.ref_count for b in self.blocks]
        assert expected == actual, "block refcounts disagree with block tables"
        assert self.num_free + self.num_cached + self.num_used == self.num_blocks
        assert len(set(self.free_ids)) == len(self.free_ids)
        assert all(self.blocks[b].ref_count == 0 and self.blocks[b].block_hash is None for b in self.free_ids)
        assert all(self.blocks[b].ref_count == 0 and self.blocks[b].block_hash is not None for b in self.cached_free)
