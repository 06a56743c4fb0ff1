"""The benchmarks' baselines do the work they claim to: serve_bench's `core` baseline streams every
requested token from its own engine core process over the delta channel, and offline_throughput's
sorted static batches hand each request its own tokens back, in input order."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from types import SimpleNamespace

import offline_throughput
from bench_senders import CoreBaseline

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.args import load_serve_args

ENGINE = {"block_size": 16, "num_kv_blocks": 256, "max_model_len": 512, "max_num_seqs": 8, "torch_threads": 1}
PROMPTS = [list(range(300, 340)), list(range(500, 520)), list(range(600, 690))]  # k2-tiny's vocabulary: 768
OUTPUT_LENS = [7, 12, 3]
TIMEOUT_S = 60


async def test_core_baseline_streams_every_token_from_its_own_core() -> None:
    baseline = CoreBaseline(load_serve_args({"model": str(tiny_checkpoint_dir()), "engine": ENGINE}),
                            temperature=1.0)
    process = baseline._core._process  # noqa: SLF001 - the test checks the core process goes away
    try:
        sends = [baseline.send(p, n) for p, n in zip(PROMPTS, OUTPUT_LENS, strict=True)]
        results = await asyncio.wait_for(asyncio.gather(*sends), TIMEOUT_S)
        assert [r.error for r in results] == [None] * len(PROMPTS)
        assert [r.num_output_tokens for r in results] == OUTPUT_LENS
        # stream_interval 1: a delta per token, though deltas that reach the buffer before the reader wakes
        # are merged (DeltaBuffer.take), as they are for the router; so streamed, never more chunks than tokens.
        num_chunks = [len(r.itl_s) + 1 for r in results]
        assert all(n <= want for n, want in zip(num_chunks, OUTPUT_LENS, strict=True))
        assert num_chunks[OUTPUT_LENS.index(max(OUTPUT_LENS))] > 1
        assert process.poll() is None
    finally:
        await baseline.close()
    assert process.poll() is not None


def test_sorted_static_batches_return_outputs_in_input_order() -> None:
    prompts, _ = offline_throughput.make_workload(6, seed=1)
    prompts = [p[:n] for p, n in zip(prompts, (9, 4, 12, 6, 3, 8), strict=True)]  # short: the order is tested
    output_lens = [3, 5, 2, 6, 4, 2]
    key = offline_throughput.SORT_KEYS["output"]
    assert sorted(range(6), key=lambda i: key(prompts[i], output_lens[i])) != list(range(6))
    with tempfile.TemporaryDirectory() as tmp:
        model = offline_throughput.make_checkpoint(Path(tmp) / "tiny", seed=0)
    args = SimpleNamespace(sort_key="output", hf_batch_size=6, sorted_batch_sizes=[2])
    naive, by_length = offline_throughput.time_transformers(model, prompts, output_lens, args)
    assert not naive.is_sorted and by_length.is_sorted
    assert [len(t) for t in by_length.token_ids] == output_lens
    # Batch 1 has no padding: the reference for each request's greedy tokens (padding may flip a near-tie).
    single = offline_throughput.run_transformers(model, prompts, output_lens, 1, list(range(len(prompts))))
    assert sum(a == b for a, b in zip(by_length.token_ids, single, strict=True)) >= len(prompts) - 1
    assert sum(a == b for a, b in zip(naive.token_ids, single, strict=True)) >= len(prompts) - 1
