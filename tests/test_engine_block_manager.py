"""BlockManager: refcounts, prefix hits verified by tokens, LRU reuse of freed blocks, fork."""

from engines.base import GenerationRequest, SamplingParams
from engines.torch.block_manager import BlockManager
from engines.torch.sequence import RequestState


def seq_of(tokens, n=1):
    return RequestState(GenerationRequest("r", list(tokens), SamplingParams(n=n))).seqs[0]


def fill(bm, seq):
    """Allocate and 'compute' all of seq's tokens, registering full blocks."""
    hits = bm.match_prefix(seq)
    assert bm.allocate_with_prefix(seq, hits, seq.num_tokens - len(hits) * bm.block_size)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)
    return hits


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    s = seq_of(range(10))
    assert bm.allocate(s, 10) and len(s.block_table) == 3
    assert bm.num_used == 3 and bm.num_free == 5
    assert not bm.allocate(seq_of(range(40)), 40), "a request larger than the pool takes nothing"
    assert bm.num_used == 3
    bm.free(s)
    assert bm.num_used == 0 and bm.num_free + bm.num_cached == 8
    bm.check_invariants([])


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(16, 4)
    a = seq_of(range(12))
    fill(bm, a)
    b = seq_of(range(12))  # identical prompt: 3 full blocks, but the last token must be computed
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    c = seq_of(list(range(8)) + [99, 98, 97, 96, 95])
    assert bm.match_prefix(c) == a.block_table[:2]
    d = seq_of([5] + list(range(1, 12)))
    assert bm.match_prefix(d) == []
    bm.check_invariants([a])


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(8, 4)
    a = seq_of(range(9))
    fill(bm, a)
    bm.blocks[a.block_table[0]].token_ids = (7, 7, 7, 7)  # as if another prefix had the same hash
    assert bm.match_prefix(seq_of(range(9))) == []


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(6, 4)
    a = seq_of(range(9))  # 2 full blocks + 1 partial
    fill(bm, a)
    first, second = a.block_table[:2]
    bm.free(a)
    assert bm.num_cached == 2 and bm.num_free == 4
    b = seq_of(range(9))
    assert fill(bm, b) == [first, second], "a freed prefix is revived"
    bm.free(b)
    # Take every free block, then one more: the least recently freed cached block goes first.
    hog = seq_of(range(100, 120))
    assert bm.allocate(hog, 20)  # 5 blocks: 4 free + evicts one cached
    assert bm.num_cached == 1
    evicted = second if bm.blocks[first].block_hash is not None else first
    assert evicted == second, "tail blocks are freed first, so they are evicted first"
    bm.check_invariants([hog])


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(8, 4)
    parent = seq_of(range(10), n=2)
    fill(bm, parent)
    child = parent.request.fork(parent)[0]
    src_dst = bm.fork(parent, child)
    assert src_dst == (parent.block_table[2], child.block_table[2])
    assert child.block_table[:2] == parent.block_table[:2]
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    bm.check_invariants([parent, child])
    bm.free(parent)
    bm.free(child)
    bm.check_invariants([])
    assert bm.num_used == 0
