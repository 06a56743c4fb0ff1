"""Triton kernels for k2ray (installed as `k2ray.kernels`). Imports nothing of k2ray.

Every kernel comes as `foo_kernel` (Triton) + `foo()` launcher asserting its layout + `foo_ref()` in torch.
The references import without Triton; launchers live beside them.
"""

from .fused_moe_int4 import fused_moe_int4_ref
from .int4_layout import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from .kv_store import store_latent_kv_ref
from .mla_decode import mla_decode_attention_ref
from .w4a16_gemm import w4a16_gemm_ref

__all__ = [
    "dequantize_int4",
    "fused_moe_int4_ref",
    "mla_decode_attention_ref",
    "pack_int4",
    "quantize_int4",
    "store_latent_kv_ref",
    "unpack_int4",
    "w4a16_gemm_ref",
]
