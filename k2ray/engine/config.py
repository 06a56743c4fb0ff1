from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from k2ray.model.attention_metadata import DEFAULT_PREFILL_CONTEXT_CHUNK

KernelBackend = Literal["auto", "torch", "triton"]
EngineRole = Literal["both", "prefill", "decode"]

# Latent KV memory when neither num_kv_blocks nor a CUDA device budget decides it.
DEFAULT_CPU_KV_CACHE_BYTES = 256 * 1024 * 1024
# Share of the device's total memory the engine may use: weights, the profiled step's peak, then the KV cache.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# How long a parked request (a prefill's KV awaiting its reader, a decode reservation awaiting its KV)
# may hold blocks: a transfer takes milliseconds to seconds, a peer that never comes back frees them.
DEFAULT_KV_LEASE_TIMEOUT_S = 120.0
# Most of a step's token budget prefill chunks leave to running decodes (one token each), so a long prompt
# ahead of them in the queue never starves them; at K2's 2,048-token budget that covers 512 decodes.
DEFAULT_DECODE_RESERVED_SHARE = 0.25
# How long an EP rank waits for the others: to join the group at start, and in any one collective.
DEFAULT_EP_TIMEOUT_S = 120.0
# Decode batch sizes captured as CUDA graphs (compiled_forward.py): a decode step runs the smallest one that
# holds it, padded up; larger steps run eager.
DEFAULT_CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine needs, set once; runtime values (KV block count, eos ids) are
    returned by the components that find them, never written back here.

    `max_model_len` None means the model's max_position_embeddings (capped by the KV capacity);
    `num_kv_blocks` None sizes the cache from `kv_cache_memory_bytes`, or on CUDA (when that is None)
    from `gpu_memory_utilization` of the total memory minus the peak of a profiling step (kv/kv_sizing.py).
    A prefill chunk reads its cached context `prefill_context_chunk` tokens at a time, which bounds
    its attention workspace whatever the context length. `role` "prefill" stops every request after its
    first token and holds its KV blocks for a decode engine (see kv_transfer.py); "decode" and
    "both" also take prefilled requests (`LLMEngine.add_prefilled_request`); a parked request
    (prefilled, or reserved for remote KV) holds its blocks for at most `kv_lease_timeout_s`.
    `decode_reserved_share` of each step's budget is kept for running decodes (scheduler.py).
    `enable_structured_output` builds xgrammar's vocabulary and compiler at start (False: constrained
    requests are rejected and nothing is built).
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    prefill_context_chunk: int = DEFAULT_PREFILL_CONTEXT_CHUNK
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kernel_backend: KernelBackend = "auto"
    seed: int = 0
    role: EngineRole = "both"
    skip_tokenizer_init: bool = False
    enable_structured_output: bool = True
    kv_lease_timeout_s: float = DEFAULT_KV_LEASE_TIMEOUT_S
    decode_reserved_share: float = DEFAULT_DECODE_RESERVED_SHARE
    # Expert parallelism: this engine is one of `ep_size` ranks (own scheduler, requests and KV cache), the
    # routed experts sharded n_routed_experts / ep_size per rank; 1: the whole model here.
    ep_size: int = 1
    ep_timeout_s: float = DEFAULT_EP_TIMEOUT_S
    # Redundant experts: an EPLB placement file (k2ray.dist.eplb, k2ray.model.expert_map) for this ep_size.
    ep_placement: str | None = None
    # The compiled forward (compiled_forward.py): on CUDA, decode steps replayed from CUDA graphs captured at
    # start for `cuda_graph_sizes`; on CPU, torch.compile (inductor). None: the device's default there.
    compile: bool | None = None
    cuda_graph_sizes: tuple[int, ...] = DEFAULT_CUDA_GRAPH_SIZES
    # glibc malloc tuned at start to keep step activations on the heap (host_allocator.py); process-wide.
    tune_host_malloc: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not self.enable_chunked_prefill and self.max_model_len is not None \
                and self.max_model_len > self.max_num_batched_tokens:
            raise ValueError("without chunked prefill, max_num_batched_tokens must cover max_model_len")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend must be auto, torch or triton, got {self.kernel_backend!r}")
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {self.role!r}")
        if not self.kv_lease_timeout_s > 0:
            raise ValueError(f"kv_lease_timeout_s must be positive, got {self.kv_lease_timeout_s}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be at least 1, got {self.ep_size}")
        if not self.ep_timeout_s > 0:
            raise ValueError(f"ep_timeout_s must be positive, got {self.ep_timeout_s}")
        if self.prefill_context_chunk < 1:
            raise ValueError(f"prefill_context_chunk must be at least 1, got {self.prefill_context_chunk}")
        if not 0 <= self.decode_reserved_share <= 1:
            raise ValueError(f"decode_reserved_share must be in [0, 1], got {self.decode_reserved_share}")
        _check_cuda_graph_sizes(self.cuda_graph_sizes)


def _check_cuda_graph_sizes(sizes: tuple[int, ...]) -> None:
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"cuda_graph_sizes must be positive batch sizes, got {sizes}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dir: str | Path) -> torch.dtype:
    """`auto`: float32 on CPU (bf16 matmuls are slow there), the checkpoint's torch_dtype elsewhere."""
    if dtype != "auto":
        return getattr(torch, dtype.removeprefix("torch."))
    if device.type == "cpu":
        return torch.float32
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return getattr(torch, name)


def resolve_kernel_backend(backend: KernelBackend, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend
