"""Prefill over the cached context in chunks of prefill_context_chunk rows, expanded or absorbed: same logits as one
piece, as the dense reference form and as transformers, for every block alignment of the cached prefix, with the
workspace bounded by the chunk whatever the context length (the dense form's grows linearly)."""

from __future__ import annotations

import dataclasses
import itertools
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.loader import load_model

from .hf_checkpoints import hf_logits, load_hf_reference, make_hf_checkpoint
from .paged_runner import PagedRunner

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

ATOL = RTOL = 1e-4
# Chunk-vs-unchunked: the same fp32 sums in another order.
CHUNK_ATOL = CHUNK_RTOL = 2e-5
BLOCK_SIZE = 4
NUM_TOKENS = 3 * BLOCK_SIZE + 9
NUM_NEW = 5
UNCHUNKED = 1 << 20
# 1 and 3 are below the block size; 5 does not divide any of the contexts' block-aligned lengths.
CHUNK_SIZES = (1, 3, BLOCK_SIZE, 5, 16)


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("hf"), "k2_like")
    tokens = torch.randint(0, 96, (NUM_TOKENS,), generator=torch.Generator().manual_seed(5)).tolist()
    return load_model(ckpt, dtype=torch.float32), tokens, hf_logits(load_hf_reference(ckpt), tokens)


def _prefill_in_two(model, tokens: list[int], num_context: int, chunk: int, form: str = "chunked") -> torch.Tensor:
    """Prefill `num_context` tokens, then NUM_NEW more over them as cached context: the second chunk's logits."""
    runner = PagedRunner(model, num_blocks=16, block_size=BLOCK_SIZE, seed=3, prefill_context_chunk=chunk,
                         prefill_form=form)
    runner.step([("a", tokens[:num_context])])
    return runner.step([("a", tokens[num_context : num_context + NUM_NEW])])["a"]


@pytest.mark.parametrize("form", ["expanded", "absorbed"])
@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("num_context", [2 * BLOCK_SIZE + r for r in range(BLOCK_SIZE)])
def test_chunked_context_matches_unchunked_dense_and_hf(k2, num_context: int, chunk: int, form: str) -> None:
    model, tokens, ref = k2
    got = _prefill_in_two(model, tokens, num_context, chunk, form)
    whole = _prefill_in_two(model, tokens, num_context, UNCHUNKED, form)
    dense = _prefill_in_two(model, tokens, num_context, chunk, form="dense")
    torch.testing.assert_close(got, whole, atol=CHUNK_ATOL, rtol=CHUNK_RTOL)
    torch.testing.assert_close(got, dense, atol=CHUNK_ATOL, rtol=CHUNK_RTOL)
    torch.testing.assert_close(got, ref[num_context : num_context + NUM_NEW], atol=ATOL, rtol=RTOL)


def test_mixed_batch_with_chunked_context_matches_hf(k2) -> None:
    """Decodes ahead of two prefill chunks with cached contexts of different lengths, chunk below the block size."""
    model, tokens, ref = k2
    runner = PagedRunner(model, num_blocks=24, block_size=BLOCK_SIZE, seed=11, prefill_context_chunk=3)
    runner.step([("a", tokens[:10]), ("b", tokens[:7]), ("c", tokens[:13])])
    out = runner.step([("a", [tokens[10]]), ("b", tokens[7:12]), ("c", tokens[13:20])])
    torch.testing.assert_close(out["a"], ref[10:11], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["b"], ref[7:12], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["c"], ref[13:20], atol=ATOL, rtol=RTOL)


def _max_expanded_rows(model, tokens: list[int], num_context: int, chunk: int) -> int:
    """Most latent rows one wkv_b call expanded while the second chunk ran (the largest K/V workspace)."""
    runner = PagedRunner(model, num_blocks=24, block_size=BLOCK_SIZE, prefill_context_chunk=chunk,
                         prefill_form="expanded")
    runner.step([("a", tokens[:num_context])])
    rows: list[int] = []
    hooks = [layer.attn.wkv_b.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
             for layer in model.layers]
    try:
        runner.step([("a", tokens[num_context : num_context + 2])])
    finally:
        for hook in hooks:
            hook.remove()
    return max(rows)


@pytest.mark.parametrize("num_context", [11, NUM_TOKENS - 2])
def test_workspace_is_bounded_by_the_chunk(k2, num_context: int) -> None:
    model, tokens, _ = k2
    assert _max_expanded_rows(model, tokens, num_context, chunk=3) == 3
    # One piece expands the whole context: the bound above is the chunking's doing.
    assert _max_expanded_rows(model, tokens, num_context, chunk=UNCHUNKED) == num_context


def test_few_new_tokens_over_a_long_context_absorb_many_expand(k2) -> None:
    model, tokens, _ = k2
    k2_dims = dataclasses.replace(model.layers[0].attn.prefill_weights, n_heads=64, kv_lora_rank=512,
                                  qk_nope_head_dim=128, v_head_dim=128)
    # K2: break-even near 170 new tokens, whatever the context length beyond a few thousand tokens.
    assert k2_dims.absorbed_is_cheaper(1, 100_000, rope_dim=64)
    assert k2_dims.absorbed_is_cheaper(128, 100_000, rope_dim=64)
    assert not k2_dims.absorbed_is_cheaper(256, 100_000, rope_dim=64)
    assert not k2_dims.absorbed_is_cheaper(2048, 262_000, rope_dim=64)
    # A short context does not pay back absorbing q and un-absorbing the result.
    assert not k2_dims.absorbed_is_cheaper(128, 64, rope_dim=64)
    # "chunked" runs the cheaper form: here (5 new tokens over 9 in the tiny model) the absorbed one.
    assert model.layers[0].attn.prefill_weights.absorbed_is_cheaper(NUM_NEW, 9, rope_dim=8)
    torch.testing.assert_close(_prefill_in_two(model, tokens, 9, 4), _prefill_in_two(model, tokens, 9, 4, "absorbed"),
                               atol=0, rtol=0)


def test_rejects_an_empty_chunk_and_an_unknown_form() -> None:
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match="prefill_context_chunk"):
        AttentionMetadata(empty, empty, empty, empty, 0, 0, (0,), (), prefill_context_chunk=0)
    with pytest.raises(ValueError, match="prefill_form"):
        AttentionMetadata(empty, empty, empty, empty, 0, 0, (0,), (), prefill_form="latent")


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the tensors created while the mode is on (views and
    in-place results of existing tensors, the caches and weights, are not new storage). CPU tensors bypass
    tracemalloc, so this is the allocator-level count of what the prefill holds."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if ptr in inputs or ptr in self._sizes or size == 0:
                continue
            self._sizes[ptr] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr)
        return out

    def _free(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr)


MEMORY_CONTEXTS = (128, 256, 512)
MEMORY_NEW_TOKENS = 32
MEMORY_CONTEXT_CHUNK = 64
# What the chunked form may add between the shortest and the longest context: the block table and slot ids
# grow by 4 bytes per block, nothing else does.
CHUNKED_SLACK_BYTES = 4096


def _peak_bytes_of_last_chunk(model, num_context: int, form: str) -> int:
    """Peak new tensor bytes of one MEMORY_NEW_TOKENS-token prefill chunk over num_context cached tokens."""
    tokens = torch.randint(0, 96, (num_context + MEMORY_NEW_TOKENS,), generator=torch.Generator().manual_seed(2))
    runner = PagedRunner(model, num_blocks=num_context // BLOCK_SIZE + 16, block_size=BLOCK_SIZE,
                         prefill_context_chunk=MEMORY_CONTEXT_CHUNK, prefill_form=form)
    runner.step([("a", tokens[:num_context].tolist())])
    with PeakTensorBytes() as meter:
        runner.step([("a", tokens[num_context:].tolist())])
    return meter.peak


@pytest.mark.parametrize("form", ["expanded", "absorbed"])
def test_peak_memory_is_bounded_by_the_chunk_while_the_dense_form_grows_linearly(k2, form: str) -> None:
    model, _, _ = k2
    chunked = [_peak_bytes_of_last_chunk(model, n, form) for n in MEMORY_CONTEXTS]
    dense = [_peak_bytes_of_last_chunk(model, n, "dense") for n in MEMORY_CONTEXTS]
    # 4x the context, the same workspace (up to the block table's few bytes) ...
    assert max(chunked) - min(chunked) <= CHUNKED_SLACK_BYTES, chunked
    # ... while the dense form's grows with it, by the same amount per doubling (linear in S) ...
    growth = [b - a for a, b in itertools.pairwise(dense)]
    assert growth[0] > 0 and growth[1] == pytest.approx(2 * growth[0], rel=0.1), dense
    # ... and is already several times the chunked bound at 512 tokens.
    assert dense[-1] > 3 * chunked[-1], (dense, chunked)
