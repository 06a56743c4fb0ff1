"""Fused INT4 MoE: route tokens to experts, gate/up GEMM, SiLU * mul, down GEMM, weighted combine.

Expert weights are stacked per expert in the checkpoint's pack-quantized layout:
    w13_packed [E, 2I, D / 8], w13_scale [E, 2I, D / group]   rows [0, I) gate_proj, [I, 2I) up_proj
    w2_packed  [E, D, I / 8],  w2_scale  [E, D, I / group]    down_proj

The Triton path sorts the (token, slot) pairs by expert and pads every expert's run to BLOCK_M
(`moe_align_block_size`), so each program multiplies one expert's weight tile with up to BLOCK_M gathered rows.
The gate/up program computes matching gate and up columns and writes SiLU(gate) * up directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import compute_dtype, fast_dequant, launch, require_triton, tl, tl_dtype, triton
from .int4_layout import K2_GROUP_SIZE, PACK_FACTOR, dequantize_int4
from .int4_tile import dequant_int4_tile, int4_gemv_tile
from .w4a16_gemm import ACTIVATION_DTYPES

# Pairs (token, slot) per expert decide BLOCK_M: decode sees a handful per expert, prefill hundreds.
MOE_BLOCK_M_BUCKETS = (16, 32, 64)
# Bounds the two intermediate caches ([chunk * top_k, I] and [chunk * top_k, D]) for long prefills.
MOE_CHUNK_TOKENS = 8192


def _config(bn: int, bk: int, warps: int, stages: int, use_dot: bool = True):
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": use_dot}, num_warps=warps, num_stages=stages
    )


# The gated pass holds two accumulators and two weight tiles, so wide tiles get 8 warps (no spills on sm_90).
FUSED_MOE_INT4_CONFIGS = [
    _config(32, 128, 4, 4),
    _config(64, 128, 4, 4),
    _config(64, 64, 4, 4),
    _config(64, 256, 8, 3),
    _config(128, 128, 8, 3),
    _config(128, 64, 8, 4),
    # GEMV per pair instead of tensor cores, offered while experts see one pair on average (decode).
    _config(32, 128, 4, 4, use_dot=False),
    _config(64, 128, 4, 4, use_dot=False),
    _config(32, 256, 4, 3, use_dot=False),
]

INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "USE_DOT": True}


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    args = {**named_args, **kwargs}
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_K"] % args["GROUP_SIZE"] == 0
        and c.kwargs["BLOCK_K"] <= args["K"]
        and (c.kwargs["USE_DOT"] or args["ROWS_HINT"] == 1)
    ]
    return keep or [c for c in configs if c.kwargs["USE_DOT"]][-1:]


def moe_block_m_for(per_expert: int) -> int:
    return next((b for b in MOE_BLOCK_M_BUCKETS if per_expert <= b), MOE_BLOCK_M_BUCKETS[-1])


def moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, A] -> (sorted_ids int32 [P], expert_ids int32 [P / block_size], num_padded int32 [1]).

    sorted_ids lists flattened pair indices t * A + a grouped by expert (stable), each expert's run padded to a
    multiple of block_size with the out-of-range index T * A; expert_ids[b] owns block b. P is the static upper
    bound T*A + min(T*A, E) * (block_size - 1); entries past num_padded are padding. No host sync.
    """
    flat = topk_ids.flatten().to(torch.int64)
    numel, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = padded.cumsum(0)
    count_start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(numel, device=device) - count_start[sorted_experts]
    max_padded = numel + min(numel, num_experts) * (block_size - 1)
    max_padded = -(-max_padded // block_size) * block_size
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=device)
    sorted_ids[(padded_end - padded)[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_size, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), padded_end[-1:].to(torch.int32)


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[list[int], list[int]]:
    """(sorted pair ids up to num_padded, expert id per block) by a plain loop over experts."""
    flat = topk_ids.flatten().tolist()
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for e in range(num_experts):
        pairs = [i for i, x in enumerate(flat) if x == e]
        num_blocks = -(-len(pairs) // block_size)
        sorted_ids += pairs + [len(flat)] * (num_blocks * block_size - len(pairs))
        expert_ids += [e] * num_blocks
    return sorted_ids, expert_ids


@triton.autotune(
    configs=FUSED_MOE_INT4_CONFIGS,
    key=["N", "K", "BLOCK_M", "GATED", "ROWS_HINT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def fused_moe_int4_kernel(
    a_ptr, packed_ptr, scale_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, num_pairs, stride_am, stride_pe, stride_pn, stride_se, stride_sn, stride_om, routed_scaling_factor,
    GROUP_SIZE: tl.constexpr, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
    X_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, FAST_DEQUANT: tl.constexpr, STREAM_WEIGHTS: tl.constexpr,
    ROWS_HINT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """GATED: out[pair, n] = silu(a W_gate^T) * (a W_up^T), weights rows n and N + n.
    Not GATED: out[pair, n] = routed_scaling_factor * topk_weight[pair] * (a W^T)[n].
    ROWS_HINT (mean pairs per expert, next power of two) keys the tuner, which picks the tensor-core tile
    (USE_DOT) or, at ROWS_HINT 1, a GEMV per real pair of the block (int4_gemv_tile)."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_mask = pairs < num_pairs
    a_rows = pairs // A_ROW_DIV
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    w_ptr = packed_ptr + expert * stride_pe
    s_ptr = scale_ptr + expert * stride_se
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a_mask = pair_mask[:, None] if EVEN_K else pair_mask[:, None] & (offs_k[None, :] < K)
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=a_mask, other=0.0)
            a = a.to(DOT_DTYPE)
            w = dequant_int4_tile(
                w_ptr, s_ptr, offs_n, n_mask, k0, K, stride_pn, stride_sn, GROUP_SIZE, BLOCK_N, BLOCK_K, X_DTYPE,
                FAST_DEQUANT, EVEN_K, STREAM_WEIGHTS,
            )  # fmt: skip
            acc = tl.dot(a, tl.trans(w.to(X_DTYPE).to(DOT_DTYPE)), acc)
            if GATED:
                w_up = dequant_int4_tile(
                    w_ptr, s_ptr, offs_n + N, n_mask, k0, K, stride_pn, stride_sn, GROUP_SIZE, BLOCK_N, BLOCK_K,
                    X_DTYPE, FAST_DEQUANT, EVEN_K, STREAM_WEIGHTS,
                )  # fmt: skip
                acc_up = tl.dot(a, tl.trans(w_up.to(X_DTYPE).to(DOT_DTYPE)), acc_up)
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            weight = tl.load(topk_weights_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
            acc = acc * (weight * routed_scaling_factor)[:, None]
        out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(X_DTYPE), mask=pair_mask[:, None] & n_mask[None, :])
    else:
        # Padding pairs sit at the end of each expert's run, so the real ones are a prefix of the block.
        for row in range(0, tl.sum(pair_mask.to(tl.int32), axis=0)):
            pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + row)
            x_row = a_ptr + (pair // A_ROW_DIV) * stride_am
            groups = tl.zeros((BLOCK_N, BLOCK_K // GROUP_SIZE), dtype=tl.float32)
            groups_up = tl.zeros((BLOCK_N, BLOCK_K // GROUP_SIZE), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                groups += int4_gemv_tile(
                    w_ptr, s_ptr, x_row, offs_n, n_mask, k0, K, stride_pn, stride_sn,
                    GROUP_SIZE, BLOCK_N, BLOCK_K, EVEN_K, STREAM_WEIGHTS,
                )  # fmt: skip
                if GATED:
                    groups_up += int4_gemv_tile(
                        w_ptr, s_ptr, x_row, offs_n + N, n_mask, k0, K, stride_pn, stride_sn,
                        GROUP_SIZE, BLOCK_N, BLOCK_K, EVEN_K, STREAM_WEIGHTS,
                    )  # fmt: skip
            y = tl.sum(groups, axis=1)
            if GATED:
                y = y * tl.sigmoid(y) * tl.sum(groups_up, axis=1)
            else:
                y = y * (tl.load(topk_weights_ptr + pair).to(tl.float32) * routed_scaling_factor)
            tl.store(out_ptr + pair.to(tl.int64) * stride_om + offs_n, y.to(X_DTYPE), mask=n_mask)


def _check_moe_args(
    x, topk_ids, topk_weights, w13_packed, w13_scale, w2_packed, w2_scale, group_size
) -> None:
    assert x.dtype in ACTIVATION_DTYPES and x.dim() == 2 and x.stride(1) == 1, (
        "x must be [T, D], rows contiguous"
    )
    assert w13_packed.dtype == torch.int32 and w2_packed.dtype == torch.int32, "packed weights must be int32"
    for t in (w13_packed, w13_scale, w2_packed, w2_scale):
        assert t.dim() == 3 and t.is_contiguous(), "expert weights must be contiguous [E, rows, cols]"
    num_experts, two_inter, _ = w13_packed.shape
    hidden = x.shape[1]
    inter = two_inter // 2
    assert hidden % group_size == 0 and inter % group_size == 0 and group_size % PACK_FACTOR == 0
    assert w13_packed.shape == (num_experts, 2 * inter, hidden // PACK_FACTOR), "w13_packed != [E, 2I, D/8]"
    assert w13_scale.shape == (num_experts, 2 * inter, hidden // group_size), "w13_scale != [E, 2I, D/group]"
    assert w2_packed.shape == (num_experts, hidden, inter // PACK_FACTOR), "w2_packed != [E, D, I/8]"
    assert w2_scale.shape == (num_experts, hidden, inter // group_size), "w2_scale != [E, D, I/group]"
    assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0], "topk shapes != [T, A]"
    assert not topk_ids.is_floating_point(), "topk_ids must be integer"


def _moe_gemm(a, packed, scale, out, topk_weights, routing, *, gated, a_row_div, scaling, group_size, config):
    sorted_ids, expert_ids, num_padded, block_m, rows_hint = routing
    n = out.shape[1]
    k = a.shape[1]

    def grid(meta: dict) -> tuple[int]:
        return (expert_ids.numel() * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (a, packed, scale, out, topk_weights, sorted_ids, expert_ids, num_padded, n, k, out.shape[0])
    strides = (
        a.stride(0),
        packed.stride(0),
        packed.stride(1),
        scale.stride(0),
        scale.stride(1),
        out.stride(0),
    )
    launch(
        fused_moe_int4_kernel,
        grid,
        (*args, *strides, scaling),
        config,
        GROUP_SIZE=group_size,
        A_ROW_DIV=a_row_div,
        GATED=gated,
        BLOCK_M=block_m,
        X_DTYPE=tl_dtype(a.dtype),
        DOT_DTYPE=compute_dtype(a.dtype, a.device),
        FAST_DEQUANT=fast_dequant(a.dtype, a.device),
        # Smallest bucket = decode: about one block per expert, so each weight tile is read once.
        STREAM_WEIGHTS=block_m == MOE_BLOCK_M_BUCKETS[0],
        ROWS_HINT=rows_hint,
    )


def fused_moe_int4(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    routed_scaling_factor: float = 1.0,
    group_size: int = K2_GROUP_SIZE,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton twin of fused_moe_int4_ref (same arguments). `config` pins BLOCK_N / BLOCK_K for both GEMMs.

    Expert ids must lie in [0, E); route foreign experts to a local one with weight 0.
    """
    require_triton()
    _check_moe_args(x, topk_ids, topk_weights, w13_packed, w13_scale, w2_packed, w2_scale, group_size)
    if config is None and x.device.type != "cuda":
        config = INTERPRETER_CONFIG
    num_experts, two_inter, _ = w13_packed.shape
    out = x.new_empty(x.shape)
    for t0 in range(0, x.shape[0], MOE_CHUNK_TOKENS):
        chunk = slice(t0, t0 + MOE_CHUNK_TOKENS)
        ids, weights = topk_ids[chunk].contiguous(), topk_weights[chunk].to(torch.float32).contiguous()
        num_tokens, top_k = ids.shape
        per_expert = -(-ids.numel() // num_experts)  # mean pairs per expert
        block_m = moe_block_m_for(per_expert)
        rows_hint = triton.next_power_of_2(per_expert)
        routing = (*moe_align_block_size(ids, block_m, num_experts), block_m, rows_hint)
        hidden_act = torch.empty(ids.numel(), two_inter // 2, dtype=x.dtype, device=x.device)
        expert_out = torch.empty(ids.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        common = {"group_size": group_size, "config": config}
        _moe_gemm(x[chunk], w13_packed, w13_scale, hidden_act, weights, routing,
                  gated=True, a_row_div=top_k, scaling=1.0, **common)  # fmt: skip
        _moe_gemm(hidden_act, w2_packed, w2_scale, expert_out, weights, routing,
                  gated=False, a_row_div=1, scaling=routed_scaling_factor, **common)  # fmt: skip
        out[chunk] = expert_out.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)
    return out


def fused_moe_int4_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    routed_scaling_factor: float = 1.0,
    group_size: int = K2_GROUP_SIZE,
) -> torch.Tensor:
    """x [T, D], topk_ids [T, A] int, topk_weights [T, A] -> [T, D] in x.dtype.

    out[t] = routed_scaling_factor * sum_a topk_weights[t, a] * expert_{topk_ids[t, a]}(x[t])
    """
    num_tokens, hidden = x.shape
    num_experts = w13_packed.shape[0]
    inter = w13_packed.shape[1] // 2
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    counts = torch.bincount(topk_ids.flatten(), minlength=num_experts).tolist()
    for e in range(num_experts):
        if counts[e] == 0:
            continue
        token_idx, slot_idx = torch.where(topk_ids == e)
        xe = x[token_idx].to(torch.float32)
        w13 = dequantize_int4(w13_packed[e], w13_scale[e], group_size, dtype=torch.float32)
        w2 = dequantize_int4(w2_packed[e], w2_scale[e], group_size, dtype=torch.float32)
        gate_up = xe @ w13.t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        ye = (h @ w2.t()).mul_(topk_weights[token_idx, slot_idx].to(torch.float32).unsqueeze(-1))  # in place: fast
        out.index_add_(0, token_idx, ye)
    return (out * routed_scaling_factor).to(x.dtype)
