"""Long-context prefill: tokens/s and peak memory vs prompt length, the dense reference form (the whole context
expanded per chunk, a dense [Tq, S] mask) against the chunked one (context read prefill_context_chunk rows at a
time, merged by log-sum-exp), in the same run; then the ITL of running decodes while a long prompt prefills
beside them, with and without the scheduler's decode reservation.

    .venv/bin/python load_tests/long_context_bench.py                    # CPU: 1K..64K, dense to 16K, ITL at 32K
    .venv/bin/python load_tests/long_context_bench.py --device cuda --max-len 262144 --dense-max-len 65536

Peak memory is above what was allocated before the prefill (weights and KV cache excluded): on CUDA torch's
allocator peak, on CPU the process's peak RSS (VmHWM, reset per run; it sees kernel scratch too). Speeds and
ITL gaps are in CPU time on CPU (one torch thread: wall time on an idle machine, and what it stays on a shared
one), in wall time on CUDA. Figures go to load_tests/out/long_context_bench.json (long_context_itl.json with
--skip-prefill) and both curves to load_tests/out/long_context_prefill.png.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from k2ray.engine.config import EngineConfig, resolve_device, resolve_kernel_backend
from k2ray.engine.llm_engine import LLMEngine
from k2ray.model.attention_metadata import DEFAULT_PREFILL_CONTEXT_CHUNK, AttentionMetadata, PrefillForm
from k2ray.model.deepseek_v3 import Transformer
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.loader import load_model
from k2ray.sampling_params import SamplingParams

OUT_DIR = Path(__file__).resolve().parent / "out"
BLOCK_SIZE = 16
MIB = 2**20
FIRST_TOKEN_ID = 300  # prompts draw from the tiny checkpoint's ordinary vocabulary
NUM_TOKEN_IDS = 400
HIGH_PRIORITY = -1  # lower runs first: the long prompt ahead of the decodes in the queue
P99 = 0.99
M_MMAP_THRESHOLD = -3  # glibc mallopt: large blocks are mmapped and go back to the OS when freed
MMAP_THRESHOLD_BYTES = 128 * 1024


@dataclass(frozen=True)
class PrefillPoint:
    form: str
    num_tokens: int
    wall_s: float
    cpu_s: float
    tokens_per_s: float  # by CPU time on CPU (a shared machine's other load stays out), by wall time on CUDA
    peak_mib: float


@dataclass(frozen=True)
class ItlPoint:
    long_prompt_ahead: bool
    decode_reserved_share: float
    num_gaps: int
    itl_p50_ms: float
    itl_p99_ms: float
    itl_max_ms: float
    prefill_s: float


class PeakMemory:
    """Peak bytes allocated since reset(), above what was allocated at reset()."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            self._libc = libc

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self._base = _status_kib("VmRSS") * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return _status_kib("VmHWM") * 1024 - self._base


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _chunk_metadata(start: int, end: int, block_table: torch.Tensor, form: PrefillForm,
                    context_chunk: int) -> AttentionMetadata:
    device = block_table.device
    positions = torch.arange(start, end, device=device)
    slots = block_table[0, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, end - start], device=device), seq_lens=torch.tensor([end], device=device),
        block_tables=block_table, slot_mapping=slots, num_decodes=0, max_seq_len=end,
        query_start_loc_cpu=(0, end - start), seq_lens_cpu=(end,), prefill_context_chunk=context_chunk,
        prefill_form=form)


@torch.inference_mode()
def prefill(model: Transformer, num_tokens: int, form: PrefillForm, args: argparse.Namespace,
            meter: PeakMemory) -> PrefillPoint:
    """One prompt of num_tokens prefilled in max_num_batched_tokens chunks over a fresh cache, as the engine does."""
    device = model.embed.weight.device
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    # Written now, so the pages the prefill fills are resident before the meter's reset (zeros may be lazy).
    caches = [torch.empty(num_blocks, BLOCK_SIZE, model.args.kv_cache_dim, dtype=model.dtype, device=device).fill_(0)
              for _ in model.layers]
    block_table = torch.arange(num_blocks, dtype=torch.int32, device=device).unsqueeze(0)
    token_ids = torch.randint(FIRST_TOKEN_ID, FIRST_TOKEN_ID + NUM_TOKEN_IDS, (num_tokens,), device=device)
    meter.reset()
    began, began_cpu = time.perf_counter(), time.process_time()
    for start in range(0, num_tokens, args.max_num_batched_tokens):
        end = min(start + args.max_num_batched_tokens, num_tokens)
        meta = _chunk_metadata(start, end, block_table, form, args.prefill_context_chunk)
        hidden = model(token_ids[start:end], torch.arange(start, end, device=device), caches, meta)
    model.compute_logits(hidden[-1:])
    peak = meter.peak_bytes()
    wall_s, cpu_s = time.perf_counter() - began, time.process_time() - began_cpu
    seconds = cpu_s if device.type == "cpu" else wall_s
    return PrefillPoint(form, num_tokens, wall_s, cpu_s, num_tokens / seconds, peak / MIB)


def prefill_curves(args: argparse.Namespace) -> list[PrefillPoint]:
    device = resolve_device(args.device)
    model = load_model(str(args.model), torch.float32 if device.type == "cpu" else torch.bfloat16, device,
                       resolve_kernel_backend("auto", device))
    meter = PeakMemory(device)
    prefill(model, args.min_len, "chunked", args, meter)  # warm-up: kernels, allocator, thread pools
    points = []
    num_tokens = args.min_len
    while num_tokens <= args.max_len:
        forms: list[PrefillForm] = ["dense", "chunked"] if num_tokens <= args.dense_max_len else ["chunked"]
        for form in forms:
            point = prefill(model, num_tokens, form, args, meter)
            print(f"prefill {form:>7} {num_tokens:>7} tokens: {point.tokens_per_s:9.0f} tok/s, "
                  f"peak {point.peak_mib:8.1f} MiB, {point.wall_s:7.2f} s wall, {point.cpu_s:7.2f} s CPU", flush=True)
            points.append(point)
        num_tokens *= 2
    return points


def _itl_engine(args: argparse.Namespace, share: float) -> LLMEngine:
    num_tokens = args.itl_prompt_len + args.itl_num_decodes * (args.itl_decode_prompt_len + args.itl_max_tokens)
    return LLMEngine(EngineConfig(
        model=str(args.model), device=args.device, block_size=BLOCK_SIZE,
        num_kv_blocks=2 * -(-num_tokens // BLOCK_SIZE), max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.itl_prompt_len + args.itl_max_tokens, prefill_context_chunk=args.prefill_context_chunk,
        decode_reserved_share=share, skip_tokenizer_init=True, enable_structured_output=False))


def itl_beside_long_prefill(args: argparse.Namespace, long_prompt_ahead: bool, share: float) -> ItlPoint:
    """Decodes running, then one long prompt arrives: the gaps between the decodes' tokens until its first token."""
    engine = _itl_engine(args, share)
    generator = torch.Generator().manual_seed(int(long_prompt_ahead))
    decode_params = SamplingParams(temperature=0, max_tokens=args.itl_max_tokens, ignore_eos=True)
    for i in range(args.itl_num_decodes):
        prompt = torch.randint(FIRST_TOKEN_ID, FIRST_TOKEN_ID + NUM_TOKEN_IDS, (args.itl_decode_prompt_len,),
                               generator=generator).tolist()
        engine.add_request(f"decode-{i}", prompt, decode_params, stream=True)
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()  # every decode has its first token: they are decoding
    long_prompt = torch.randint(FIRST_TOKEN_ID, FIRST_TOKEN_ID + NUM_TOKEN_IDS, (args.itl_prompt_len,),
                                generator=generator).tolist()
    priority = HIGH_PRIORITY if long_prompt_ahead else 0
    # On CPU the engine's CPU time (one torch thread, this process): the work a decode waited through, whatever
    # else shares the machine. On CUDA wall time.
    clock = time.process_time if resolve_device(args.device).type == "cpu" else time.perf_counter
    began = last = clock()
    engine.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=1, priority=priority))
    last_token_at = dict.fromkeys((f"decode-{i}" for i in range(args.itl_num_decodes)), began)
    gaps: list[float] = []
    while "long" in engine.scheduler.requests:
        outputs = engine.step()
        last = clock()
        for output in outputs:
            if output.request_id in last_token_at:
                gaps.append(last - last_token_at[output.request_id])
                last_token_at[output.request_id] = last
    # A decode still waiting when the prefill ends has waited all of it.
    gaps += [last - at for at in last_token_at.values() if at < last]
    engine.shutdown()
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, int(P99 * len(gaps)))]
    return ItlPoint(long_prompt_ahead, share, len(gaps), statistics.median(gaps) * 1e3, p99 * 1e3,
                    gaps[-1] * 1e3, last - began)


def plot(points: list[PrefillPoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for form in ("dense", "chunked"):
        mine = [p for p in points if p.form == form]
        lengths = [p.num_tokens for p in mine]
        speed.plot(lengths, [p.tokens_per_s for p in mine], marker="o", label=form)
        memory.plot(lengths, [p.peak_mib for p in mine], marker="o", label=form)
    for axis, label in ((speed, "prefill tokens/s (per CPU-second on CPU)"),
                        (memory, "peak memory above cache + weights (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt tokens")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.suptitle("Long-context prefill: dense reference vs chunked context")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_ratios(points: list[PrefillPoint], itl: list[ItlPoint]) -> None:
    by_key = {(p.form, p.num_tokens): p for p in points}
    for (form, num_tokens), dense in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        chunked = by_key.get(("chunked", num_tokens))
        if form == "dense" and chunked is not None:
            print(f"{num_tokens:>7} tokens: chunked/dense speed {chunked.tokens_per_s / dense.tokens_per_s:5.2f}x, "
                  f"peak memory {chunked.peak_mib:.1f} vs {dense.peak_mib:.1f} MiB")
    for point in itl:
        where = "ahead of" if point.long_prompt_ahead else "behind"
        print(f"long prompt {where} the decodes, reserve {point.decode_reserved_share:.2f}: ITL p50 "
              f"{point.itl_p50_ms:.0f} ms, p99 {point.itl_p99_ms:.0f} ms, max {point.itl_max_ms:.0f} ms "
              f"({point.num_gaps} gaps, prefill {point.prefill_s:.1f} s)")
    for ahead in (False, True):
        pair = {p.decode_reserved_share: p for p in itl if p.long_prompt_ahead == ahead}
        if len(pair) == 2:
            without, with_ = pair[0.0], next(p for s, p in pair.items() if s > 0)
            print(f"ITL p99 without/with the reserve ({'ahead' if ahead else 'behind'}): "
                  f"{without.itl_p99_ms / with_.itl_p99_ms:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=tiny_checkpoint_dir())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-len", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=65536)
    parser.add_argument("--dense-max-len", type=int, default=16384, help="longest prompt the dense form runs")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--prefill-context-chunk", type=int, default=DEFAULT_PREFILL_CONTEXT_CHUNK)
    parser.add_argument("--itl-prompt-len", type=int, default=32768)
    parser.add_argument("--itl-num-decodes", type=int, default=8)
    parser.add_argument("--itl-decode-prompt-len", type=int, default=32)
    parser.add_argument("--itl-max-tokens", type=int, default=256)
    parser.add_argument("--itl-reserved-share", type=float, default=0.25)
    parser.add_argument("--skip-itl", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true", help="the ITL part alone (long_context_itl.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (CPU time is then wall time "
                        "on an idle machine)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    points = [] if args.skip_prefill else prefill_curves(args)
    itl = [] if args.skip_itl else [itl_beside_long_prefill(args, ahead, share)
                                    for ahead in (False, True) for share in (0.0, args.itl_reserved_share)]
    print_ratios(points, itl)
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / ("long_context_itl.json" if args.skip_prefill else "long_context_bench.json")
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "prefill": [asdict(p) for p in points], "itl": [asdict(p) for p in itl]}, indent=2))
    print(f"wrote {out}")
    if points:
        plot(points, OUT_DIR / "long_context_prefill.png")
        print(f"wrote {OUT_DIR / 'long_context_prefill.png'}")


if __name__ == "__main__":
    main()
