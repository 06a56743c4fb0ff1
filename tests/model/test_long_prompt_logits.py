"""Prompts of 1 to 8K tokens on a tiny K2-shaped checkpoint (YaRN on, its window stretched to 8K): the new
prefill, chunked over the cached context or in one piece, gives transformers' logits for the chunk that
follows a cached prefix of every block alignment."""

from __future__ import annotations

import pytest
import torch

from k2ray.model.loader import load_model

from .hf_checkpoints import K2_YARN, hf_logits, load_hf_reference, make_hf_checkpoint
from .paged_runner import PagedRunner

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

ATOL = RTOL = 1e-4
NUM_TOKENS = 8192
BLOCK_SIZE = 16
NUM_NEW = 7
CONTEXT_CHUNK = 1000  # no block multiple: chunk edges fall inside blocks
UNCHUNKED = 1 << 20
# YaRN factor 64 over 128 original positions: the window is the prompt.
LONG_YARN = {**K2_YARN, "original_max_position_embeddings": NUM_TOKENS // 64}


@pytest.fixture(scope="module")
def k2_8k(tmp_path_factory):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("hf8k"), "k2_like", max_position_embeddings=NUM_TOKENS,
                              rope_parameters=LONG_YARN)
    tokens = torch.randint(0, 96, (NUM_TOKENS,), generator=torch.Generator().manual_seed(8)).tolist()
    with torch.no_grad():
        ref = hf_logits(load_hf_reference(ckpt), tokens)
    return load_model(ckpt, dtype=torch.float32), tokens, ref


def _after_cached_prefix(model, tokens: list[int], num_context: int, chunk: int) -> torch.Tensor:
    runner = PagedRunner(model, num_blocks=NUM_TOKENS // BLOCK_SIZE + 1, block_size=BLOCK_SIZE,
                         prefill_context_chunk=chunk)
    runner.step([("a", tokens[:num_context])])
    return runner.step([("a", tokens[num_context : num_context + NUM_NEW])])["a"]


def test_a_one_token_prompt_matches_hf(k2_8k) -> None:
    model, tokens, ref = k2_8k
    out = PagedRunner(model, num_blocks=2, block_size=BLOCK_SIZE).step([("a", tokens[:1])])["a"]
    torch.testing.assert_close(out, ref[:1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("misalignment", [0, 1, BLOCK_SIZE // 2, BLOCK_SIZE - 1])
def test_the_end_of_an_8k_prompt_matches_hf_chunked(k2_8k, misalignment: int) -> None:
    model, tokens, ref = k2_8k
    # The cached prefix ends `misalignment` tokens into a block, near the end of the window.
    num_context = (NUM_TOKENS - NUM_NEW - BLOCK_SIZE) // BLOCK_SIZE * BLOCK_SIZE + misalignment
    got = _after_cached_prefix(model, tokens, num_context, CONTEXT_CHUNK)
    torch.testing.assert_close(got, ref[num_context : num_context + NUM_NEW], atol=ATOL, rtol=RTOL)


def test_the_end_of_an_8k_prompt_matches_hf_unchunked(k2_8k) -> None:
    model, tokens, ref = k2_8k
    num_context = NUM_TOKENS - NUM_NEW
    got = _after_cached_prefix(model, tokens, num_context, UNCHUNKED)
    torch.testing.assert_close(got, ref[num_context:], atol=ATOL, rtol=RTOL)
