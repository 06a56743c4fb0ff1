"""W4A16 GEMM: y = x @ dequant(W).T over the checkpoint's own pack-quantized INT4 layout.

The kernel reads int32 words [N, K / 8] and bf16 scales [N, K / group] straight from the checkpoint tensors,
unpacks eight nibbles per word in registers, and accumulates in fp32. Small M (decode) is memory-bound, so
the launcher splits K across programs to keep every SM streaming weights.
"""

from __future__ import annotations

import torch

from ._triton import compute_dtype, fast_dequant, launch, require_triton, tl, tl_dtype, triton
from .int4_layout import K2_GROUP_SIZE, NUM_BITS, PACK_FACTOR, dequantize_int4
from .int4_tile import dequant_int4_tile, int4_gemv_tile

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# M buckets -> BLOCK_M: tl.dot needs >= 16 rows; bigger tiles only pay off once M fills them.
BLOCK_M_BUCKETS = (16, 32, 64, 128)


def _config(bn: int, bk: int, split_k: int, warps: int, stages: int, use_dot: bool = True):
    meta = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": 8, "USE_DOT": use_dot}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Decode-sized M (BLOCK_M <= 32) is bandwidth-bound: narrow N tiles, long K tiles, split-K so every SM streams
# weights. Prefill-sized M is compute-bound: wide tiles, 8 warps, no split. (Each list was compiled for sm_90
# without register spills.)
W4A16_DECODE_CONFIGS = [
    _config(32, 256, 4, 4, 4),
    _config(64, 256, 4, 4, 4),
    _config(64, 128, 8, 4, 4),
    _config(64, 256, 2, 4, 3),
    _config(128, 128, 2, 4, 3),
    _config(64, 128, 1, 4, 4),
    _config(128, 128, 1, 4, 3),
    _config(128, 64, 1, 4, 4),
    # GEMV (no tensor cores), offered only for M == 1; the tuner decides which family wins.
    _config(64, 128, 4, 4, 4, use_dot=False),
    _config(32, 256, 4, 4, 4, use_dot=False),
    _config(64, 128, 8, 4, 4, use_dot=False),
    _config(128, 64, 2, 4, 4, use_dot=False),
]
W4A16_PREFILL_CONFIGS = [
    _config(64, 64, 1, 4, 4),
    _config(64, 128, 1, 4, 3),
    _config(128, 64, 1, 8, 4),
    _config(128, 128, 1, 8, 3),
    _config(256, 64, 1, 8, 3),
]
W4A16_GEMM_CONFIGS = W4A16_DECODE_CONFIGS + W4A16_PREFILL_CONFIGS
DECODE_BLOCK_M_MAX = 32

# Fixed config for the CPU interpreter (and for callers that pin one): exercises split-K and K tails.
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 8, "USE_DOT": True}


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    args = {**named_args, **kwargs}
    group_size, k = args["GROUP_SIZE"], args["K"]
    family = W4A16_DECODE_CONFIGS if args["BLOCK_M"] <= DECODE_BLOCK_M_MAX else W4A16_PREFILL_CONFIGS
    keep = [
        c
        for c in configs
        if c in family
        and c.kwargs["BLOCK_K"] % group_size == 0
        and c.kwargs["BLOCK_K"] <= max(k, group_size)
        and (c.kwargs["USE_DOT"] or args["GEMV"])
    ]
    return keep or [c for c in family if c.kwargs["BLOCK_K"] % group_size == 0][-1:] or configs[-1:]


@triton.autotune(
    configs=W4A16_GEMM_CONFIGS,
    key=["N", "K", "BLOCK_M", "GEMV"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["y_ptr"],
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def w4a16_gemm_kernel(
    x_ptr, packed_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn, stride_ym,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, X_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    FAST_DEQUANT: tl.constexpr, STREAM_WEIGHTS: tl.constexpr, GEMV: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """USE_DOT: tensor-core tile GEMM. Otherwise (only offered when GEMV, i.e. M == 1) int4_gemv_tile."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: consecutive programs share weight tiles in L2 when M spans several tiles.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_end = tl.minimum((pid_k + 1) * tiles_per_split, k_tiles)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(pid_k * tiles_per_split, kt_end):
            k0 = kt * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & (offs_k[None, :] < K)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=a_mask, other=0.0)
            w = dequant_int4_tile(
                packed_ptr, scale_ptr, offs_n, n_mask, k0, K, stride_pn, stride_sn,
                GROUP_SIZE, BLOCK_N, BLOCK_K, X_DTYPE, FAST_DEQUANT, EVEN_K, STREAM_WEIGHTS,
            )  # fmt: skip
            # Round the dequantized weight to the activation dtype (what the tensor cores consume).
            acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(X_DTYPE).to(DOT_DTYPE)), acc)
    else:
        groups = tl.zeros((BLOCK_N, BLOCK_K // GROUP_SIZE), dtype=tl.float32)
        for kt in range(pid_k * tiles_per_split, kt_end):
            groups += int4_gemv_tile(
                packed_ptr, scale_ptr, x_ptr, offs_n, n_mask, kt * BLOCK_K, K, stride_pn, stride_sn,
                GROUP_SIZE, BLOCK_N, BLOCK_K, EVEN_K, STREAM_WEIGHTS,
            )  # fmt: skip
        acc = tl.sum(groups, axis=1)[None, :]  # the single row
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


def block_m_for(m: int) -> int:
    return next((b for b in BLOCK_M_BUCKETS if m <= b), BLOCK_M_BUCKETS[-1])


def _check_gemm_args(x, weight_packed, weight_scale, group_size) -> None:
    assert x.dtype in ACTIVATION_DTYPES, f"activations must be bf16/fp16/fp32, got {x.dtype}"
    assert weight_packed.dtype == torch.int32, f"weight_packed must be int32, got {weight_packed.dtype}"
    assert weight_scale.dtype in ACTIVATION_DTYPES, f"unsupported scale dtype {weight_scale.dtype}"
    assert x.dim() == 2 and weight_packed.dim() == 2 and weight_scale.dim() == 2, "want 2-D x, packed, scale"
    assert x.stride(-1) == 1, "x rows must be contiguous"
    assert weight_packed.is_contiguous() and weight_scale.is_contiguous(), "weights must be contiguous"
    n, k = weight_packed.shape[0], x.shape[1]
    assert group_size % PACK_FACTOR == 0 and k % group_size == 0, (
        f"K={k} must divide by group_size={group_size}"
    )
    assert weight_packed.shape == (n, k * NUM_BITS // 32), f"packed {tuple(weight_packed.shape)} != [N, K/8]"
    assert weight_scale.shape == (n, k // group_size), f"scale {tuple(weight_scale.shape)} != [N, K/group]"
    assert x.device == weight_packed.device == weight_scale.device, "tensors on different devices"


def w4a16_gemm(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int = K2_GROUP_SIZE,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """x [M, K] bf16/fp16/fp32, weight_packed int32 [N, K / 8], weight_scale [N, K / group_size] -> [M, N].

    `config` pins the tile meta-parameters (BLOCK_N, BLOCK_K, SPLIT_K, GROUP_M, USE_DOT [, num_warps, ...])
    instead of autotuning; on CPU (TRITON_INTERPRET=1) INTERPRETER_CONFIG is used by default.
    """
    require_triton()
    _check_gemm_args(x, weight_packed, weight_scale, group_size)
    if config is None and x.device.type != "cuda":
        config = INTERPRETER_CONFIG
    (m, k), n = x.shape, weight_packed.shape[0]
    assert config is None or config.get("USE_DOT", True) or m == 1, (
        "the GEMV config (USE_DOT=False) needs M == 1"
    )
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    if m == 0:
        return y.to(x.dtype)
    block_m = block_m_for(m)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, block_m) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (x, weight_packed, weight_scale, y, m, n, k, x.stride(0), weight_packed.stride(0), weight_scale.stride(0))  # fmt: skip
    launch(
        w4a16_gemm_kernel, grid, (*args, y.stride(0)), config,
        GROUP_SIZE=group_size, BLOCK_M=block_m, X_DTYPE=tl_dtype(x.dtype),
        DOT_DTYPE=compute_dtype(x.dtype, x.device), FAST_DEQUANT=fast_dequant(x.dtype, x.device),
        STREAM_WEIGHTS=m <= block_m, GEMV=m == 1,
    )  # fmt: skip
    return y.to(x.dtype)


def w4a16_gemm_ref(
    x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int = K2_GROUP_SIZE
) -> torch.Tensor:
    """x [M, K], weight_packed int32 [N, K / 8], weight_scale [N, K / group_size] -> [M, N] in x.dtype."""
    w = dequantize_int4(weight_packed, weight_scale, group_size, dtype=torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
