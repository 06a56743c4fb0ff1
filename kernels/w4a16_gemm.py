"""W4A16 GEMM: y = x @ dequant(W).T over the checkpoint's own pack-quantized INT4 layout.

The kernel reads int32 words [N, K / 8] and bf16 scales [N, K / group] straight from the checkpoint tensors,
unpacks eight nibbles per word in registers, and accumulates in fp32. Small M (decode) is memory-bound, so
the launcher splits K across programs to keep every SM streaming weights.
"""

from __future__ import annotations

import torch

from ._triton import compute_dtype, launch, require_triton, tl, tl_dtype, triton
from .int4_layout import K2_GROUP_SIZE, NUM_BITS, PACK_FACTOR, dequantize_int4

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# M buckets -> BLOCK_M: tl.dot needs >= 16 rows; bigger tiles only pay off once M fills them.
BLOCK_M_BUCKETS = (16, 32, 64, 128)


def _config(bn: int, bk: int, split_k: int, warps: int, stages: int):
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


# Decode-sized M is bandwidth-bound: narrow N tiles, long K tiles and split-K for parallelism.
# Prefill-sized M is compute-bound: wide square-ish tiles, no split.
W4A16_GEMM_CONFIGS = [
    _config(32, 256, 4, 4, 4),
    _config(64, 256, 4, 4, 4),
    _config(64, 128, 8, 4, 4),
    _config(64, 256, 2, 4, 3),
    _config(128, 128, 2, 4, 3),
    _config(128, 128, 1, 4, 3),
    _config(64, 128, 1, 4, 4),
    _config(128, 64, 1, 8, 4),
    _config(256, 64, 1, 8, 3),
    _config(128, 128, 1, 8, 3),
]

# Fixed config for the CPU interpreter (and for callers that pin one): exercises split-K and K tails.
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 8}


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    args = {**named_args, **kwargs}
    group_size, k, block_m = args["GROUP_SIZE"], args["K"], args["BLOCK_M"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_K"] % group_size == 0
        and c.kwargs["BLOCK_K"] <= max(k, group_size)
        # split-K only where M is small enough that the grid would otherwise be too thin
        and (c.kwargs["SPLIT_K"] == 1 or block_m <= 32)
    ]
    return keep or [configs[-1]]


@triton.jit
def dequant_int4_tile(
    packed_ptr,
    scale_ptr,
    offs_n,
    n_mask,
    k0,
    K,
    stride_pn,
    stride_sn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Weight tile W[offs_n, k0:k0+BLOCK_K] as fp32 [BLOCK_N, BLOCK_K] (zero outside N / K)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_w = k0 // 8 + tl.arange(0, WORDS)
    words = tl.load(
        packed_ptr + offs_n[:, None] * stride_pn + offs_w[None, :],
        mask=n_mask[:, None] & (offs_w[None, :] < K // 8),
        other=0,
        eviction_policy="evict_first",  # each weight byte is read once; keep L2 for activations
    )
    # Nibble i of word j is column 8j+i (LSB first): shift a broadcast [BN, WORDS, 8] and fold it to K.
    shifts = tl.arange(0, 8) * 4
    nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    q = (tl.reshape(nibbles, (BLOCK_N, BLOCK_K)) - 8).to(tl.float32)
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    offs_g = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
    scale = tl.load(
        scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
        mask=n_mask[:, None] & (offs_g[None, :] < K // GROUP_SIZE),
        other=0.0,
    ).to(tl.float32)
    w = tl.reshape(q, (BLOCK_N, GROUPS, GROUP_SIZE)) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.autotune(
    configs=W4A16_GEMM_CONFIGS,
    key=["N", "K", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["y_ptr"],
)
@triton.jit
def w4a16_gemm_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_pn,
    stride_sn,
    stride_ym,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    X_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k * tiles_per_split, kt_end):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        w = dequant_int4_tile(
            packed_ptr, scale_ptr, offs_n, n_mask, k0, K, stride_pn, stride_sn, GROUP_SIZE, BLOCK_N, BLOCK_K
        )
        # Round the dequantized weight to the activation dtype (what the tensor cores consume).
        b = tl.trans(w.to(X_DTYPE).to(DOT_DTYPE))
        acc = tl.dot(a.to(DOT_DTYPE), b, acc)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


def block_m_for(m: int) -> int:
    return next((b for b in BLOCK_M_BUCKETS if m <= b), BLOCK_M_BUCKETS[-1])


def w4a16_gemm(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int = K2_GROUP_SIZE,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """x [M, K] bf16/fp16/fp32, weight_packed int32 [N, K / 8], weight_scale [N, K / group_size] -> [M, N].

    `config` pins the tile meta-parameters (BLOCK_N, BLOCK_K, SPLIT_K, GROUP_M [, num_warps, num_stages])
    instead of autotuning; on CPU (TRITON_INTERPRET=1) INTERPRETER_CONFIG is used by default.
    """
    require_triton()
    assert x.dtype in ACTIVATION_DTYPES, f"activations must be bf16/fp16/fp32, got {x.dtype}"
    assert weight_packed.dtype == torch.int32, f"weight_packed must be int32, got {weight_packed.dtype}"
    assert weight_scale.dtype in ACTIVATION_DTYPES, f"unsupported scale dtype {weight_scale.dtype}"
    assert x.dim() == 2 and weight_packed.dim() == 2 and weight_scale.dim() == 2, "want 2-D x, packed, scale"
    assert x.stride(-1) == 1, "x rows must be contiguous"
    assert weight_packed.is_contiguous() and weight_scale.is_contiguous(), "weights must be contiguous"
    m, k = x.shape
    n = weight_packed.shape[0]
    assert group_size % PACK_FACTOR == 0 and k % group_size == 0, (
        f"K={k} must divide by group_size={group_size}"
    )
    assert weight_packed.shape == (n, k * NUM_BITS // 32), f"packed {tuple(weight_packed.shape)} != [N, K/8]"
    assert weight_scale.shape == (n, k // group_size), f"scale {tuple(weight_scale.shape)} != [N, K/group]"
    assert x.device == weight_packed.device == weight_scale.device, "tensors on different devices"
    if config is None and x.device.type != "cuda":
        config = INTERPRETER_CONFIG
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    if m == 0:
        return y.to(x.dtype)
    block_m = block_m_for(m)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, block_m) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (
        x,
        weight_packed,
        weight_scale,
        y,
        m,
        n,
        k,
        x.stride(0),
        weight_packed.stride(0),
        weight_scale.stride(0),
    )
    launch(
        w4a16_gemm_kernel,
        grid,
        (*args, y.stride(0)),
        config,
        GROUP_SIZE=group_size,
        BLOCK_M=block_m,
        X_DTYPE=tl_dtype(x.dtype),
        DOT_DTYPE=compute_dtype(x.dtype, x.device),
    )
    return y.to(x.dtype)


def w4a16_gemm_ref(
    x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int = K2_GROUP_SIZE
) -> torch.Tensor:
    """x [M, K], weight_packed int32 [N, K / 8], weight_scale [N, K / group_size] -> [M, N] in x.dtype."""
    w = dequantize_int4(weight_packed, weight_scale, group_size, dtype=torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
