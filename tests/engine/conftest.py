from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from k2ray import LLM
from k2ray.engine.kv.kv_cache_manager import KVCacheManager
from k2ray.model.default_checkpoint import tiny_checkpoint_dir

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


def load_model_test_helper(name: str) -> ModuleType:
    """tests/model/<name>.py (tests/ is not a package), imported once under its own name."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "model" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def track_engine(llm) -> None:
    """Register the KV cache manager of an LLM or AsyncLLMEngine for the end-of-test leak check."""
    engine = llm.llm_engine if hasattr(llm, "llm_engine") else llm.engine
    _MANAGERS.append(engine.kv_cache_manager)


@pytest.fixture(scope="module")
def shared_llm() -> LLM:
    """One engine per test module on the random k2-tiny checkpoint (a module may override it with its own)."""
    return LLM(tiny_checkpoint_dir(), block_size=4, num_kv_blocks=512, max_num_batched_tokens=256,
               max_model_len=512)


@pytest.fixture
def llm(shared_llm: LLM) -> LLM:
    track_engine(shared_llm)
    return shared_llm
