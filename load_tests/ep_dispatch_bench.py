"""MoE all_to_all dispatch vs a raw all_to_all of the same bytes, two processes, gloo on CPU.

    python load_tests/ep_dispatch_bench.py [--tokens 64,1024] [--reps 10] [--ep-size 2] [--memory-only]

For each layout (k2-tiny's: hidden 128 fp32, 16 experts, top-4; K2's: hidden 7168 bf16, 384 experts, top-8)
and per-rank batch size, every rank routes its tokens to uniformly random top-k experts and runs one MoE
layer's AllToAllDispatch (k2ray/dist/moe_dispatch.py) with a do-nothing local expert, so the time is the
dispatch alone: the count exchange and its host sync, the hidden states, ids and weights out, the partial
sums back, and the gathers around them. Raw: one all_to_all of a byte tensor with the same per-destination
byte counts (out and back together). A barrier starts each repetition; times are rank 0's, median over reps;
ratio = dispatch / raw. Bytes: what rank 0 puts on the wire per MoE layer to reach the other ranks' experts
(rows to itself stay local) vs an all-gather design that sends every token's row to every other rank; with
top-k experts spread over N ranks the share falls towards (distinct other ranks per token) / (N - 1).
The partial sums coming back scale the same way on both designs and are left out of both.

Memory per rank first: k2-tiny loaded as EP rank 0 of 1, 2 and 4 (what the loader read from the checkpoint and
the weights the rank holds), and K2 Thinking (k8s/sizing's config) built on the meta device as rank 0 of 8, 16
and 32 with packed INT4 experts, without and with one redundant expert per rank (an EPLB placement).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from k2ray.dist.ep_group import EPGroup, EPGroupSpec
from k2ray.dist.moe_dispatch import AllToAllDispatch
from k2ray.model.args import ModelArgs
from k2ray.model.deepseek_v3 import Transformer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.expert_map import ExpertMap, moe_layer_ids
from k2ray.model.loader import load_model_with_report

HOST = "127.0.0.1"
TIMEOUT_S = 120.0
INTRA_OP_THREADS = 1  # two shared cores: one thread per process keeps them from starving each other
MB = 1e6
GB = 1e9
K2_CONFIG = Path(__file__).resolve().parent.parent / "k8s" / "sizing" / "kimi_k2_thinking_config.json"
TINY_EP_SIZES = (1, 2, 4)
K2_EP_SIZES = (8, 16, 32)
ID_BYTES = torch.int32.itemsize  # ids and weights travel packed as int32
WEIGHT_BYTES = torch.float32.itemsize


@dataclass(frozen=True)
class Layout:
    name: str
    hidden_size: int
    dtype: torch.dtype
    n_routed_experts: int
    top_k: int

    @property
    def row_bytes(self) -> int:
        """Bytes one dispatched (token, rank) row carries out: hidden state, top-k ids and weights."""
        return self.hidden_size * self.dtype.itemsize + self.top_k * (ID_BYTES + WEIGHT_BYTES)


LAYOUTS = (Layout("k2-tiny", 128, torch.float32, 16, 4), Layout("K2", 7168, torch.bfloat16, 384, 8))


def random_routing(num_tokens: int, layout: Layout, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, layout.n_routed_experts, generator=generator).topk(layout.top_k, dim=-1)[1]
    weights = torch.rand(num_tokens, layout.top_k, generator=generator)
    return weights, ids


def no_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x


def barrier(group: EPGroup) -> None:
    world = group.world_size
    group.all_to_all(torch.empty(world), torch.zeros(world), [1] * world, [1] * world)


def time_case(group: EPGroup, layout: Layout, num_tokens: int, reps: int) -> tuple[list[float], list[float], int]:
    dispatch = AllToAllDispatch(group, layout.n_routed_experts)
    x = torch.randn(num_tokens, layout.hidden_size).to(layout.dtype)
    weights, ids = random_routing(num_tokens, layout, seed=group.rank)
    plan = dispatch.plan(ids)
    back_bytes = layout.hidden_size * layout.dtype.itemsize
    send_bytes = [n * (layout.row_bytes + back_bytes) for n in plan.send_splits]
    recv_bytes = [n * (layout.row_bytes + back_bytes) for n in plan.recv_splits]
    raw_in, raw_out = torch.zeros(sum(send_bytes), dtype=torch.uint8), torch.empty(sum(recv_bytes), dtype=torch.uint8)
    dispatch_s, raw_s = [], []
    for _ in range(reps):
        barrier(group)
        start = time.perf_counter()
        dispatch(x, weights, ids, no_experts)
        dispatch_s.append(time.perf_counter() - start)
        barrier(group)
        start = time.perf_counter()
        group.all_to_all(raw_out, raw_in, recv_bytes, send_bytes)
        raw_s.append(time.perf_counter() - start)
    wire_bytes = sum(n * layout.row_bytes for rank, n in enumerate(plan.send_splits) if rank != group.rank)
    return dispatch_s, raw_s, wire_bytes


def rank_main(rank: int, world_size: int, port: int, tokens: list[int], reps: int, conn) -> None:
    torch.set_num_threads(INTRA_OP_THREADS)
    group = EPGroup(EPGroupSpec(HOST, port, "bench", rank, world_size), torch.device("cpu"), TIMEOUT_S)
    for layout in LAYOUTS:
        for num_tokens in tokens:
            result = time_case(group, layout, num_tokens, reps)
            if conn is not None:
                conn.send((layout, num_tokens, *result))
    group.teardown()


def allgather_bytes(layout: Layout, num_tokens: int, world_size: int) -> int:
    """One rank's sends in an all-gather design: every token's row to every other rank."""
    return (world_size - 1) * num_tokens * layout.row_bytes


def report(layout: Layout, num_tokens: int, dispatch_s: list[float], raw_s: list[float], sent: int,
           world_size: int) -> str:
    dispatch_ms, raw_ms = statistics.median(dispatch_s) * 1e3, statistics.median(raw_s) * 1e3
    gathered = allgather_bytes(layout, num_tokens, world_size)
    return (f"{layout.name:>8} {num_tokens:>6} tok/rank  dispatch {dispatch_ms:8.2f} ms  raw {raw_ms:8.2f} ms  "
            f"ratio {dispatch_ms / raw_ms:5.2f}  |  sent {sent / MB:8.2f} MB vs all-gather {gathered / MB:8.2f} MB "
            f"({sent / gathered:4.2f})")


def tiny_memory_lines() -> list[str]:
    lines = []
    for ep_size in TINY_EP_SIZES:
        model, report = load_model_with_report(tiny_checkpoint_dir(), torch.float32, ep_rank=0, ep_size=ep_size,
                                               expert_dispatch=no_forward)
        held = model.parameter_bytes()
        lines.append(f"k2-tiny fp32  ep_size {ep_size:>2}: read {report.num_bytes_read / MB:6.2f} MB "
                     f"({report.num_tensors_skipped} tensors skipped), holds {held.total / MB:6.2f} MB = routed "
                     f"experts {held.routed_experts / MB:6.2f} + replicated {held.replicated / MB:6.2f}")
    return lines


def k2_rank_bytes(args: ModelArgs, ep_size: int, num_redundant: int):
    layers = moe_layer_ids(args)
    row = tuple(range(args.n_routed_experts)) + tuple(range(num_redundant))  # which experts: no matter for bytes
    placement = ExpertMap(ep_size, args.n_routed_experts, layers, (row,) * len(layers)) if num_redundant else None
    with torch.device("meta"):
        model = Transformer(args, "torch", torch.bfloat16, 0, ep_size, no_forward, pack_experts=True,
                            expert_map=placement)
    return model.parameter_bytes(), len(model.expert_range)


def k2_memory_lines() -> list[str]:
    args = ModelArgs.from_hf_config(json.loads(K2_CONFIG.read_text()))
    lines = []
    for ep_size in K2_EP_SIZES:
        for num_redundant in (0, ep_size):
            held, num_local = k2_rank_bytes(args, ep_size, num_redundant)
            lines.append(f"K2 INT4+bf16 ep_size {ep_size:>2}, {num_redundant:>2} redundant: {num_local:>3} experts per "
                         f"layer per rank, holds {held.total / GB:6.1f} GB = routed experts "
                         f"{held.routed_experts / GB:6.1f} + replicated {held.replicated / GB:5.1f}")
    return lines


def no_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, local_experts) -> torch.Tensor:
    raise AssertionError("the memory report runs no forward")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="64,1024", help="tokens per rank per step")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true", help="only the memory per rank")
    args = parser.parse_args()
    for line in tiny_memory_lines() + k2_memory_lines():
        print(line, flush=True)
    if args.memory_only:
        return
    tokens = [int(n) for n in args.tokens.split(",")]
    port = free_port()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    others = [ctx.Process(target=rank_main, args=(rank, args.ep_size, port, tokens, args.reps, None), daemon=True)
              for rank in range(1, args.ep_size)]
    for process in others:
        process.start()
    print(f"gloo on CPU, {args.ep_size} ranks, {INTRA_OP_THREADS} thread each; rank 0's median over "
          f"{args.reps} reps; ratio = dispatch / raw", flush=True)
    start = time.perf_counter()
    reader = ctx.Process(target=rank_main, args=(0, args.ep_size, port, tokens, args.reps, there), daemon=True)
    reader.start()
    for _ in range(len(LAYOUTS) * len(tokens)):
        if not here.poll(TIMEOUT_S):
            raise TimeoutError(f"rank 0 reported nothing within {TIMEOUT_S} s")
        print(report(*here.recv(), args.ep_size), flush=True)
    for process in [reader, *others]:
        process.join(TIMEOUT_S)
    print(f"run took {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
