from __future__ import annotations

import pytest

from k2ray.engine.kv.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock, hash_block_tokens


def test_hash_chain_is_stable_and_depends_on_parent() -> None:
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(first, [5, 6]) != hash_block_tokens(None, [5, 6])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])


def test_free_queue_removes_from_the_middle() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[2])
    assert queue.block_ids() == [0, 1, 3, 4]
    queue.remove(blocks[0])
    queue.remove(blocks[4])
    assert queue.block_ids() == [1, 3]
    assert queue.num_free_blocks == 2
    queue.appendleft(blocks[4])
    queue.append(blocks[0])
    assert queue.block_ids() == [4, 1, 3, 0]
    assert [queue.popleft().block_id for _ in range(4)] == [4, 1, 3, 0]
    assert queue.head is None and queue.tail is None
    with pytest.raises(ValueError):
        queue.popleft()


def test_blocks_handed_out_in_order_and_freed_uncached_first() -> None:
    pool = BlockPool(6, enable_caching=True)
    a = pool.get_new_blocks(2)
    b = pool.get_new_blocks(2)
    assert [blk.block_id for blk in a + b] == [0, 1, 2, 3]
    pool.cache_block(a[0], b"h0", None, [1, 2])
    pool.free_blocks(reversed(a))
    # Uncached block 1 goes to the head, cached block 0 to the tail.
    assert pool.free_queue.block_ids() == [1, 4, 5, 0]
    pool.free_blocks(reversed(b))
    assert pool.free_queue.block_ids() == [2, 3, 1, 4, 5, 0]


def test_lru_eviction_order_of_cached_blocks() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    for i, block in enumerate(blocks):
        pool.cache_block(block, bytes([i]), None, [i])
    pool.free_blocks([blocks[2], blocks[0], blocks[3], blocks[1]])
    assert pool.free_queue.block_ids() == [2, 0, 3, 1]
    # A hit on block 3 takes it out of the middle of the queue.
    hit = pool.get_cached_block(bytes([3]), None, [3])
    assert hit is blocks[3]
    pool.touch([hit])
    assert pool.free_queue.block_ids() == [2, 0, 1]
    evicted = pool.get_new_blocks(2)
    assert [blk.block_id for blk in evicted] == [2, 0]
    assert pool.get_cached_block(bytes([2]), None, [2]) is None
    assert pool.get_cached_block(bytes([1]), None, [1]) is blocks[1]
    pool.free_blocks(evicted + [hit])
    assert pool.num_free_blocks == 4


def test_hit_is_verified_against_tokens_and_parent() -> None:
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, b"h", b"parent", [7, 8])
    assert pool.get_cached_block(b"h", b"parent", [7, 8]) is block
    assert pool.get_cached_block(b"h", b"parent", [7, 9]) is None
    assert pool.get_cached_block(b"h", None, [7, 8]) is None
    pool.free_blocks([block])


def test_ref_counts_and_double_free() -> None:
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert pool.num_free_blocks == 1
    pool.free_blocks([block])
    assert pool.num_free_blocks == 2
    with pytest.raises(ValueError, match="double free"):
        pool.free_blocks([block])


def test_caching_disabled_never_caches() -> None:
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, b"h", None, [1])
    assert pool.get_cached_block(b"h", None, [1]) is None
    pool.free_blocks([block])


def test_reset_prefix_cache_drops_hashes() -> None:
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, b"h", None, [1])
    pool.free_blocks([block])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(b"h", None, [1]) is None
    assert block.block_hash is None
