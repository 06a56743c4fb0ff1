"""A paged latent KV cache without a model (the read/write half of ModelRunner), for transport tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k2ray.engine.kv.kv_transfer import LatentKVLayout


class PagedBlocks:
    def __init__(self, layout: LatentKVLayout, num_blocks: int, seed: int | None = None) -> None:
        self.device = torch.device("cpu")
        self.kv_layout = layout
        shape = (num_blocks, layout.block_size, layout.kv_cache_dim)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.caches = [torch.randn(shape, generator=generator).to(layout.dtype) if generator is not None
                       else torch.zeros(shape, dtype=layout.dtype) for _ in range(layout.num_layers)]

    def read_kv_blocks(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        index = torch.tensor(list(block_ids), dtype=torch.int64)
        if out is None:
            out = torch.empty(self.kv_layout.shape(len(block_ids)), dtype=self.kv_layout.dtype)
        for layer, cache in enumerate(self.caches):
            torch.index_select(cache, 0, index, out=out[layer])
        return out

    def write_kv_blocks(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        index = torch.tensor(list(block_ids), dtype=torch.int64)
        for layer, cache in enumerate(self.caches):
            cache.index_copy_(0, index, kv[layer])
