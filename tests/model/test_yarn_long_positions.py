"""YaRN at Kimi K2's own settings (factor 64 over 4,096 original positions, beta 1/1, mscale 1/1, theta 50,000,
a 262,144-token window) against transformers' DeepseekV3 at positions beyond 100K.

Attention across far positions multiplies any error in the blended frequencies by the distance, so agreement
there checks the YaRN ramp itself. A short sequence whose later tokens sit 100K+ positions after its first ones
(position_ids on the transformers side) stands in for a 100K-token prompt."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2ray.model.loader import load_model
from k2ray.model.rope import rope_cos_sin, rope_inv_freq

from .hf_checkpoints import load_hf_reference, make_hf_checkpoint
from .paged_runner import PagedRunner

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

K2_WINDOW = 262_144
K2_ROPE = dict(rope_type="yarn", rope_theta=50000.0, factor=64.0, original_max_position_embeddings=4096,
               beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
FAR_POSITIONS = (100_003, 150_000, 200_017, K2_WINDOW - 12)
ATOL = RTOL = 1e-4
NUM_TOKENS = 12
NUM_NEAR = 4


@pytest.fixture(scope="module")
def k2_window(tmp_path_factory):
    # K2's own rope head dim (64), so the ramp spans many frequency pairs; everything else stays tiny.
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("hf"), "k2_like", rope_parameters=K2_ROPE,
                              max_position_embeddings=K2_WINDOW, qk_rope_head_dim=64)
    return load_model(ckpt, dtype=torch.float32), load_hf_reference(ckpt)


def test_checkpoint_has_k2_settings(k2_window) -> None:
    model, _ = k2_window
    yarn = model.args.rope_scaling
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.mscale, yarn.mscale_all_dim) == (64, 4096, 1, 1)
    assert model.args.max_position_embeddings == K2_WINDOW


def test_cos_sin_match_transformers_far_out(k2_window) -> None:
    model, hf = k2_window
    positions = torch.tensor([0, 4095, 4096, 65_536, *FAR_POSITIONS, K2_WINDOW - 1])
    cos, sin = rope_cos_sin(positions, model.rope_inv_freq, model.rope_attention_factor)
    hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions.unsqueeze(0))
    half = cos.shape[-1]
    torch.testing.assert_close(cos, hf_cos[0, :, :half], atol=0, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0, :, :half], atol=0, rtol=0)


def _gapped_positions(offset: int) -> list[int]:
    """The first NUM_NEAR tokens at 0.., the rest at offset..: the later tokens attend across ~offset positions."""
    return list(range(NUM_NEAR)) + list(range(offset, offset + NUM_TOKENS - NUM_NEAR))


def _our_logits(model, ids: list[int], offset: int) -> torch.Tensor:
    """A prefill chunk, a second chunk over it as cached context (read 2 rows at a time), then decodes."""
    positions = _gapped_positions(offset)
    runner = PagedRunner(model, block_size=4, prefill_context_chunk=2, rope_position=positions.__getitem__)
    got = [runner.step([("a", ids[:5])])["a"], runner.step([("a", ids[5:9])])["a"]]
    got += [runner.step([("a", [t])])["a"] for t in ids[9:]]
    return torch.cat(got)


@pytest.mark.parametrize("offset", FAR_POSITIONS)
def test_logits_match_transformers_across_100k_positions(k2_window, offset: int) -> None:
    model, hf = k2_window
    tokens = torch.randint(0, model.args.vocab_size, (NUM_TOKENS,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = hf(tokens.unsqueeze(0), position_ids=torch.tensor([_gapped_positions(offset)])).logits[0]
    torch.testing.assert_close(_our_logits(model, tokens.tolist(), offset), ref, atol=ATOL, rtol=RTOL)


def test_comparison_is_sensitive_to_the_yarn_ramp(k2_window) -> None:
    """Frequencies blended over 8,192 original positions instead of 4,096 move the far logits well beyond the
    tolerance, so the comparison above really checks K2's ramp."""
    model, _ = k2_window
    ids = torch.randint(0, model.args.vocab_size, (NUM_TOKENS,), generator=torch.Generator().manual_seed(9)).tolist()
    before = _our_logits(model, ids, FAR_POSITIONS[0])
    wrong = dataclasses.replace(model.args.rope_scaling, original_max_position_embeddings=8192)
    saved = model.rope_inv_freq.clone()
    try:
        model.rope_inv_freq.copy_(rope_inv_freq(dataclasses.replace(model.args, rope_scaling=wrong)))
        after = _our_logits(model, ids, FAR_POSITIONS[0])
    finally:
        model.rope_inv_freq.copy_(saved)
    assert (before - after).abs().max() > 100 * ATOL
