"""Prefill over the cached context in chunks of prefill_context_chunk rows: same logits as one piece and as
transformers, for every block alignment of the cached prefix, with the expanded workspace bounded by the chunk."""

from __future__ import annotations

import pytest
import torch

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


def _prefill_in_two(model, tokens: list[int], num_context: int, chunk: int) -> torch.Tensor:
    """Prefill `num_context` tokens, then NUM_NEW more over them as cached context: the second chunk's logits."""
    runner = PagedRunner(model, num_blocks=16, block_size=BLOCK_SIZE, seed=3, prefill_context_chunk=chunk)
    runner.step([("a", tokens[:num_context])])
    return runner.step([("a", tokens[num_context : num_context + NUM_NEW])])["a"]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("num_context", [2 * BLOCK_SIZE + r for r in range(BLOCK_SIZE)])
def test_chunked_context_matches_unchunked_and_hf(k2, num_context: int, chunk: int) -> None:
    model, tokens, ref = k2
    got = _prefill_in_two(model, tokens, num_context, chunk)
    whole = _prefill_in_two(model, tokens, num_context, UNCHUNKED)
    torch.testing.assert_close(got, whole, atol=CHUNK_ATOL, rtol=CHUNK_RTOL)
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
    runner = PagedRunner(model, num_blocks=24, block_size=BLOCK_SIZE, prefill_context_chunk=chunk)
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


def test_rejects_an_empty_chunk() -> None:
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match="prefill_context_chunk"):
        AttentionMetadata(empty, empty, empty, empty, 0, 0, (0,), (), prefill_context_chunk=0)
