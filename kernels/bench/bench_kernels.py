"""Kernel microbenchmarks on Kimi K2's real shapes: `python -m k2ray.kernels.bench.bench_kernels [--out f.json]`.

For every kernel: time (median, L2 flushed), achieved GB/s and its fraction of the device's peak HBM bandwidth,
TFLOP/s, and the speed ratio against a torch baseline measured in the same run (bf16 matmul / bf16 per-expert
loop / the *_ref implementation). Needs a CUDA GPU; without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from k2ray.kernels import (
    fused_moe_int4,
    fused_moe_int4_kernel,
    fused_moe_int4_ref,
    mla_decode_attention,
    mla_decode_attention_kernel,
    mla_decode_attention_ref,
    store_latent_kv,
    store_latent_kv_ref,
    w4a16_gemm,
    w4a16_gemm_kernel,
    w4a16_gemm_ref,
)

# Peak HBM bandwidth (TB/s) by device-name substring, most specific first (vendor datasheets).
PEAK_HBM_TBPS = (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("H800", 3.35))
HIDDEN, MOE_INTER, TOP_K, NUM_EXPERTS, ROUTED_SCALING = 7168, 2048, 8, 384, 2.827
KV_LORA, ROPE, HEADS, PAGE = 512, 64, 64, 64
GEMM_MS = (1, 8, 32, 128, 512)
MOE_TOKENS = (1, 8, 32, 64, 128)
MLA_BATCHES = (1, 8, 32, 64)
MLA_CONTEXTS = (4096, 16384, 65536)
STORE_TOKENS = (1, 64, 4096)
# The MLA reference materialises the gathered cache in fp32; skip it beyond this many cached tokens.
MLA_REF_MAX_TOKENS = 1 << 21
INT4_BYTES_PER_WEIGHT = 0.5 + 2 / 32  # nibble + one bf16 scale per 32 weights
BF16 = 2


@dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    ms: float
    gbps: float
    frac_peak: float
    tflops: float
    baseline: str
    baseline_ms: float | None
    speedup: float | None
    config: str = ""  # the autotuner's pick for the last launch (JSON only)


@dataclass(frozen=True)
class BenchSettings:
    peak_tbps: float
    num_experts: int
    warmup_ms: int = 25
    rep_ms: int = 100


def time_ms(fn: Callable[[], object], s: BenchSettings) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=s.warmup_ms, rep=s.rep_ms, return_mode="median"))


def make_row(kernel, shape, ms, nbytes, flops, baseline, baseline_ms, s: BenchSettings, tuned=None) -> Row:
    gbps = nbytes / ms / 1e6
    return Row(
        kernel, shape, round(ms, 4), round(gbps, 1), round(gbps / (s.peak_tbps * 1e3), 3),
        round(flops / ms / 1e9, 2), baseline, None if baseline_ms is None else round(baseline_ms, 4),
        None if baseline_ms is None else round(baseline_ms / ms, 2), str(getattr(tuned, "best_config", "")),
    )  # fmt: skip


def random_int4(rows: int, cols: int, *lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random nibbles and small bf16 scales: same bytes and code path as real weights."""
    packed = torch.randint(-(2**31), 2**31 - 1, (*lead, rows, cols // 8), dtype=torch.int32, device="cuda")
    scale = (torch.rand(*lead, rows, cols // 32, device="cuda") * 1e-2).to(torch.bfloat16)
    return packed, scale


def bench_w4a16(s: BenchSettings) -> list[Row]:
    rows = []
    for name, n, k in (("gate_up_proj", MOE_INTER, HIDDEN), ("down_proj", HIDDEN, MOE_INTER)):
        packed, scale = random_int4(n, k)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in GEMM_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ms = time_ms(partial(w4a16_gemm, x, packed, scale), s)
            bf16_ms = time_ms(partial(torch.matmul, x, dense.t()), s)
            ref_ms = time_ms(partial(w4a16_gemm_ref, x, packed, scale), s)
            nbytes = n * k * INT4_BYTES_PER_WEIGHT + (m * k + m * n) * BF16
            shape = f"{name} M={m} N={n} K={k}"
            rows.append(
                make_row(
                    "w4a16_gemm",
                    shape,
                    ms,
                    nbytes,
                    2 * m * n * k,
                    "torch bf16 matmul",
                    bf16_ms,
                    s,
                    w4a16_gemm_kernel,
                )
            )
            rows.append(make_row("w4a16_gemm", shape, ms, nbytes, 2 * m * n * k, "w4a16_gemm_ref", ref_ms, s))
    return rows


def bf16_expert_loop(x, ids, weights, w13, w2) -> torch.Tensor:
    """The dense per-expert loop a bf16 checkpoint would run (same as the model's unpacked path)."""
    out = torch.zeros_like(x, dtype=torch.float32)
    inter = w13.shape[1] // 2
    for e in torch.unique(ids).tolist():
        token_idx, slot_idx = torch.where(ids == e)
        gate_up = F.linear(x[token_idx], w13[e])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out.index_add_(0, token_idx, (F.linear(h, w2[e]) * weights[token_idx, slot_idx, None]).float())
    return out.to(x.dtype)


def bench_moe(s: BenchSettings) -> list[Row]:
    e = s.num_experts
    w13_packed, w13_scale = random_int4(2 * MOE_INTER, HIDDEN, e)
    w2_packed, w2_scale = random_int4(HIDDEN, MOE_INTER, e)
    w13 = torch.randn(e, 2 * MOE_INTER, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(e, HIDDEN, MOE_INTER, device="cuda", dtype=torch.bfloat16)
    experts = (w13_packed, w13_scale, w2_packed, w2_scale)
    rows = []
    for t in MOE_TOKENS:
        x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
        weights, ids = torch.rand(t, e, device="cuda").topk(TOP_K, dim=-1)
        ms = time_ms(partial(fused_moe_int4, x, ids, weights, *experts, ROUTED_SCALING), s)
        loop_ms = time_ms(partial(bf16_expert_loop, x, ids, weights, w13, w2), s)
        ref_ms = time_ms(partial(fused_moe_int4_ref, x, ids, weights, *experts, ROUTED_SCALING), s)
        touched = torch.unique(ids).numel()
        nbytes = touched * 3 * MOE_INTER * HIDDEN * INT4_BYTES_PER_WEIGHT + 2 * t * HIDDEN * BF16
        flops = 2 * t * TOP_K * 3 * MOE_INTER * HIDDEN
        shape = f"T={t} top{TOP_K}/{e} experts touched={touched}"
        rows.append(
            make_row(
                "fused_moe_int4",
                shape,
                ms,
                nbytes,
                flops,
                "bf16 per-expert loop",
                loop_ms,
                s,
                fused_moe_int4_kernel,
            )
        )
        rows.append(make_row("fused_moe_int4", shape, ms, nbytes, flops, "fused_moe_int4_ref", ref_ms, s))
    return rows


def bench_mla(s: BenchSettings) -> list[Row]:
    rows = []
    scale = (128 + ROPE) ** -0.5
    for batch in MLA_BATCHES:
        for ctx in MLA_CONTEXTS:
            pages = ctx // PAGE
            cache = torch.randn(batch * pages, PAGE, KV_LORA + ROPE, device="cuda", dtype=torch.bfloat16)
            tables = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
            seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(batch, HEADS, KV_LORA + ROPE, device="cuda", dtype=torch.bfloat16)
            args = (q[..., :KV_LORA], q[..., KV_LORA:], cache, tables, seq_lens, scale)
            ms = time_ms(partial(mla_decode_attention, *args, max_seq_len=ctx), s)
            with_ref = batch * ctx <= MLA_REF_MAX_TOKENS
            ref_ms = time_ms(partial(mla_decode_attention_ref, *args), s) if with_ref else None
            nbytes = batch * ctx * (KV_LORA + ROPE) * BF16 + q.numel() * BF16 + batch * HEADS * KV_LORA * BF16
            flops = 2 * batch * HEADS * ctx * (KV_LORA + ROPE + KV_LORA)
            shape = f"B={batch} ctx={ctx} H={HEADS}"
            row = make_row(
                "mla_decode_attention", shape, ms, nbytes, flops, "mla_decode_attention_ref", ref_ms, s
            )
            rows.append(replace(row, config=str(getattr(mla_decode_attention_kernel, "best_config", ""))))
            del cache
    return rows


def bench_store(s: BenchSettings) -> list[Row]:
    rows = []
    cache = torch.zeros(8192, PAGE, KV_LORA + ROPE, device="cuda", dtype=torch.bfloat16)
    for t in STORE_TOKENS:
        fused = torch.randn(t, KV_LORA + ROPE, device="cuda", dtype=torch.bfloat16)
        c_kv, k_pe = fused[:, :KV_LORA], fused[:, KV_LORA:]
        slots = torch.randperm(cache.shape[0] * PAGE, device="cuda")[:t]
        ms = time_ms(partial(store_latent_kv, c_kv, k_pe, cache, slots), s)
        ref_ms = time_ms(partial(store_latent_kv_ref, c_kv, k_pe, cache, slots), s)
        nbytes = 2 * t * (KV_LORA + ROPE) * BF16 + t * 8
        rows.append(make_row("store_latent_kv", f"T={t}", ms, nbytes, 0, "store_latent_kv_ref", ref_ms, s))
    return rows


def peak_tbps_for(device_name: str) -> float | None:
    return next((tbps for key, tbps in PEAK_HBM_TBPS if key in device_name), None)


def print_table(rows: list[Row]) -> None:
    header = f"{'kernel':<22}{'shape':<44}{'ms':>9}{'GB/s':>9}{'%peak':>7}{'TFLOP/s':>9}  {'vs baseline':<26}{'x':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = "-" if r.speedup is None else f"{r.speedup:.2f}"
        print(
            f"{r.kernel:<22}{r.shape:<44}{r.ms:>9.4f}{r.gbps:>9.1f}{100 * r.frac_peak:>6.1f}%{r.tflops:>9.2f}  "
            f"{r.baseline:<26}{speedup:>7}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_kernels.json", help="where to write the JSON results")
    parser.add_argument("--peak-tbps", type=float, help="peak HBM TB/s (default: from the device name)")
    parser.add_argument(
        "--num-experts", type=int, default=NUM_EXPERTS, help="experts per MoE layer on this GPU"
    )
    parser.add_argument("--only", choices=("w4a16", "moe", "mla", "store"), action="append")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU; none found, nothing to measure.")
        return 0
    name = torch.cuda.get_device_name()
    peak = args.peak_tbps or peak_tbps_for(name)
    if peak is None:
        parser.error(f"no peak bandwidth known for {name!r}; pass --peak-tbps")
    settings = BenchSettings(peak_tbps=peak, num_experts=args.num_experts)
    benches = {"w4a16": bench_w4a16, "moe": bench_moe, "mla": bench_mla, "store": bench_store}
    rows: list[Row] = []
    for key in args.only or list(benches):
        rows += benches[key](settings)
        torch.cuda.empty_cache()
    print(f"device: {name}  peak HBM: {peak} TB/s")
    print_table(rows)
    with open(args.out, "w") as f:
        json.dump({"device": name, "peak_tbps": peak, "rows": [asdict(r) for r in rows]}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
