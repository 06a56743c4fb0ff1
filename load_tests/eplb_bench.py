"""Redundant experts (EPLB) on k2-tiny: max/mean token load per EP rank, contiguous experts vs an EPLB placement.

    python load_tests/eplb_bench.py [--ep-sizes 2,4] [--num-redundant-per-rank 1] [--skewed-vocab 16]

A skewed workload: every prompt and decode token comes from the first `--skewed-vocab` token ids, so the router
favours a few experts. The single-process model records the expert load on calibration prompts; k2ray.dist.eplb
computes a placement with `num_redundant_per_rank * ep_size` redundant experts from it; then held-out prompts
of the same kind run on a real EP group (spawned ranks over gloo, tests/dist/ep_worker.py's harness) twice:
routed experts sharded contiguously, and with the placement. Load = tokens x top-k slots each rank's experts
processed, summed over the group; imbalance = the MoE layers' summed max rank load over their summed mean
(each layer waits for its busiest rank). ratio = EPLB / contiguous. The two runs' logits must agree (greedy
argmax identical, max |diff| printed): replicas hold the same weights.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "dist"))
from ep_worker import RankArgs, Step, load, run_steps, serve_rank  # noqa: E402

from k2ray.dist.ep_group import EPGroupSpec  # noqa: E402
from k2ray.dist.eplb import rebalance  # noqa: E402
from k2ray.model.default_checkpoint import tiny_checkpoint_dir  # noqa: E402
from k2ray.model.expert_map import load_imbalance, moe_layer_ids, rank_loads  # noqa: E402

HOST = "127.0.0.1"
TIMEOUT_S = 300.0
NUM_SEQS_PER_RANK = 2
NUM_DECODE_STEPS = 4
MIN_PROMPT, MAX_PROMPT = 6, 24
CALIBRATION_SEED, EVALUATION_SEED = 0, 1000


def workload(rank: int, seed: int, vocab: int) -> list[Step]:
    """One rank's steps: its prompts in one prefill step, then decode steps (token ids from the skewed vocab)."""
    generator = torch.Generator().manual_seed(seed + rank)
    lengths = torch.randint(MIN_PROMPT, MAX_PROMPT, (NUM_SEQS_PER_RANK,), generator=generator).tolist()
    seqs = [f"s{i}" for i in range(NUM_SEQS_PER_RANK)]
    steps = [[(seq, torch.randint(0, vocab, (n,), generator=generator).tolist())
              for seq, n in zip(seqs, lengths, strict=True)]]
    for _ in range(NUM_DECODE_STEPS):
        steps.append([(seq, torch.randint(0, vocab, (1,), generator=generator).tolist()) for seq in seqs])
    return steps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def run_group(ep_size: int, steps: list[list[Step]], placement: str | None) -> list[dict]:
    checkpoint, port = str(tiny_checkpoint_dir()), free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ranks = [RankArgs(checkpoint, EPGroupSpec(HOST, port, "eplb", rank, ep_size), TIMEOUT_S, steps[rank],
                      placement=placement) for rank in range(ep_size)]
    processes = [ctx.Process(target=serve_rank, args=(i, args, results), daemon=True) for i, args in enumerate(ranks)]
    for process in processes:
        process.start()
    out = {}
    for _ in ranks:
        index, result = results.get(timeout=TIMEOUT_S)
        if isinstance(result, str):
            raise RuntimeError(f"rank {index}: {result}")
        out[index] = result
    for process in processes:
        process.join(TIMEOUT_S)
    return [out[i] for i in range(ep_size)]


def group_imbalance(out: list[dict], ep_size: int) -> tuple[float, torch.Tensor]:
    physical = sum(step for result in out for step in result["physical"])  # [MoE layers, P]
    per_rank = rank_loads(torch.from_numpy(physical), ep_size)
    return load_imbalance(per_rank), per_rank.sum(0)


def logits_agree(a: list[dict], b: list[dict]) -> tuple[bool, float]:
    same, worst = True, 0.0
    for rank_a, rank_b in zip(a, b, strict=True):
        for step_a, step_b in zip(rank_a["logits"], rank_b["logits"], strict=True):
            for seq, x in step_a.items():
                same &= bool((x.argmax(-1) == step_b[seq].argmax(-1)).all())
                worst = max(worst, float(np.abs(x - step_b[seq]).max()))
    return same, worst


def bench(ep_size: int, num_redundant: int, vocab: int, model, tmp: Path) -> str:
    calibration = [run_steps(model, workload(rank, CALIBRATION_SEED, vocab))[1] for rank in range(ep_size)]
    load = sum(step for counts in calibration for step in counts)  # [MoE layers, E]
    placement = rebalance(load.tolist(), moe_layer_ids(model.args), ep_size, num_redundant)
    path = tmp / f"placement_ep{ep_size}.json"
    placement.save(path)
    steps = [workload(rank, EVALUATION_SEED, vocab) for rank in range(ep_size)]
    contiguous, balanced = run_group(ep_size, steps, None), run_group(ep_size, steps, str(path))
    before, before_ranks = group_imbalance(contiguous, ep_size)
    after, after_ranks = group_imbalance(balanced, ep_size)
    same, worst = logits_agree(contiguous, balanced)
    return (f"ep_size {ep_size}  redundant {num_redundant:>2}  max/mean contiguous {before:5.3f} -> EPLB {after:5.3f}"
            f"  ratio {after / before:5.3f}  |  tokens per rank {before_ranks.tolist()} -> {after_ranks.tolist()}"
            f"  |  greedy identical {same}, max |logit diff| {worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-sizes", default="2,4")
    parser.add_argument("--num-redundant-per-rank", type=int, default=1)
    parser.add_argument("--skewed-vocab", type=int, default=16)
    args = parser.parse_args()
    model = load(RankArgs(str(tiny_checkpoint_dir()), None, TIMEOUT_S, []))
    print(f"k2-tiny ({model.args.n_routed_experts} experts, top-{model.args.num_experts_per_tok}), gloo on CPU; "
          f"prompts from token ids [0, {args.skewed_vocab}); calibration and evaluation prompts differ", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for ep_size in (int(n) for n in args.ep_sizes.split(",")):
            print(bench(ep_size, args.num_redundant_per_rank * ep_size, args.skewed_vocab, model, Path(tmp)),
                  flush=True)
    print(f"run took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
