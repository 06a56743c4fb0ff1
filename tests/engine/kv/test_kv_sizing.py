"""KV cache sizing (budget on CPU, profiled on CUDA), its capacity log, and prefill_context_chunk end to end."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import track_engine

from k2ray import LLM, SamplingParams
from k2ray.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from k2ray.engine.kv.kv_sizing import (
    cuda_kv_budget_bytes,
    log_kv_capacity,
    num_kv_blocks,
    profile_peak_bytes,
    profiling_step,
)
from k2ray.engine.runner.model_runner import kv_cache_bytes_per_token
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.loader import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return load_model(tiny_checkpoint_dir(), torch.float32, "cpu", "torch")


def test_config_checks_the_new_fields() -> None:
    with pytest.raises(ValueError, match="prefill_context_chunk"):
        EngineConfig(model="m", prefill_context_chunk=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model="m", gpu_memory_utilization=1.5)


def test_cpu_blocks_come_from_the_byte_budget(model) -> None:
    per_block = kv_cache_bytes_per_token(model.args, model.dtype) * 4
    config = EngineConfig(model="m", block_size=4, kv_cache_memory_bytes=per_block * 10 + 1)
    assert num_kv_blocks(config, model, 1024, CPU) == 10
    assert num_kv_blocks(EngineConfig(model="m", block_size=4), model, 1024, CPU) == \
        DEFAULT_CPU_KV_CACHE_BYTES // per_block
    assert num_kv_blocks(EngineConfig(model="m", num_kv_blocks=7), model, 1024, CPU) == 7


def test_capacity_log_names_tokens_and_the_longest_request(model, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="k2ray.engine.kv.kv_sizing"):
        assert log_kv_capacity(100, 16, 262_144, model) == 1600
        assert log_kv_capacity(100, 16, 1000, model) == 1000
    assert "1600 tokens" in caplog.records[0].message and "longest request it holds is 1600" in caplog.text
    assert "longest request it holds is 1000" in caplog.records[1].message


@pytest.mark.parametrize(("max_model_len", "num_new", "num_context"), [(4096, 32, 24), (40, 32, 8)])
def test_profiling_step_is_the_largest_step(model, max_model_len, num_new, num_context) -> None:
    """max_num_batched_tokens new tokens over one context chunk (less where max_model_len is shorter); it runs,
    and the widest wkv_b expansion is the larger of the two."""
    config = EngineConfig(model="m", block_size=4, max_num_batched_tokens=32, prefill_context_chunk=24)
    input_ids, positions, cache, meta = profiling_step(config, model.args.kv_cache_dim, max_model_len,
                                                       model.dtype, CPU)
    assert input_ids.shape == (num_new,) and positions.tolist() == list(range(num_context, num_context + num_new))
    assert meta.seq_lens_cpu == (num_context + num_new,) and meta.prefill_context_chunk == 24
    rows: list[int] = []
    hook = model.layers[0].attn.wkv_b.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            hidden = model(input_ids, positions, [cache] * len(model.layers), meta)
    finally:
        hook.remove()
    assert hidden.shape == (num_new, model.args.hidden_size) and torch.isfinite(hidden).all()
    assert max(rows) == max(num_new, num_context)


@pytest.mark.gpu
def test_cuda_budget_is_utilization_minus_the_profiled_peak() -> None:
    device = torch.device("cuda")
    model = load_model(tiny_checkpoint_dir(), torch.bfloat16, device, "triton")
    config = EngineConfig(model="m", max_num_batched_tokens=512, prefill_context_chunk=1024)
    peak = profile_peak_bytes(model, config, 4096, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peak > weights
    total = torch.cuda.mem_get_info(device)[1]
    budget = cuda_kv_budget_bytes(model, config, 4096, device)
    assert 0 < budget <= total * config.gpu_memory_utilization - peak


def test_chunked_context_generates_what_one_piece_does() -> None:
    """Prompts prefilled 8 tokens a step, their cached context read 3 rows at a time (below the block size)."""
    prompts = [{"prompt_token_ids": list(range(5, 40))}, {"prompt_token_ids": list(range(60, 83))}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for chunk in (3, 4096):
        llm = LLM(tiny_checkpoint_dir(), block_size=4, num_kv_blocks=64, max_num_batched_tokens=8, max_model_len=128,
                  prefill_context_chunk=chunk, enable_prefix_caching=False)
        track_engine(llm)
        outs[chunk] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs[3] == outs[4096] and all(len(ids) == 6 for ids in outs[3])
