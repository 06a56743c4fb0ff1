from __future__ import annotations

from dataclasses import dataclass

from k2ray.engine.kv.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from k2ray.engine.request import Request


@dataclass(frozen=True, slots=True)
class KVBlocks:
    """Opaque handle on a run of KV blocks; the scheduler passes it around and never looks inside."""

    blocks: tuple[KVCacheBlock, ...] = ()

    @property
    def block_ids(self) -> list[int]:
        return [block.block_id for block in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Per-request block tables over one BlockPool, plus the prefix-cache lookup.

    A request's table covers its computed tokens and the ones scheduled this step:

        |<- prefix-cache hits ->|<- computed ->|<- scheduled ->|<- free slots ->|
        [ blk ][ blk ][ blk ]...[ blk ][ blk ]..[ blk ]........[ blk (partial) ]

    Full blocks are hashed and cached as soon as their tokens are scheduled (prompt or decode), so
    requests scheduled in the same step share them (the forward writes each layer's KV before any
    attention reads it). Until `commit_cached_blocks` says the step's forward succeeded they are
    only provisionally cached: `uncache_uncommitted` takes them back out when it failed, so no later
    step can hit KV that was never written.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self._uncommitted_blocks: list[KVCacheBlock] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def get_computed_blocks(self, request: Request) -> tuple[KVBlocks, int]:
        """Longest cached prefix of the request's full blocks. The last token is never counted as
        cached, since its logits must be computed."""
        if not self.enable_caching:
            return KVBlocks(), 0
        self._update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        parent: bytes | None = None
        for index, block_hash in enumerate(request.block_hashes[:max_hit_blocks]):
            block = self.block_pool.get_cached_block(block_hash, parent, self._block_tokens(request, index))
            if block is None:
                break
            hits.append(block)
            parent = block_hash
        return KVBlocks(tuple(hits)), len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: KVBlocks | None = None,
                       num_new_computed_tokens: int = 0) -> KVBlocks | None:
        """Give `request` room for `num_new_tokens` more tokens after its computed ones (and after
        `new_computed_blocks`, prefix-cache hits from get_computed_blocks). Returns the newly
        allocated blocks, or None (and changes nothing) when the pool cannot cover them."""
        num_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        new_blocks = self._allocate(request, num_tokens, new_computed_blocks)
        if new_blocks is None:
            return None
        self._uncommitted_blocks += self._cache_full_blocks(request, num_tokens)
        return KVBlocks(tuple(new_blocks))

    def commit_cached_blocks(self) -> None:
        """The step's forward succeeded: the blocks cached since the last commit hold their KV."""
        self._uncommitted_blocks.clear()

    def uncache_uncommitted(self) -> None:
        """The step's forward failed: take the blocks cached since the last commit out of the prefix cache."""
        for block in self._uncommitted_blocks:
            self.block_pool.uncache_block(block)
        self._uncommitted_blocks.clear()

    def allocate_for_external(self, request: Request, num_tokens: int,
                              new_computed_blocks: KVBlocks | None = None) -> KVBlocks | None:
        """Blocks for `num_tokens` whose latent KV arrives from elsewhere (a prefill worker), after
        `new_computed_blocks` (this pool's prefix-cache hits, which need no data). Returns all the
        request's blocks, or None (and changes nothing) when the pool cannot cover them. Nothing new
        is cached until `mark_external_computed` says the KV has landed."""
        if self._allocate(request, num_tokens, new_computed_blocks) is None:
            return None
        return KVBlocks(tuple(self.req_to_blocks[request.request_id]))

    def mark_external_computed(self, request: Request, num_tokens: int) -> None:
        request.num_computed_tokens = num_tokens
        self._cache_full_blocks(request, num_tokens)

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()

    def _allocate(self, request: Request, num_tokens: int,
                  new_computed_blocks: KVBlocks | None) -> list[KVCacheBlock] | None:
        """Append hits + new blocks so the table covers `num_tokens`; the new blocks, or None."""
        computed = new_computed_blocks.blocks if new_computed_blocks is not None else ()
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        num_new_blocks = max(cdiv(num_tokens, self.block_size) - len(req_blocks) - len(computed), 0)
        # Hits on free blocks leave the free queue, so they count against what is available.
        num_evictable_hits = sum(1 for block in computed if block.ref_cnt == 0)
        if num_new_blocks + num_evictable_hits > self.block_pool.num_free_blocks:
            return None
        if request.request_id not in self.req_to_blocks:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed) * self.block_size
        self.block_pool.touch(computed)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        req_blocks.extend(computed)
        req_blocks.extend(new_blocks)
        self.num_cached_blocks.setdefault(request.request_id, len(computed))
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> list[KVCacheBlock]:
        """Cache the request's full blocks up to `num_tokens`; the blocks that entered the cache."""
        if not self.enable_caching:
            return []
        self._update_block_hashes(request)
        request_id = request.request_id
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        blocks = self.req_to_blocks[request_id]
        cached = []
        for index in range(self.num_cached_blocks[request_id], num_full):
            parent = request.block_hashes[index - 1] if index > 0 else None
            if self.block_pool.cache_block(blocks[index], request.block_hashes[index], parent,
                                           self._block_tokens(request, index)):
                cached.append(blocks[index])
        self.num_cached_blocks[request_id] = max(self.num_cached_blocks[request_id], num_full)
        return cached

    def _update_block_hashes(self, request: Request) -> None:
        hashes = request.block_hashes
        for index in range(len(hashes), request.num_tokens // self.block_size):
            parent = hashes[index - 1] if index > 0 else None
            hashes.append(hash_block_tokens(parent, self._block_tokens(request, index)))

    def _block_tokens(self, request: Request, index: int) -> list[int]:
        return request.all_token_ids[index * self.block_size:(index + 1) * self.block_size]
