"""Triton kernels for k2ray (installed as `k2ray.kernels`). Imports nothing of k2ray.

Every kernel comes as `foo_kernel` (Triton) + `foo()` launcher asserting its layout + `foo_ref()` in torch.
The references import without Triton (`HAS_TRITON` says whether the launchers can run); the launchers take
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests). On CUDA they autotune; `config=` pins a tile.
Tools: `python -m k2ray.kernels.bench.bench_kernels` (GPU timings vs torch), `python -m
k2ray.kernels.bench.compile_check` (compile every config for sm_90 without a GPU: registers, spills, smem).
"""

from ._triton import HAS_TRITON
from .attn_merge import merge_attention_states, merge_attention_states_kernel, merge_attention_states_ref
from .fused_moe_int4 import (
    fused_moe_int4,
    fused_moe_int4_kernel,
    fused_moe_int4_ref,
    moe_align_block_size,
    moe_align_block_size_ref,
)
from .int4_layout import K2_GROUP_SIZE, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from .kv_store import store_latent_kv, store_latent_kv_kernel, store_latent_kv_ref
from .mla_decode import (
    mla_decode_attention,
    mla_decode_attention_kernel,
    mla_decode_attention_ref,
    mla_decode_reduce_kernel,
)
from .mla_decode_cpu import mla_decode_attention_cpu
from .mla_decode_grouped import mla_decode_attention_grouped
from .w4a16_gemm import w4a16_gemm, w4a16_gemm_kernel, w4a16_gemm_ref

__all__ = [
    "HAS_TRITON",
    "K2_GROUP_SIZE",
    "dequantize_int4",
    "fused_moe_int4",
    "fused_moe_int4_kernel",
    "fused_moe_int4_ref",
    "merge_attention_states",
    "merge_attention_states_kernel",
    "merge_attention_states_ref",
    "mla_decode_attention",
    "mla_decode_attention_cpu",
    "mla_decode_attention_grouped",
    "mla_decode_attention_kernel",
    "mla_decode_attention_ref",
    "mla_decode_reduce_kernel",
    "moe_align_block_size",
    "moe_align_block_size_ref",
    "pack_int4",
    "quantize_int4",
    "store_latent_kv",
    "store_latent_kv_kernel",
    "store_latent_kv_ref",
    "unpack_int4",
    "w4a16_gemm",
    "w4a16_gemm_kernel",
    "w4a16_gemm_ref",
]
