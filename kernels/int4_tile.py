"""Triton device helpers shared by the INT4 GEMM kernels: dequantize a weight tile straight from the
checkpoint's pack-quantized words (tensor-core path), or multiply one activation row with it (GEMV path)."""

from __future__ import annotations

from ._triton import tl, triton


@triton.jit
def dequant_int4_tile(
    packed_ptr, scale_ptr, offs_n, n_mask, k0, K, stride_pn, stride_sn,
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_DTYPE: tl.constexpr,
    FAST_DEQUANT: tl.constexpr, EVEN_K: tl.constexpr, STREAM_WEIGHTS: tl.constexpr,
):  # fmt: skip
    """Weight tile W[offs_n, k0:k0+BLOCK_K] as [BLOCK_N, BLOCK_K] (zero outside N / K).

    FAST_DEQUANT: builds each value from its bit pattern and returns W_DTYPE (bf16 / fp16 only on GPU: the
    interpreter cannot do 16-bit float arithmetic; fp32 anywhere). Otherwise converts in fp32, returns fp32.
    EVEN_K (K % BLOCK_K == 0) drops the K masks, which would otherwise cap loads at 8 bytes.
    STREAM_WEIGHTS: no other program reads this tile (one M tile), so it should not occupy L2.
    """
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    offs_w = k0 // 8 + tl.arange(0, WORDS)
    offs_g = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
    if EVEN_K:
        w_mask = n_mask[:, None]
        s_mask = n_mask[:, None]
    else:
        w_mask = n_mask[:, None] & (offs_w[None, :] < K // 8)
        s_mask = n_mask[:, None] & (offs_g[None, :] < K // GROUP_SIZE)
    w_ptrs = packed_ptr + offs_n[:, None] * stride_pn + offs_w[None, :]
    if STREAM_WEIGHTS:
        words = tl.load(w_ptrs, mask=w_mask, other=0, eviction_policy="evict_first")
    else:
        words = tl.load(w_ptrs, mask=w_mask, other=0)
    # Nibble i of word j is column 8j+i (LSB first): shift a broadcast [BN, WORDS, 8] and fold it to K.
    shifts = tl.arange(0, 8) * 4
    nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    if FAST_DEQUANT:
        # int->float converts run at 1/4 rate and would cap a memory-bound GEMM well below HBM speed. OR-ing a
        # nibble n into the mantissa of 128.0 (bf16 0x4300) or 1024.0 (fp16 0x6400) gives exactly 128+n / 1024+n,
        # so one LOP3 and one packed subtract yield n - 8.
        # fp32 works the same way with 2**23 (0x4B000000).
        if W_DTYPE == tl.bfloat16:
            q = (nibbles | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0
        elif W_DTYPE == tl.float16:
            q = (nibbles | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
        else:
            q = (nibbles | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    else:
        q = (nibbles - 8).to(tl.float32)
    q = tl.reshape(q, (BLOCK_N, BLOCK_K))
    scale = tl.load(
        scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
        mask=s_mask,
        other=0.0,
    ).to(q.dtype)
    # (n - 8) is exact in bf16/fp16, so this single rounding of q * scale matches fp32-then-round.
    w = tl.reshape(q, (BLOCK_N, GROUPS, GROUP_SIZE)) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def int4_gemv_tile(
    packed_ptr, scale_ptr, x_ptr, offs_n, n_mask, k0, K, stride_pn, stride_sn,
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    STREAM_WEIGHTS: tl.constexpr,
):  # fmt: skip
    """One activation row x[k0:k0+BLOCK_K] times W[offs_n, same K] without tensor cores, per scale group:
    fp32 [BLOCK_N, BLOCK_K / GROUP_SIZE]; the caller sums groups once after its K loop.

    For a single row a dot wastes 15/16 of the MMA and round-trips the dequantized tile through shared memory.
    Here a thread owns whole words, so the nibble and in-group sums stay in registers, the scale multiplies
    once per group, and nibbles become fp32 by the 2**23 bit pattern (0x4B000000 | n) with no convert.
    """
    WORDS_PER_GROUP: tl.constexpr = GROUP_SIZE // 8
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    offs_g = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
    words_idx = offs_g[:, None] * WORDS_PER_GROUP + tl.arange(0, WORDS_PER_GROUP)[None, :]  # [G, WPG]
    w_ptrs = packed_ptr + offs_n[:, None, None] * stride_pn + words_idx[None, :, :]
    k_mask = words_idx < K // 8
    w_mask = n_mask[:, None, None] if EVEN_K else n_mask[:, None, None] & k_mask[None, :, :]
    if STREAM_WEIGHTS:
        words = tl.load(w_ptrs, mask=w_mask, other=0, eviction_policy="evict_first")
    else:
        words = tl.load(w_ptrs, mask=w_mask, other=0)
    # Nibble by nibble on the loaded [BN, G, WPG] words, so every product stays in its word's thread.
    dot = tl.zeros((BLOCK_N, GROUPS, WORDS_PER_GROUP), dtype=tl.float32)
    for i in tl.static_range(8):
        q = (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        x = tl.load(x_ptr + words_idx * 8 + i, mask=k_mask, other=0.0).to(tl.float32)  # [G, WPG]
        dot += q * x[None, :, :]
    s_mask = n_mask[:, None] if EVEN_K else n_mask[:, None] & (offs_g[None, :] < K // GROUP_SIZE)
    scale = tl.load(scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=s_mask, other=0.0)
    return tl.sum(dot, axis=2) * scale.to(tl.float32)
