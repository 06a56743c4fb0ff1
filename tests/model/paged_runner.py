"""A minimal paged-cache driver for Transformer.forward: scattered block ids, chunked prefill, batched decode.

    runner = PagedRunner(model, num_blocks=32, block_size=4)
    logits = runner.step([("a", [5, 6, 7]), ("b", [9])])   # {seq: [n, V]}; 1-token steps of cached seqs decode
    PagedRunner(model, prefill_context_chunk=3)             # prefill chunks read cached context 3 rows at a time
    PagedRunner(model, prefill_form="dense")                # the reference prefill form
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from k2ray.model.attention_metadata import DEFAULT_PREFILL_CONTEXT_CHUNK, AttentionMetadata, PrefillForm


class PagedRunner:
    def __init__(self, model, num_blocks: int = 32, block_size: int = 4, seed: int = 0,
                 cache_dtype: torch.dtype | None = None, prefill_context_chunk: int = DEFAULT_PREFILL_CONTEXT_CHUNK,
                 rope_position: Callable[[int], int] | None = None, prefill_form: PrefillForm = "chunked"):
        self.model = model
        self.prefill_context_chunk = prefill_context_chunk
        self.prefill_form = prefill_form
        # Maps a token's place in its sequence to its rope position (default: the same), so a short sequence
        # can stand in for one that spans a long context.
        self.rope_position = rope_position
        self.block_size = block_size
        dtype = cache_dtype or model.dtype
        self.device = model.embed.weight.device
        self.kv_caches = [
            torch.zeros(num_blocks, block_size, model.args.kv_cache_dim, dtype=dtype, device=self.device)
            for _ in model.layers
        ]
        # Hand out blocks in a shuffled order so sequences never get contiguous ids; block 0 is kept free
        # because block tables are padded with it.
        order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
        self.free = order.tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def _slots(self, seq: str, num_new: int) -> tuple[list[int], list[int]]:
        table = self.tables.setdefault(seq, [])
        start = self.lens.get(seq, 0)
        positions = list(range(start, start + num_new))
        while len(table) * self.block_size < start + num_new:
            table.append(self.free.pop())
        slots = [table[p // self.block_size] * self.block_size + p % self.block_size for p in positions]
        self.lens[seq] = start + num_new
        return positions, slots

    @torch.no_grad()
    def step(self, batch: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Decodes (1 token, sequence already cached) must come first, as the engine orders them."""
        is_decode = [len(toks) == 1 and self.lens.get(seq, 0) > 0 for seq, toks in batch]
        num_decodes = sum(is_decode)
        assert all(is_decode[:num_decodes]) and not any(is_decode[num_decodes:]), "decodes must lead the batch"
        ids, positions, slots, qsl = [], [], [], [0]
        for seq, toks in batch:
            pos, slot = self._slots(seq, len(toks))
            ids += toks
            positions += pos
            slots += slot
            qsl.append(qsl[-1] + len(toks))
        seq_lens = [self.lens[seq] for seq, _ in batch]
        width = max(len(self.tables[seq]) for seq, _ in batch)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in batch]
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            num_decodes=num_decodes,
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=tuple(qsl),
            seq_lens_cpu=tuple(seq_lens),
            prefill_context_chunk=self.prefill_context_chunk,
            prefill_form=self.prefill_form,
        )
        if self.rope_position is not None:
            positions = [self.rope_position(p) for p in positions]
        positions = torch.tensor(positions, device=dev)
        hidden = self.model(torch.tensor(ids, device=dev), positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)
        return {seq: logits[qsl[i] : qsl[i + 1]] for i, (seq, _) in enumerate(batch)}
