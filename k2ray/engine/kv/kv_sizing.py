"""How many latent KV blocks an engine allocates, by measurement on CUDA and from a byte budget on CPU.

CUDA: a profiling forward at max_num_batched_tokens new tokens over one full prefill_context_chunk of cached
context (the largest step the scheduler can build, and the prefill's largest workspace) measures the peak
memory of everything but the cache; the cache gets gpu_memory_utilization of total memory minus that peak
(and minus what the process holds outside torch's allocator: the CUDA context, communicators).
CPU: kv_cache_memory_bytes, or DEFAULT_CPU_KV_CACHE_BYTES.
"""

from __future__ import annotations

import logging

import torch

from k2ray.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from k2ray.engine.runner.model_runner import kv_cache_bytes_per_token, num_kv_blocks_for_budget
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.deepseek_v3 import Transformer

logger = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def profiling_step(config: EngineConfig, kv_cache_dim: int, max_model_len: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids, positions, one scratch cache [NB, BS, kv_cache_dim], metadata) of the largest step: one
    sequence's prefill of max_num_batched_tokens over as much cached context as one context chunk."""
    num_new = min(config.max_num_batched_tokens, max_model_len)
    num_context = min(config.prefill_context_chunk, max_model_len - num_new)
    seq_len = num_context + num_new
    num_blocks = _cdiv(seq_len, config.block_size)
    cache = torch.zeros(num_blocks, config.block_size, kv_cache_dim, dtype=dtype, device=device)

    def tensor(values: range | list[int], tensor_dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(list(values), dtype=tensor_dtype, device=device)

    meta = AttentionMetadata(
        query_start_loc=tensor([0, num_new], torch.int64), seq_lens=tensor([seq_len], torch.int64),
        block_tables=tensor(range(num_blocks), torch.int32).unsqueeze(0),
        slot_mapping=tensor(range(num_context, seq_len), torch.int64), num_decodes=0, max_seq_len=seq_len,
        query_start_loc_cpu=(0, num_new), seq_lens_cpu=(seq_len,), prefill_context_chunk=config.prefill_context_chunk)
    input_ids = torch.zeros(num_new, dtype=torch.int64, device=device)
    return input_ids, tensor(range(num_context, seq_len), torch.int64), cache, meta


@torch.inference_mode()
def profile_peak_bytes(model: Transformer, config: EngineConfig, max_model_len: int, device: torch.device) -> int:
    """Peak bytes torch allocates on `device` (weights included, the scratch cache excluded) for the largest step."""
    input_ids, positions, cache, meta = profiling_step(config, model.args.kv_cache_dim, max_model_len, model.dtype,
                                                       device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    # Every layer may share one scratch cache: the profile measures workspace, not the values.
    hidden = model(input_ids, positions, [cache] * len(model.layers), meta)
    model.compute_logits(hidden[: min(config.max_num_seqs, hidden.shape[0])])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - cache.numel() * cache.element_size()
    del hidden, cache
    torch.cuda.empty_cache()
    return peak


def cuda_kv_budget_bytes(model: Transformer, config: EngineConfig, max_model_len: int, device: torch.device) -> int:
    peak = profile_peak_bytes(model, config, max_model_len, device)
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    outside_torch = max(0, total_bytes - free_bytes - torch.cuda.memory_reserved(device))
    budget = int(total_bytes * config.gpu_memory_utilization) - peak - outside_torch
    logger.info("memory profile: %.2f GiB peak for a %d-token step, %.2f GiB outside torch, %.2f GiB total; "
                "%.2f GiB for the KV cache", peak / 2**30, config.max_num_batched_tokens, outside_torch / 2**30,
                total_bytes / 2**30, budget / 2**30)
    if budget <= 0:
        raise ValueError(f"no memory left for the KV cache: gpu_memory_utilization={config.gpu_memory_utilization} "
                         f"of {total_bytes} bytes is below the profiled peak of {peak} bytes; raise it or lower "
                         "max_num_batched_tokens / prefill_context_chunk")
    return budget


def num_kv_blocks(config: EngineConfig, model: Transformer, max_model_len: int, device: torch.device) -> int:
    """num_kv_blocks if set, else the budget (kv_cache_memory_bytes; on CUDA the profiled one) in blocks."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    budget = config.kv_cache_memory_bytes
    if budget is None:
        budget = cuda_kv_budget_bytes(model, config, max_model_len, device) if device.type == "cuda" \
            else DEFAULT_CPU_KV_CACHE_BYTES
    return num_kv_blocks_for_budget(model.args, model.dtype, config.block_size, budget)


def log_kv_capacity(num_blocks: int, block_size: int, max_model_len: int, model: Transformer) -> int:
    """Log the cache's capacity and the longest request it can hold (returned: min(max_model_len, capacity))."""
    capacity = num_blocks * block_size
    bytes_per_token = kv_cache_bytes_per_token(model.args, model.dtype)
    longest = min(max_model_len, capacity)
    logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); the longest request it holds is %d "
                "tokens (max_model_len %d)", num_blocks, block_size, capacity,
                capacity * bytes_per_token / 2**30, longest, max_model_len)
    return longest

