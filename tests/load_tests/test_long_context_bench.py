"""long_context_bench measures what it says: both prefill forms over the same prompt lengths with a peak each, and
decodes that get a token every step beside a long prompt ahead of them only when the reserve is on."""

from __future__ import annotations

import argparse

import long_context_bench as bench

from k2ray.model.default_checkpoint import tiny_checkpoint_dir

NUM_DECODES = 2
PROMPT_LEN = 512
BUDGET = 128


def _args(**overrides) -> argparse.Namespace:
    values = dict(model=tiny_checkpoint_dir(), device="cpu", min_len=256, max_len=512, dense_max_len=256,
                  max_num_batched_tokens=BUDGET, prefill_context_chunk=64, itl_prompt_len=PROMPT_LEN,
                  itl_num_decodes=NUM_DECODES, itl_decode_prompt_len=8, itl_max_tokens=64)
    return argparse.Namespace(**(values | overrides))


def test_prefill_curves_run_both_forms_where_asked() -> None:
    points = bench.prefill_curves(_args())
    assert [(p.form, p.num_tokens) for p in points] == [("dense", 256), ("chunked", 256), ("chunked", 512)]
    assert all(p.tokens_per_s > 0 and p.peak_mib >= 0 for p in points)


def test_the_reserve_keeps_decodes_going_beside_a_long_prompt_ahead_of_them() -> None:
    starved = bench.itl_beside_long_prefill(_args(), long_prompt_ahead=True, share=0.0)
    served = bench.itl_beside_long_prefill(_args(), long_prompt_ahead=True, share=0.25)
    # Without it: one gap for the step that admits the prompt, one for the wait through all of it.
    assert starved.num_gaps == 2 * NUM_DECODES
    # With it: a token for every decode at every step of the prefill (BUDGET - NUM_DECODES tokens a step).
    num_steps = 1 + -(-(PROMPT_LEN - (BUDGET - NUM_DECODES)) // (BUDGET - NUM_DECODES))
    assert served.num_gaps == NUM_DECODES * num_steps
