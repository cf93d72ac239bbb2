"""The KV block pool: allocation, reference counts, the prefix-cache hash chain, LRU eviction."""

from __future__ import annotations

import pytest

from actors.scheduling.block_pool import BlockPool, block_hash


def test_allocate_and_release_return_every_block() -> None:
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.release(a)
    pool.release(b)
    assert pool.num_free == 8 and pool.usage == 0.0


def test_double_release_is_an_error() -> None:
    pool = BlockPool(2, 4)
    (blk,) = pool.allocate(1)
    pool.release([blk])
    with pytest.raises(RuntimeError):
        pool.release([blk])


def test_hash_chain_depends_on_parent_tokens_and_images() -> None:
    h1 = block_hash(None, [1, 2, 3, 4])
    assert h1 == block_hash(None, [1, 2, 3, 4])
    assert h1 != block_hash(None, [1, 2, 3, 5])
    assert block_hash(h1, [5, 6]) != block_hash(block_hash(None, [9]), [5, 6])
    assert block_hash(None, [7] * 4, ["imgA"]) != block_hash(None, [7] * 4, ["imgB"])
    assert block_hash(None, [7] * 4, ["imgA"]) != block_hash(None, [7] * 4)


def test_cached_free_block_is_reused_until_evicted_lru() -> None:
    pool = BlockPool(3, 4)
    blocks = pool.allocate(3)
    hashes = [block_hash(None, [i]) for i in range(3)]
    for blk, h in zip(blocks, hashes):
        pool.mark_cached(blk, h)
    pool.release([blocks[0]])
    pool.release([blocks[1]])
    pool.release([blocks[2]])
    # A hit takes the block back out of the free list without losing its contents.
    assert pool.lookup(hashes[1]) == blocks[1]
    pool.share(blocks[1])
    assert pool.num_free == 2
    # Allocation evicts the least recently freed cached block first.
    (fresh,) = pool.allocate(1)
    assert fresh == blocks[0]
    assert pool.lookup(hashes[0]) is None
    assert pool.lookup(hashes[2]) == blocks[2]


def test_uncached_free_blocks_are_used_before_cached_ones() -> None:
    pool = BlockPool(2, 4)
    a, b = pool.allocate(2)
    pool.mark_cached(a, block_hash(None, [1]))
    pool.release([a])
    pool.release([b])
    (first,) = pool.allocate(1)
    assert first == b
    assert pool.lookup(block_hash(None, [1])) == a


def test_disabled_caching_never_hits() -> None:
    pool = BlockPool(2, 4, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.mark_cached(a, b"x")
    assert pool.lookup(b"x") is None
