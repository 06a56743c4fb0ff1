"""serve_bench's --variants mode spreads requests evenly over the model ids and keeps each id's results apart."""

from __future__ import annotations

import asyncio

import serve_bench
from bench_senders import RequestResult


def test_run_workload_sends_request_i_through_sender_i_mod_n() -> None:
    seen: dict[str, list[int]] = {"standard": [], "turbo": []}

    def sender(name: str):
        async def send(prompt: list[int], max_tokens: int) -> RequestResult:
            seen[name].append(prompt[0])
            await asyncio.sleep(0.001 * (prompt[0] % 3))  # finish out of order
            return RequestResult(True, ttft_s=0.0, e2e_s=0.0, num_output_tokens=max_tokens)
        return send

    workload = serve_bench.Workload([[i] for i in range(6)], [10 + i for i in range(6)])
    results, _ = asyncio.run(serve_bench.run_workload(workload, [sender("standard"), sender("turbo")],
                                                      concurrency=6, request_rate=float("inf"), seed=0))
    assert (sorted(seen["standard"]), sorted(seen["turbo"])) == ([0, 2, 4], [1, 3, 5])
    assert [r.num_output_tokens for r in results] == [10, 11, 12, 13, 14, 15]  # in request order


def test_variants_flags() -> None:
    args = serve_bench.parse_args(["--variants", "--max-num-seqs", "4"])
    assert args.variants and args.max_num_seqs == 4
    assert not serve_bench.parse_args([]).variants
