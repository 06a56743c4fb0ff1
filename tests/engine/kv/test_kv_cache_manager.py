from __future__ import annotations

from k2ray.engine.kv.kv_cache_manager import KVCacheManager
from k2ray.engine.request import Request
from k2ray.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(), frozenset(), max_tokens=16)


def make_manager(track_kv, num_blocks: int = 10, caching: bool = True) -> KVCacheManager:
    manager = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=caching)
    track_kv(manager)
    return manager


def schedule(manager: KVCacheManager, request: Request) -> list[int]:
    """Admit a waiting request the way the scheduler does and compute its whole prompt."""
    hits, num_hit = manager.get_computed_blocks(request)
    blocks = manager.allocate_slots(request, request.num_tokens - num_hit, hits, num_hit)
    assert blocks is not None
    request.num_computed_tokens = request.num_tokens
    return manager.get_block_ids(request.request_id)


def test_prefix_hit_reuses_blocks(track_kv) -> None:
    manager = make_manager(track_kv)
    a = make_request("a", list(range(10)))
    assert schedule(manager, a) == [0, 1, 2]
    b = make_request("b", list(range(8)) + [100, 101, 102])
    hits, num_hit = manager.get_computed_blocks(b)
    assert hits.block_ids == [0, 1] and num_hit == 8
    assert schedule(manager, b) == [0, 1, 3]
    assert [manager.block_pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert manager.prefix_cache_queries == 21 and manager.prefix_cache_hits == 8
    manager.free(a)
    manager.free(b)


def test_last_token_is_never_a_hit(track_kv) -> None:
    manager = make_manager(track_kv)
    a = make_request("a", list(range(8)))
    schedule(manager, a)
    manager.free(a)
    again = make_request("again", list(range(8)))
    hits, num_hit = manager.get_computed_blocks(again)
    assert hits.block_ids == [0] and num_hit == 4


def test_freed_prefix_is_hit_from_the_free_queue_and_evicted_lru(track_kv) -> None:
    manager = make_manager(track_kv, num_blocks=6)
    a = make_request("a", list(range(9)))  # blocks 0, 1 full; 2 partial
    assert schedule(manager, a) == [0, 1, 2]
    manager.free(a)
    # Partial block 2 (uncached) goes to the head; cached 1 then 0 to the tail (tail blocks first).
    assert manager.block_pool.free_queue.block_ids() == [2, 3, 4, 5, 1, 0]
    b = make_request("b", list(range(9)))
    assert schedule(manager, b) == [0, 1, 2]
    assert manager.block_pool.free_queue.block_ids() == [3, 4, 5]
    manager.free(b)
    c = make_request("c", list(range(50, 71)))  # 21 tokens: 6 blocks, evicts 1 then 0
    assert schedule(manager, c) == [2, 3, 4, 5, 1, 0]
    manager.free(c)
    d = make_request("d", list(range(9)))
    assert manager.get_computed_blocks(d)[1] == 0


def test_allocate_fails_without_side_effects(track_kv) -> None:
    manager = make_manager(track_kv, num_blocks=3)
    a = make_request("a", list(range(8)))
    schedule(manager, a)
    b = make_request("b", list(range(100, 109)))
    assert manager.allocate_slots(b, 9) is None
    assert manager.num_free_blocks == 1 and "b" not in manager.req_to_blocks
    manager.free(a)


def test_decode_fills_and_caches_blocks(track_kv) -> None:
    manager = make_manager(track_kv)
    a = make_request("a", [1, 2, 3])
    assert schedule(manager, a) == [0]
    for token in (4, 5):
        a.append_output_token(token)
        assert manager.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    assert manager.get_block_ids("a") == [0, 1]
    manager.free(a)
    # The decode-filled block [1, 2, 3, 4] is a hit for a new prompt.
    b = make_request("b", [1, 2, 3, 4, 9])
    hits, num_hit = manager.get_computed_blocks(b)
    assert hits.block_ids == [0] and num_hit == 4


def test_hit_on_evictable_blocks_counts_against_free_space(track_kv) -> None:
    manager = make_manager(track_kv, num_blocks=3)
    a = make_request("a", list(range(9)))
    schedule(manager, a)
    manager.free(a)
    # b hits blocks 0, 1 (both free) and needs 2 more: 4 > 3 available.
    b = make_request("b", list(range(8)) + list(range(100, 108)))
    hits, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8
    assert manager.allocate_slots(b, 8, hits, num_hit) is None
    assert manager.num_free_blocks == 3


def test_caching_disabled(track_kv) -> None:
    manager = make_manager(track_kv, caching=False)
    a = make_request("a", list(range(9)))
    schedule(manager, a)
    manager.free(a)
    b = make_request("b", list(range(9)))
    assert manager.get_computed_blocks(b)[1] == 0


def test_external_kv_is_cached_only_once_it_lands(track_kv) -> None:
    manager = make_manager(track_kv)
    a = make_request("a", list(range(10)))
    blocks = manager.allocate_for_external(a, 10)
    assert blocks.block_ids == [0, 1, 2]
    probe = make_request("probe", list(range(10)))
    assert manager.get_computed_blocks(probe)[1] == 0
    manager.mark_external_computed(a, 10)
    assert a.num_computed_tokens == 10
    assert manager.get_computed_blocks(probe)[1] == 8
    manager.free(a)


def test_external_kv_after_local_prefix_hits(track_kv) -> None:
    manager = make_manager(track_kv)
    a = make_request("a", list(range(10)))
    schedule(manager, a)
    manager.free(a)
    b = make_request("b", list(range(8)) + [50, 51, 52])
    hits, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8
    blocks = manager.allocate_for_external(b, b.num_tokens, hits)
    assert blocks.block_ids[:2] == hits.block_ids and len(blocks) == 3
    assert manager.prefix_cache_hits == 8
    manager.mark_external_computed(b, b.num_tokens)
    manager.free(b)


def test_blocks_of_a_failed_step_leave_the_cache(track_kv) -> None:
    manager = make_manager(track_kv)
    kept = make_request("kept", list(range(50, 59)))
    schedule(manager, kept)
    manager.commit_cached_blocks()  # its step succeeded
    a = make_request("a", list(range(10)))
    schedule(manager, a)
    probe = make_request("probe", list(range(10)))
    assert manager.get_computed_blocks(probe)[1] == 8  # peers in the same step share them
    manager.uncache_uncommitted()  # the step failed
    manager.free(a)
    assert manager.get_computed_blocks(probe)[1] == 0
    assert manager.block_pool.free_queue.block_ids()[:3] == [3, 4, 5]  # a's blocks, first to be reused
    assert manager.get_computed_blocks(make_request("again", list(range(50, 59))))[1] == 8
    manager.free(kept)
