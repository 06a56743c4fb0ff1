"""Paged MLA decode attention in the absorbed form over the latent cache.

Per token the cache row holds [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]. With W_UK absorbed into
the query, scores are q_latent . c_kv + q_pe . k_pe, and the output stays in latent space (the
caller applies W_UV):
    q_latent [B, H, Lkv], q_pe [B, H, R], kv_cache [num_blocks, block_size, Lkv + R]
    block_tables [B, max_num_blocks] int32, seq_lens [B] -> out [B, H, Lkv]

Triton path (flash-decoding): all heads share one latent row, so a program takes BLOCK_H heads of one sequence
and one slice of its KV length, reads each cache row once for those heads, and writes a partial output plus its
log-sum-exp; a second kernel merges the slices. Splitting the KV length keeps the GPU full at small batch.
"""

from __future__ import annotations

import math

import torch

from ._triton import compute_dtype, launch, require_triton, tl, tl_dtype, triton

MIN_DOT_DIM = 16  # tl.dot needs every tile dim >= 16
MAX_KV_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 256
# Programs per SM the split heuristic aims for, so short batches still fill the machine.
PROGRAMS_PER_SM = 2
LOG2E = math.log2(math.e)


def _config(bh: int, bn: int, warps: int, stages: int):
    return triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# All heads share one latent row, so BLOCK_H > 16 cuts re-reads of the same KV tile (via L2) by 2-4x, at the cost
# of a larger fp32 accumulator [BLOCK_H, 512]. (Each compiled for sm_90 without spills.)
MLA_DECODE_CONFIGS = [
    _config(16, 16, 4, 2),
    _config(16, 32, 4, 3),
    _config(16, 32, 8, 2),
    _config(32, 16, 8, 2),
    _config(32, 32, 8, 2),
    _config(64, 16, 8, 2),
]

INTERPRETER_CONFIG = {"BLOCK_H": 16, "BLOCK_N": 16}
DEFAULT_HEAD_BLOCK = 16  # used only to size the split count before tuning picks BLOCK_H


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    num_heads = {**named_args, **kwargs}["H"]
    limit = max(MIN_DOT_DIM, triton.next_power_of_2(num_heads))
    return [c for c in configs if c.kwargs["BLOCK_H"] <= limit] or configs[:1]


@triton.autotune(
    configs=MLA_DECODE_CONFIGS,
    key=["H", "KV_LORA", "ROPE", "PAGE_SIZE", "NUM_SPLITS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def mla_decode_attention_kernel(
    q_ptr, q_pe_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr, scale_log2, H,
    stride_qb, stride_qh, stride_peb, stride_peh, stride_pb, stride_ph, stride_slot, stride_bt,
    KV_LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, X_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Stage 1: normalised partial output [B, H, S, Lkv] and base-2 log-sum-exp [B, H, S] per KV slice."""
    b = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # Slices are whole BLOCK_N tiles so only the last tile of a sequence is ragged.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    h_mask = offs_h < H
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    l_mask = offs_l < KV_LORA
    r_mask = offs_r < ROPE
    q_rows = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh
    q = tl.load(q_rows + offs_l[None, :], mask=h_mask[:, None] & l_mask[None, :], other=0.0)
    pe_rows = q_pe_ptr + b * stride_peb + offs_h[:, None] * stride_peh
    q_pe = tl.load(pe_rows + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    q = q.to(DOT_DTYPE)
    q_pe = q_pe.to(DOT_DTYPE)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(block_tables_ptr + b * stride_bt + offs_n // PAGE_SIZE, mask=n_mask, other=0)
        rows = kv_ptr + (page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE) * stride_slot
        # Rows as [BLOCK_N, Lkv] (contiguous along Lkv); the score dot reads them transposed.
        c_kv = tl.load(rows[:, None] + offs_l[None, :], mask=n_mask[:, None] & l_mask[None, :], other=0.0)
        k_pe = tl.load(
            rows[:, None] + KV_LORA + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0
        )
        c_kv = c_kv.to(DOT_DTYPE)
        scores = tl.dot(q, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe.to(DOT_DTYPE)))  # [BLOCK_H, BLOCK_N]
        scores = tl.where(n_mask[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(X_DTYPE).to(DOT_DTYPE), c_kv)
        m_i = m_new

    nonempty = l_i > 0.0
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    part_rows = b * stride_pb + offs_h * stride_ph + split * BLOCK_L
    tl.store(part_out_ptr + part_rows[:, None] + offs_l[None, :], out, mask=h_mask[:, None])
    tl.store(part_lse_ptr + b * H * NUM_SPLITS + offs_h * NUM_SPLITS + split, lse, mask=h_mask)


@triton.jit
def mla_decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, H, stride_pb, stride_ph, stride_ob, stride_oh,
    KV_LORA: tl.constexpr, BLOCK_L: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Stage 2: out[b, h] = sum_s softmax_s(lse) * part_out[b, h, s]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_l = tl.arange(0, BLOCK_L)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + (b * H + h) * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))
    weights = weights / tl.sum(weights, axis=0)
    part = tl.load(
        part_out_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * BLOCK_L + offs_l[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    out = tl.sum(part * weights[:, None], axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_l, out, mask=offs_l < KV_LORA)


def default_num_kv_splits(
    batch: int, num_heads: int, device: torch.device, max_seq_len: int | None = None
) -> int:
    """Enough KV slices to give every SM PROGRAMS_PER_SM programs, but (when the longest sequence is known)
    none shorter than MIN_TOKENS_PER_SPLIT, where merging partials would cost more than it parallelises."""
    if device.type != "cuda":
        return 2
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * triton.cdiv(num_heads, DEFAULT_HEAD_BLOCK)
    splits = min(MAX_KV_SPLITS, triton.cdiv(PROGRAMS_PER_SM * num_sms, programs))
    if max_seq_len is not None:
        splits = min(splits, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT))
    return max(1, splits)


def check_mla_args(q_latent, q_pe, kv_cache, block_tables, seq_lens) -> None:
    assert q_latent.dtype in (torch.bfloat16, torch.float16, torch.float32), f"bad q dtype {q_latent.dtype}"
    assert q_pe.dtype == q_latent.dtype and kv_cache.dtype == q_latent.dtype, (
        "q, q_pe, kv_cache dtypes differ"
    )
    assert q_latent.dim() == 3 and q_pe.dim() == 3 and kv_cache.dim() == 3, (
        "want [B,H,L], [B,H,R], [N,bs,L+R]"
    )
    batch, num_heads, kv_lora = q_latent.shape
    assert q_pe.shape[:2] == (batch, num_heads), "q_pe must be [B, H, R]"
    assert kv_cache.shape[2] == kv_lora + q_pe.shape[2], "cache rows must be Lkv + R wide"
    assert q_latent.stride(2) == 1 and q_pe.stride(2) == 1, "q rows must be contiguous"
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    assert block_tables.dtype in (torch.int32, torch.int64) and block_tables.dim() == 2, (
        "block_tables [B, blocks]"
    )
    assert block_tables.shape[0] == batch and block_tables.stride(1) == 1, (
        "block_tables rows must be contiguous"
    )
    assert seq_lens.dtype in (torch.int32, torch.int64) and seq_lens.shape == (batch,), (
        "seq_lens must be [B] int"
    )
    assert seq_lens.is_contiguous()
    assert q_pe.device == kv_cache.device == block_tables.device == seq_lens.device == q_latent.device, (
        "all tensors on one device"
    )


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    num_kv_splits: int | None = None,
    max_seq_len: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton twin of mla_decode_attention_ref; every seq_len must be >= 1.

    num_kv_splits fixes the KV-length split (default: sized to the GPU, capped by max_seq_len when the caller
    knows it, e.g. AttentionMetadata.max_seq_len); `config` pins BLOCK_H / BLOCK_N.
    """
    require_triton()
    check_mla_args(q_latent, q_pe, kv_cache, block_tables, seq_lens)
    batch, num_heads, kv_lora = q_latent.shape
    rope = q_pe.shape[2]
    if config is None and q_latent.device.type != "cuda":
        config = INTERPRETER_CONFIG
    splits = num_kv_splits or default_num_kv_splits(batch, num_heads, q_latent.device, max_seq_len)
    block_l = max(MIN_DOT_DIM, triton.next_power_of_2(kv_lora))
    block_r = max(MIN_DOT_DIM, triton.next_power_of_2(rope))
    part_out = torch.empty(batch, num_heads, splits, block_l, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q_latent.device)
    out = torch.empty(batch, num_heads, kv_lora, dtype=q_latent.dtype, device=q_latent.device)
    if batch == 0:
        return out

    def grid(meta: dict) -> tuple[int, int, int]:
        return (batch, triton.cdiv(num_heads, meta["BLOCK_H"]), splits)

    args = (q_latent, q_pe, kv_cache, block_tables, seq_lens, part_out, part_lse, softmax_scale * LOG2E)  # fmt: skip
    strides = (*q_latent.stride()[:2], *q_pe.stride()[:2], *part_out.stride()[:2], kv_cache.stride(1))
    launch(
        mla_decode_attention_kernel, grid, (*args, num_heads, *strides, block_tables.stride(0)), config,
        KV_LORA=kv_lora, ROPE=rope, BLOCK_L=block_l, BLOCK_R=block_r, PAGE_SIZE=kv_cache.shape[1],
        NUM_SPLITS=splits, X_DTYPE=tl_dtype(q_latent.dtype),
        DOT_DTYPE=compute_dtype(q_latent.dtype, q_latent.device),
    )  # fmt: skip
    mla_decode_reduce_kernel[(batch, num_heads)](
        part_out, part_lse, out, num_heads, part_out.stride(0), part_out.stride(1), out.stride(0), out.stride(1),
        KV_LORA=kv_lora, BLOCK_L=block_l, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mla_decode_attention_ref(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    batch, _, kv_lora_rank = q_latent.shape
    block_size = kv_cache.shape[1]
    if max_seq_len is not None:
        # Only gather the blocks some sequence of this batch actually reaches.
        block_tables = block_tables[:, : _cdiv(max_seq_len, block_size)]
    max_num_blocks = block_tables.shape[1]
    # [B, max_num_blocks * block_size, Lkv + R]
    kv = kv_cache[block_tables.long()].view(batch, max_num_blocks * block_size, -1).to(torch.float32)
    c_kv, k_pe = kv[..., :kv_lora_rank], kv[..., kv_lora_rank:]
    scores = torch.einsum("bhc,btc->bht", q_latent.to(torch.float32), c_kv)
    scores = scores + torch.einsum("bhr,btr->bht", q_pe.to(torch.float32), k_pe)
    positions = torch.arange(kv.shape[1], device=kv.device)
    is_padding = positions.unsqueeze(0) >= seq_lens.to(kv.device).unsqueeze(1)  # [B, T]
    scores = scores.masked_fill(is_padding.unsqueeze(1), float("-inf")) * softmax_scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,btc->bhc", probs, c_kv).to(q_latent.dtype)
