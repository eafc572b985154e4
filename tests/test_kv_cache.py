"""The KV cache manager: block pool, prefix cache, fork / copy-on-write, swap."""

from __future__ import annotations

import pytest

from streampage.engine.block_pool import BlockPool, OutOfBlocksError
from streampage.engine.kv_cache import KVCacheManager
from streampage.engine.request import SeqStatus, Sequence

BS = 4


def make_kv(num_gpu: int = 16, num_cpu: int = 16, prefix: bool = True) -> KVCacheManager:
    return KVCacheManager(num_gpu, num_cpu, BS, enable_prefix_caching=prefix, watermark=0.0)


def prefill(kv: KVCacheManager, seq: Sequence, copies: list | None = None) -> None:
    """Allocate and 'compute' the whole sequence as one step would."""
    seq.status = SeqStatus.RUNNING
    hit = kv.find_prefix(seq) if seq.seq_id not in kv.block_tables else None
    computed = hit.num_blocks * BS if hit else seq.num_computed_tokens
    kv.allocate_slots(seq, seq.num_tokens - computed, copies if copies is not None else [], hit)
    seq.num_computed_tokens = seq.num_tokens
    kv.commit_computed(seq)


def decode(kv: KVCacheManager, seq: Sequence, token: int, copies: list) -> None:
    seq.token_ids.append(token)
    kv.allocate_slots(seq, 1, copies)
    seq.num_computed_tokens += 1
    kv.commit_computed(seq)


def test_pool_allocates_each_block_once_and_frees_lru():
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(OutOfBlocksError):
        pool.allocate()
    pool.decref(blocks[2])
    pool.decref(blocks[0])
    assert pool.free_blocks_in_eviction_order() == [blocks[2], blocks[0]]
    assert pool.allocate() == blocks[2]  # least recently freed goes first


def test_pool_refuses_double_free():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.decref(block)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.decref(block)


def test_allocation_is_on_demand_and_wastes_under_a_block():
    kv = make_kv()
    seq = Sequence(list(range(9)))  # 9 tokens -> 3 blocks of 4
    prefill(kv, seq)
    assert len(kv.block_tables[seq.seq_id]) == 3
    copies: list = []
    decode(kv, seq, 100, copies)  # token 10 fits the third block
    decode(kv, seq, 101, copies)
    decode(kv, seq, 102, copies)
    assert len(kv.block_tables[seq.seq_id]) == 3
    decode(kv, seq, 103, copies)  # token 13 needs a fourth
    assert len(kv.block_tables[seq.seq_id]) == 4 and copies == []
    kv.free(seq)
    assert kv.num_free_blocks == 16


def test_prefix_hit_shares_full_blocks_but_never_the_last_token():
    kv = make_kv()
    a = Sequence(list(range(12)))  # three full blocks
    prefill(kv, a)
    b = Sequence(list(range(12)))
    hit = kv.find_prefix(b)
    assert hit.num_blocks == 2  # the block holding the last prompt token is recomputed
    assert hit.blocks == kv.block_tables[a.seq_id][:2]
    c = Sequence([*range(8), 99, 98, 97, 96, 95])
    assert kv.find_prefix(c).num_blocks == 2
    d = Sequence([0, 1, 2, 7, *range(4, 12)])  # differs in the first block: no hit at all
    assert kv.find_prefix(d).num_blocks == 0


def test_prefix_chain_is_exact_not_just_the_block_tokens():
    kv = make_kv()
    a = Sequence([1, 1, 1, 1, 5, 5, 5, 5, 9])
    prefill(kv, a)
    # Same second block, different first block: must not match the second block.
    b = Sequence([2, 2, 2, 2, 5, 5, 5, 5, 9])
    assert kv.find_prefix(b).num_blocks == 0


def test_freed_blocks_stay_cached_until_reused():
    kv = make_kv(num_gpu=4)
    a = Sequence(list(range(9)))
    prefill(kv, a)
    kv.free(a)
    assert kv.gpu.num_cached_free == 2 and kv.num_free_blocks == 4
    b = Sequence(list(range(9)))
    hit = kv.find_prefix(b)
    assert hit.num_blocks == 2
    assert kv.num_new_blocks_needed(b, 1, hit) == 3  # two revived + one fresh
    copies: list = []
    kv.allocate_slots(b, 1, copies, hit)
    assert b.num_computed_tokens == 8 and kv.gpu.num_cached_free == 0
    kv.free(b)
    # Fill the pool with unrelated tokens: the cached prefix is evicted, least recent first.
    c = Sequence(list(range(100, 116)))
    prefill(kv, c)
    assert kv.find_prefix(Sequence(list(range(9)))).num_blocks == 0


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_block():
    kv = make_kv()
    parent = Sequence(list(range(6)))  # one full block + a partial one
    prefill(kv, parent)
    child = parent.fork()
    kv.fork(parent, child)
    table = kv.block_tables[parent.seq_id]
    assert child.status is SeqStatus.RUNNING
    assert kv.block_tables[child.seq_id] == table
    assert all(kv.gpu.ref_counts[b] == 2 for b in table)
    copies: list = []
    decode(kv, child, 50, copies)
    assert copies == [(table[1], kv.block_tables[child.seq_id][1])]
    assert kv.block_tables[child.seq_id][0] == table[0]  # the full block stays shared
    decode(kv, parent, 60, copies)
    assert len(copies) == 1  # the parent's partial block is private again: written in place
    kv.check_invariants([parent, child], [])


def test_swap_round_trip_keeps_sharing():
    kv = make_kv()
    parent = Sequence(list(range(6)))
    prefill(kv, parent)
    child = parent.fork()
    kv.fork(parent, child)
    assert kv.num_blocks_to_swap([parent, child]) == 2
    out = kv.swap_out([parent, child])
    assert len(out) == 2 and kv.num_free_blocks == 16 and kv.cpu.num_free == 14
    kv.check_invariants([], [parent, child])
    back = kv.swap_in([parent, child])
    assert len(back) == 2 and kv.cpu.num_free == 16
    assert kv.block_tables[parent.seq_id] == kv.block_tables[child.seq_id]
    kv.check_invariants([parent, child], [])
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 16


def test_prefix_caching_can_be_disabled():
    kv = make_kv(prefix=False)
    a = Sequence(list(range(12)))
    prefill(kv, a)
    assert kv.find_prefix(Sequence(list(range(12)))).num_blocks == 0
