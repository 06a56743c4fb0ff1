"""Compile every kernel config for a GPU target without a GPU: `python -m k2ray.kernels.bench.compile_check`.

Catches what the CPU interpreter cannot: code paths taken only on CUDA (bit-trick dequant, unmasked even-K
loads), and per config the registers, spills and shared memory on the target (default sm_90, H100/H200).
`--quick` compiles one config per kernel. Exit status 1 when anything fails to compile or spills.
Must run without TRITON_INTERPRET (it needs the real JIT functions).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BF16 = tl.bfloat16
# Ints the JIT would specialise as multiples of 16 for K2's shapes (strides, N, K): lets loads vectorise.
DIVISIBLE_INTS = ("N", "K")
GEMM_SIG = "x_ptr:*bf16 packed_ptr:*i32 scale_ptr:*bf16 y_ptr:*fp32 M:i32 N:i32 K:i32 " + (
    "stride_xm:i32 stride_pn:i32 stride_sn:i32 stride_ym:i32"
)
MOE_SIG = (
    "a_ptr:*bf16 packed_ptr:*i32 scale_ptr:*bf16 out_ptr:*bf16 topk_weights_ptr:*fp32 sorted_ids_ptr:*i32 "
    "expert_ids_ptr:*i32 num_padded_ptr:*i32 N:i32 K:i32 num_pairs:i32 stride_am:i32 stride_pe:i32 "
    "stride_pn:i32 stride_se:i32 stride_sn:i32 stride_om:i32 routed_scaling_factor:fp32"
)
MLA_SIG = (
    "q_ptr:*bf16 q_pe_ptr:*bf16 kv_ptr:*bf16 block_tables_ptr:*i32 seq_lens_ptr:*i32 part_out_ptr:*fp32 "
    "part_lse_ptr:*fp32 scale_log2:fp32 H:i32 stride_qb:i32 stride_qh:i32 stride_peb:i32 stride_peh:i32 "
    "stride_pb:i32 stride_ph:i32 stride_slot:i32 stride_bt:i32"
)
REDUCE_SIG = "part_out_ptr:*fp32 part_lse_ptr:*fp32 out_ptr:*bf16 H:i32 stride_pb:i32 stride_ph:i32 stride_ob:i32 stride_oh:i32"
STORE_SIG = "c_kv_ptr:*bf16 k_pe_ptr:*bf16 kv_ptr:*bf16 slot_mapping_ptr:*i64 stride_c:i32 stride_pe:i32 stride_slot:i32"


@dataclass(frozen=True)
class Job:
    label: str
    fn: object  # the JITFunction
    signature: str
    constexprs: dict
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Result:
    label: str
    error: str | None
    shared_bytes: int = 0
    registers: int | None = None
    spill_bytes: int | None = None


def _jit_fn(kernel: object) -> object:
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # unwrap Autotuner / Heuristics
    return kernel


def _pick(configs: list, quick: bool) -> list:
    """All configs, or with --quick the first tensor-core one and the first GEMV one."""
    if not quick:
        return configs
    return [c for use_dot in (True, False) for c in configs if c.kwargs["USE_DOT"] == use_dot][:1] + [
        c for c in configs if not c.kwargs["USE_DOT"]
    ][:1]


def _gemm_jobs(quick: bool) -> list[Job]:
    mod = importlib.import_module("k2ray.kernels.w4a16_gemm")
    fn = _jit_fn(mod.w4a16_gemm_kernel)
    base = {"GROUP_SIZE": 32, "X_DTYPE": BF16, "DOT_DTYPE": BF16, "FAST_DEQUANT": True, "EVEN_K": True}
    base["STREAM_WEIGHTS"] = True
    jobs = []
    for configs, block_m in ((mod.W4A16_DECODE_CONFIGS, 16), (mod.W4A16_PREFILL_CONFIGS, 128)):
        for c in _pick(configs, quick):
            meta = {**base, "BLOCK_M": block_m, "GEMV": not c.kwargs["USE_DOT"], **c.kwargs}
            label = f"w4a16_gemm BM={block_m} {c.kwargs}"
            jobs.append(Job(label, fn, GEMM_SIG, meta, c.num_warps, c.num_stages))
    # The other activation dtypes and a ragged K take different branches of the same kernel.
    c = mod.W4A16_DECODE_CONFIGS[0]
    for dtype, name, fast, even_k in ((tl.float16, "fp16", True, False), (tl.float32, "fp32", False, True)):
        meta = {**base, "X_DTYPE": dtype, "DOT_DTYPE": dtype, "FAST_DEQUANT": fast, "EVEN_K": even_k}
        meta.update(BLOCK_M=16, GEMV=False, **c.kwargs)
        signature = GEMM_SIG.replace("x_ptr:*bf16", f"x_ptr:*{name}")
        label = f"w4a16_gemm x={name} even_k={even_k}"
        jobs.append(Job(label, fn, signature, meta, c.num_warps, c.num_stages))
    return jobs


def _moe_jobs(quick: bool) -> list[Job]:
    mod = importlib.import_module("k2ray.kernels.fused_moe_int4")
    fn = _jit_fn(mod.fused_moe_int4_kernel)
    base = {"GROUP_SIZE": 32, "X_DTYPE": BF16, "DOT_DTYPE": BF16, "FAST_DEQUANT": True, "EVEN_K": True}
    base["STREAM_WEIGHTS"] = True
    jobs = []
    for c in _pick(mod.FUSED_MOE_INT4_CONFIGS, quick):
        shapes = ((16, 1), (64, 16)) if c.kwargs["USE_DOT"] else ((16, 1),)  # (BLOCK_M, ROWS_HINT)
        for gated in (True, False):
            for block_m, rows_hint in shapes:
                meta = {**base, "GATED": gated, "A_ROW_DIV": 8 if gated else 1, "BLOCK_M": block_m}
                meta.update(ROWS_HINT=rows_hint, **c.kwargs)
                label = f"fused_moe_int4 gated={gated} BM={block_m} {c.kwargs}"
                jobs.append(Job(label, fn, MOE_SIG, meta, c.num_warps, c.num_stages))
    return jobs


def _attention_jobs(quick: bool) -> list[Job]:
    mla = importlib.import_module("k2ray.kernels.mla_decode")
    store = importlib.import_module("k2ray.kernels.kv_store")
    shape = {"KV_LORA": 512, "ROPE": 64, "BLOCK_L": 512, "BLOCK_R": 64}
    base = {**shape, "PAGE_SIZE": 64, "NUM_SPLITS": 4, "X_DTYPE": BF16, "DOT_DTYPE": BF16}
    fn = _jit_fn(mla.mla_decode_attention_kernel)
    jobs = [
        Job(f"mla_decode_attention {c.kwargs}", fn, MLA_SIG, {**base, **c.kwargs}, c.num_warps, c.num_stages)
        for c in (mla.MLA_DECODE_CONFIGS[:1] if quick else mla.MLA_DECODE_CONFIGS)
    ]
    reduce_meta = {"KV_LORA": 512, "BLOCK_L": 512, "NUM_SPLITS": 4, "BLOCK_S": 4}
    jobs.append(Job("mla_decode_reduce", mla.mla_decode_reduce_kernel, REDUCE_SIG, reduce_meta, 4, 1))
    jobs.append(Job("store_latent_kv", store.store_latent_kv_kernel, STORE_SIG, shape, 4, 1))
    return jobs


def _ptxas_stats(ptx: str, arch: int) -> tuple[int | None, int | None]:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((p for p in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bin_dir, p))), None)
    if ptxas is None:
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    suffix = "a" if arch >= 90 else ""
    cmd = [os.path.join(bin_dir, ptxas), f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull]
    out = subprocess.run(cmd, capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)


def compile_job(job: Job, arch: int) -> Result:
    signature = dict(item.split(":") for item in job.signature.split())
    attrs = {
        (job.fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, ty in signature.items()
        if ty.startswith("*") or name.startswith("stride") or name in DIVISIBLE_INTS
    }
    signature.update(dict.fromkeys(job.constexprs, "constexpr"))
    source = ASTSource(job.fn, signature, job.constexprs, attrs)
    options = {"num_warps": job.num_warps, "num_stages": job.num_stages}
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # report every failing config, not just the first
        return Result(job.label, f"{type(e).__name__}: {str(e)[-2000:]}")
    regs, spills = _ptxas_stats(compiled.asm["ptx"], arch)
    return Result(job.label, None, compiled.metadata.shared, regs, spills)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--quick", action="store_true", help="one config per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check needs the real JIT: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    jobs = _gemm_jobs(args.quick) + _moe_jobs(args.quick) + _attention_jobs(args.quick)
    bad = 0
    for job in jobs:
        r = compile_job(job, args.arch)
        spilled = bool(r.spill_bytes)
        bad += r.error is not None or spilled
        status = "FAIL" if r.error else ("SPILL" if spilled else "ok")
        print(f"{status:5} {r.label:75} smem={r.shared_bytes:7} regs={r.registers} spill={r.spill_bytes}")
        if r.error:
            print(r.error)
    print(f"{len(jobs) - bad}/{len(jobs)} configs compiled cleanly for sm_{args.arch}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
