from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chain hash of one full block: sha256(parent hash || int64 token ids); stable across processes."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    # Set while the block is in the prefix cache: its chain hash, its parent's, and its tokens
    # (checked on every hit, so a hash collision can never hand out the wrong KV).
    block_hash: bytes | None = None
    parent_hash: bytes | None = None
    token_ids: tuple[int, ...] = field(default=())
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeKVCacheBlockQueue:
    """Doubly linked list of free blocks, eviction order from the head.

    Removing a block from the middle (a prefix-cache hit on a free block) is O(1), as in vLLM's
    FreeKVCacheBlockQueue; `deque` cannot do that.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self.head: KVCacheBlock | None = None
        self.tail: KVCacheBlock | None = None
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self.head
        if block is None:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free is None:
            self.head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self.tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        block.prev_free, block.next_free = self.tail, None
        if self.tail is None:
            self.head = block
        else:
            self.tail.next_free = block
        self.tail = block
        self.num_free_blocks += 1

    def appendleft(self, block: KVCacheBlock) -> None:
        block.prev_free, block.next_free = None, self.head
        if self.head is None:
            self.tail = block
        else:
            self.head.prev_free = block
        self.head = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        ids, block = [], self.head
        while block is not None:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    """All KV blocks: ref counts, the free queue and the hash -> block map of the prefix cache.

    A block with ref_cnt 0 is in the free queue; if it is also cached it can still be hit (and is
    then taken out of the queue) until it is evicted from the head. Freed blocks without a hash go
    to the head (nothing to keep), cached ones to the tail (least recently used first).
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self.free_queue = FreeKVCacheBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self.cached_blocks: dict[bytes, KVCacheBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def get_cached_block(self, block_hash: bytes, parent_hash: bytes | None,
                         token_ids: Sequence[int]) -> KVCacheBlock | None:
        block = self.cached_blocks.get(block_hash)
        if block is None or block.parent_hash != parent_hash or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVCacheBlock, block_hash: bytes, parent_hash: bytes | None,
                    token_ids: Sequence[int]) -> bool:
        """Enter `block` into the prefix cache; False if it was not (already cached, or a copy is)."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        # Two requests may fill identical blocks side by side; the first one stays the cached copy.
        if block_hash in self.cached_blocks:
            return False
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, tuple(token_ids)
        self.cached_blocks[block_hash] = block
        return True

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Take `block` out of the prefix cache (its KV is not what its hash says); a free one moves
        to the head of the free queue, first to be reused."""
        self._evict(block)
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
            self.free_queue.appendleft(block)

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block, in the given order (callers pass a request's blocks
        tail first, so a prompt's last blocks are evicted before its shared prefix)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def reset_prefix_cache(self) -> None:
        for block in list(self.cached_blocks.values()):
            self._evict(block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash, block.parent_hash, block.token_ids = None, None, ()
