from __future__ import annotations

from collections.abc import Iterator

import pytest

from k2ray.engine.kv_cache_manager import KVCacheManager

_MANAGERS: list[KVCacheManager] = []


def assert_all_blocks_free(manager: KVCacheManager) -> None:
    pool = manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks, f"{pool.num_blocks - pool.num_free_blocks} blocks leaked"
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    assert not manager.req_to_blocks


@pytest.fixture
def track_kv():
    """Register a KVCacheManager; after the test every registered manager must have all blocks free."""
    return _MANAGERS.append


@pytest.fixture(autouse=True)
def _check_no_leaked_blocks() -> Iterator[None]:
    yield
    managers = list(_MANAGERS)
    _MANAGERS.clear()
    for manager in managers:
        assert_all_blocks_free(manager)
