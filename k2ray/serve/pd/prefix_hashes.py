"""A prompt's block hashes as the engine's prefix cache computes them, shortened for routing.

Request routers match a prompt against what each prefill replica advertises it has cached; the
first 8 bytes of each chained sha256 are plenty to rank replicas (a false match costs a slower
prefill, never wrong KV: the engine checks tokens on every hit).
"""

from __future__ import annotations

from collections.abc import Sequence

from k2ray.engine.kv.block_pool import hash_block_tokens

SHORT_HASH_BYTES = 8


def short_hash(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:SHORT_HASH_BYTES], "big")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Short hashes of the prompt's full blocks, in order (each chained to the one before)."""
    hashes, parent = [], None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size])
        hashes.append(short_hash(parent))
    return tuple(hashes)


def num_leading_matches(block_hashes: Sequence[int], cached: frozenset[int]) -> int:
    """How many of the prompt's first blocks a replica holds (a chain: stop at the first miss)."""
    num = 0
    for block_hash in block_hashes:
        if block_hash not in cached:
            break
        num += 1
    return num
