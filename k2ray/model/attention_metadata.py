from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# Cached-context rows a prefill chunk expands at a time (see prefill_attention.py): for K2 in bf16 about
# 56 KB per row per layer call (K and V of 64 heads), so 8,192 rows is ~460 MB of workspace at any context.
DEFAULT_PREFILL_CONTEXT_CHUNK = 8192

# "chunked": the bounded-workspace prefill (prefill_attention.py), its cached context attended expanded or
# absorbed, whichever is cheaper; "expanded" / "absorbed" force one. "dense": the form it replaced (the whole
# context expanded per chunk, a dense [Tq, S] mask), kept as the reference tests and the long-context bench
# compare against. The engine builds only "chunked".
PrefillForm = Literal["chunked", "expanded", "absorbed", "dense"]
PREFILL_FORMS = ("chunked", "expanded", "absorbed", "dense")


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs, built by the engine's model runner and read by every MLA layer.

    The step's tokens are flattened to T rows, grouped by sequence. The first `num_decodes`
    sequences contribute exactly one query token each and run MLA in the absorbed form over the
    latent cache; the remaining sequences (prefill chunks) run the plain form.

    The latent KV cache of one layer is a tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]:
    token at absolute position p of a sequence lives in block `block_tables[b, p // block_size]`,
    row `p % block_size`. `slot_mapping[t] = block_id * block_size + row` is where token t's new
    latent KV is written before attention runs.

        query_start_loc: [B + 1] int64  cumulative query lengths (cu_seqlens_q)
        seq_lens:        [B] int64      context length per sequence *including* this step's tokens
        block_tables:    [B, max_num_blocks] int32, padded with 0 beyond each sequence's blocks
        slot_mapping:    [T] int64

    A prefill chunk reads its cached context in pieces of at most `prefill_context_chunk` tokens
    (`prefill_form` "chunked"; "dense" is the reference form).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    max_seq_len: int
    # Host copies so layers can slice per sequence without a device sync.
    query_start_loc_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    prefill_context_chunk: int = DEFAULT_PREFILL_CONTEXT_CHUNK
    prefill_form: PrefillForm = "chunked"

    def __post_init__(self) -> None:
        if self.prefill_context_chunk < 1:
            raise ValueError(f"prefill_context_chunk must be at least 1, got {self.prefill_context_chunk}")
        if self.prefill_form not in PREFILL_FORMS:
            raise ValueError(f"prefill_form must be one of {PREFILL_FORMS}, got {self.prefill_form!r}")

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @property
    def prefill_query_start_loc(self) -> tuple[int, ...]:
        """cu_seqlens of the prefill chunks (the sequences after the decodes), from 0 at the first prefill row."""
        first = self.query_start_loc_cpu[self.num_decodes]
        return tuple(loc - first for loc in self.query_start_loc_cpu[self.num_decodes:])

    @property
    def prefill_seq_lens(self) -> tuple[int, ...]:
        """Context length of each prefill sequence, its own chunk included."""
        return self.seq_lens_cpu[self.num_decodes:]
