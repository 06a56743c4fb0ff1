"""KV transfer bandwidth: the same bytes through raw torch.distributed send/recv and through the
connector (KVSender -> KVReceiver), two processes, gloo on CPU.

    python load_tests/kv_transfer_bench.py [--sizes 1024,8192,32768] [--reps 5] [--max-chunk-mib 64]

For each layout (k2-tiny's: 3 layers x 40 values x 4 bytes per token; K2's: 61 layers x 576 values x
2 bytes) and prompt size, both processes hold a paged latent cache of the prompt's blocks (block_size
16, in a shuffled block order). Raw: the whole cache as one contiguous tensor in one send/recv.
Connector: the prompt's blocks copied out of the sender's cache chunk by chunk, sent, received into
staging and written into the receiver's blocks. Raw and connector repetitions alternate so both see
the same machine load; each time runs from the sender's start to the receiver's "done" over a pipe
(one hop, on both paths). One intra-op thread per process. GB/s from the median; ratio = connector / raw (target >= 0.8). The biggest
K2 size gets fewer repetitions (--big-reps) to keep a run within a few minutes.

The transfer's share of TTFT, for the k2-tiny layout: the connector's median time over that plus the
time the tiny model's engine takes to prefill the same prompt here (one thread, max_tokens 1), in
the same run. K2 itself does not run here, so its row has no share.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import TCPStore

from k2ray.dist.kv_connector import DEFAULT_MAX_CHUNK_BYTES, KVTransferConfig
from k2ray.dist.kv_pair_group import PairSpec
from k2ray.dist.kv_receiver import KVReceiver
from k2ray.dist.kv_sender import KVSender
from k2ray.dist.kv_wire import KVTransferMeta
from k2ray.engine.kv.kv_transfer import LatentKVLayout

BLOCK_SIZE = 16
LAYOUTS = {"k2-tiny": LatentKVLayout(3, BLOCK_SIZE, 40, torch.float32),
           "K2": LatentKVLayout(61, BLOCK_SIZE, 576, torch.bfloat16)}
BIG_BYTES = 1 << 30  # sizes above this get --big-reps repetitions
TIMEOUT_S = 120.0
HOST = "127.0.0.1"
GB = 1e9
# On two shared cores, idle-spinning OpenMP workers of one process starve the other's transfer thread.
INTRA_OP_THREADS = 1


@dataclass(frozen=True)
class Case:
    layout_name: str
    num_tokens: int
    reps: int

    @property
    def layout(self) -> LatentKVLayout:
        return LAYOUTS[self.layout_name]

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // BLOCK_SIZE

    @property
    def num_bytes(self) -> int:
        layout = self.layout
        return self.num_blocks * layout.num_layers * BLOCK_SIZE * layout.kv_cache_dim * layout.dtype.itemsize


class PagedCache:
    """A paged latent cache over one contiguous [num_layers, num_blocks, block_size, dim] tensor
    (what ModelRunner's read/write do, per layer), so raw sends the very same bytes."""

    def __init__(self, layout: LatentKVLayout, num_blocks: int, fill: bool) -> None:
        self.device = torch.device("cpu")
        self.kv_layout = layout
        self.data = torch.empty(layout.shape(num_blocks), dtype=layout.dtype)
        if fill:
            self.data.view(torch.uint8).random_(0, 64)

    def read_kv_blocks(self, block_ids, out: torch.Tensor | None = None) -> torch.Tensor:
        index = torch.tensor(list(block_ids), dtype=torch.int64)
        if out is None:
            out = torch.empty(self.kv_layout.shape(len(block_ids)), dtype=self.kv_layout.dtype)
        for layer in range(self.kv_layout.num_layers):
            torch.index_select(self.data[layer], 0, index, out=out[layer])
        return out

    def write_kv_blocks(self, block_ids, kv: torch.Tensor) -> None:
        index = torch.tensor(list(block_ids), dtype=torch.int64)
        for layer in range(self.kv_layout.num_layers):
            self.data[layer].index_copy_(0, index, kv[layer])


def shuffled_blocks(num_blocks: int, seed: int) -> list[int]:
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()


def raw_group(port: int, rank: int) -> dist.ProcessGroup:
    timeout = timedelta(seconds=TIMEOUT_S)
    store = TCPStore(HOST, port, 2 if rank == 0 else None, rank == 0, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


def sender_main(cases: list[Case], ports: tuple[int, int], config: KVTransferConfig, conn) -> None:
    torch.set_num_threads(INTRA_OP_THREADS)
    raw = raw_group(ports[0], 1)
    for case in cases:
        cache = PagedCache(case.layout, case.num_blocks, fill=True)
        sender = KVSender(cache, PairSpec(HOST, ports[1], f"bench-{case.layout_name}-{case.num_tokens}", 1),
                          config)
        src_block_ids = shuffled_blocks(case.num_blocks, seed=1)
        raw_s, conn_s = [], []
        for rep in range(case.reps):
            assert conn.recv() == "ready"
            start = time.perf_counter()
            raw.send([cache.data], 0, 0).wait()
            assert conn.recv() == "done"
            raw_s.append(time.perf_counter() - start)

            meta = KVTransferMeta(f"r{rep}", 0, case.num_blocks, case.layout)
            assert conn.recv() == "ready"
            start = time.perf_counter()
            sender.send(meta, src_block_ids).result(TIMEOUT_S)
            assert conn.recv() == "done"
            conn_s.append(time.perf_counter() - start)
        sender.close()
        conn.send((raw_s, conn_s))
        del cache


def receiver_side(cases: list[Case], ports: tuple[int, int], config: KVTransferConfig, conn) -> list[tuple]:
    raw = raw_group(ports[0], 0)
    results = []
    for case in cases:
        cache = PagedCache(case.layout, case.num_blocks, fill=False)
        receiver = KVReceiver(cache, PairSpec(HOST, ports[1], f"bench-{case.layout_name}-{case.num_tokens}", 0),
                              config)
        dst_block_ids = shuffled_blocks(case.num_blocks, seed=2)
        for rep in range(case.reps):
            work = raw.recv([cache.data], 1, 0)
            conn.send("ready")
            work.wait()
            conn.send("done")

            future = receiver.recv(KVTransferMeta(f"r{rep}", 0, case.num_blocks, case.layout), dst_block_ids)
            conn.send("ready")
            future.result(TIMEOUT_S)
            conn.send("done")
        raw_s, conn_s = conn.recv()
        receiver.close()
        results.append((case, raw_s, conn_s))
        print(report_line(case, raw_s, conn_s), flush=True)
        del cache
    return results


def report_line(case: Case, raw_s: list[float], conn_s: list[float]) -> str:
    raw_gbps = case.num_bytes / statistics.median(raw_s) / GB
    conn_gbps = case.num_bytes / statistics.median(conn_s) / GB
    return (f"{case.layout_name:>8} {case.num_tokens:>6} tok {case.num_bytes / 1e6:>9.1f} MB  reps {case.reps:>2}  "
            f"raw {raw_gbps:6.2f} GB/s  connector {conn_gbps:6.2f} GB/s  ratio {conn_gbps / raw_gbps:5.2f}")


def prefill_seconds(num_tokens: int) -> float:
    """The tiny model's engine prefilling a `num_tokens` prompt to its first token (median of 3)."""
    from k2ray.engine.config import EngineConfig
    from k2ray.engine.llm_engine import LLMEngine
    from k2ray.model.default_checkpoint import tiny_checkpoint_dir
    from k2ray.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint_dir()), block_size=BLOCK_SIZE,
                                    max_model_len=num_tokens + BLOCK_SIZE, max_num_batched_tokens=num_tokens,
                                    num_kv_blocks=num_tokens // BLOCK_SIZE + 2, enable_prefix_caching=False))
    times = []
    for rep in range(3):
        start = time.perf_counter()
        engine.add_request(f"p{rep}", [rep % 200 + 1] * num_tokens, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ttft_shares(results: list[tuple]) -> None:
    for case, _, conn_s in results:
        if case.layout_name != "k2-tiny":
            continue
        transfer_s, prefill_s = statistics.median(conn_s), prefill_seconds(case.num_tokens)
        print(f"k2-tiny {case.num_tokens:>6} tok: prefill {prefill_s * 1e3:8.1f} ms, transfer {transfer_s * 1e3:6.2f} ms: "
              f"transfer share of TTFT {transfer_s / (prefill_s + transfer_s):.1%}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,8192,32768", help="prompt sizes in tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--big-reps", type=int, default=2, help="repetitions for sizes over 1 GiB")
    parser.add_argument("--max-chunk-mib", type=int, default=DEFAULT_MAX_CHUNK_BYTES >> 20)
    args = parser.parse_args()
    torch.set_num_threads(INTRA_OP_THREADS)
    cases = []
    for layout_name in LAYOUTS:
        for num_tokens in (int(size) for size in args.sizes.split(",")):
            case = Case(layout_name, num_tokens, args.reps)
            cases.append(Case(layout_name, num_tokens, args.big_reps if case.num_bytes > BIG_BYTES else args.reps))
    config = KVTransferConfig(TIMEOUT_S, args.max_chunk_mib << 20)
    ports = (free_port(), free_port())
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    sender = ctx.Process(target=sender_main, args=(cases, ports, config, there), daemon=True)
    sender.start()
    print(f"gloo on CPU, {torch.get_num_threads()} threads, chunks of {args.max_chunk_mib} MiB; "
          f"median over reps", flush=True)
    start = time.perf_counter()
    results = receiver_side(cases, ports, config, here)
    sender.join(TIMEOUT_S)
    ratios = [statistics.median(raw_s) / statistics.median(conn_s) for _, raw_s, conn_s in results]
    print(f"min ratio {min(ratios):.2f} (target >= 0.8); run took {time.perf_counter() - start:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    ttft_shares(results)


if __name__ == "__main__":
    main()
