from idlm.engine.block_manager import BlockManager
from idlm.engine.sampling_params import SamplingParams
from idlm.engine.sequence import Sequence


def seq(tokens):
    return Sequence(tokens, SamplingParams(), seed=0)


def test_reserve_commit_trim_and_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))
    bm.match_prefix(s)
    bm.reserve(s, 10 + 7)  # prompt plus a lookahead that may be rolled back
    assert len(s.block_table) == 5 and bm.num_free == 3
    bm.commit(s, 10)
    assert s.num_computed == 10
    assert len(s.block_table) == 3 and bm.num_free == 5  # blocks beyond the computed length go back
    bm.free(s)
    assert bm.num_free == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_cache_shares_full_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(9)))
    bm.match_prefix(a)
    bm.reserve(a, 9)
    bm.commit(a, 9)
    b = seq(list(range(8)) + [99, 100])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = seq(list(range(8)))  # fully cached prompt: the last block is recomputed for its logits
    bm.match_prefix(c)
    assert c.num_computed == 4
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free == 8
    d = seq(list(range(8)) + [7])  # freed blocks keep their hash until reused
    bm.match_prefix(d)
    assert d.num_computed == 8


def test_reused_block_loses_its_old_hash():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq([1, 2, 3])
    bm.match_prefix(a)
    bm.reserve(a, 3)
    bm.commit(a, 3)
    bm.free(a)
    b = seq([7, 8, 9, 10])
    bm.match_prefix(b)
    bm.reserve(b, 4)
    assert bm.num_free == 0
    c = seq([1, 2, 3])
    bm.match_prefix(c)
    assert c.num_computed == 0 and not bm.cached
