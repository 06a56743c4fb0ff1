from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from k2ray.engine.config import EngineConfig, resolve_device, resolve_dtype, resolve_kernel_backend
from k2ray.engine.outputs import NewRequestData, ScheduledSequence, SchedulerOutput
from k2ray.engine.runner.model_runner import ModelRunner, kv_cache_bytes_per_token, num_kv_blocks_for_budget
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.loader import load_model
from k2ray.sampling_params import SamplingParams

K2_LAYERS, K2_KV_LORA_RANK, K2_ROPE_DIM = 61, 512, 64


def test_kv_bytes_per_token_is_mla_latent_size() -> None:
    k2 = SimpleNamespace(num_hidden_layers=K2_LAYERS, kv_cache_dim=K2_KV_LORA_RANK + K2_ROPE_DIM)
    assert kv_cache_bytes_per_token(k2, torch.bfloat16) == 70_272
    assert num_kv_blocks_for_budget(k2, torch.bfloat16, 64, 70_272 * 64 * 10 + 1) == 10
    with pytest.raises(ValueError, match="does not hold one block"):
        num_kv_blocks_for_budget(k2, torch.bfloat16, 64, 1000)


def test_config_validation_and_resolution(tmp_path) -> None:
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="m", block_size=0)
    with pytest.raises(ValueError, match="kernel_backend"):
        EngineConfig(model="m", kernel_backend="cuda")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, tmp_path) == torch.float32
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert resolve_dtype("auto", torch.device("meta"), tmp_path) == torch.bfloat16
    assert resolve_dtype("float16", cpu, tmp_path) == torch.float16
    assert resolve_kernel_backend("auto", cpu) == "torch"
    assert resolve_kernel_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_device("cpu") == cpu


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    model = load_model(tiny_checkpoint_dir(), torch.float32, "cpu", "torch")
    return ModelRunner(model, num_kv_blocks=16, block_size=4, seed=0)


def test_inputs_put_decodes_first_with_slots_and_block_tables(runner: ModelRunner) -> None:
    prefill = ScheduledSequence("p", num_computed_tokens=4, token_ids=[5, 6, 7], block_ids=[9, 3], sample=True)
    chunk = ScheduledSequence("c", num_computed_tokens=0, token_ids=[1, 2], block_ids=[4], sample=False)
    decode = ScheduledSequence("d", num_computed_tokens=6, token_ids=[8], block_ids=[2, 7], sample=True)
    for request_id in ("p", "c", "d"):
        runner.input_batch.add_request(request_id, [1], [], SamplingParams(temperature=0), None)
    inputs = runner._prepare_inputs(sorted([prefill, chunk, decode], key=lambda s: len(s.token_ids) != 1))
    meta = inputs.attn_metadata
    assert inputs.input_ids.tolist() == [8, 5, 6, 7, 1, 2]
    assert inputs.positions.tolist() == [6, 4, 5, 6, 0, 1]
    # slot = block_id * block_size + position % block_size
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 4 * 4, 4 * 4 + 1]
    assert meta.block_tables.tolist() == [[2, 7], [9, 3], [4, 0]]
    assert meta.block_tables.dtype == torch.int32
    assert meta.num_decodes == 1 and meta.query_start_loc_cpu == (0, 1, 4, 6)
    assert meta.seq_lens_cpu == (7, 7, 2) and meta.max_seq_len == 7
    assert inputs.logits_indices.tolist() == [0, 3] and inputs.sampled_ids == ["d", "p"]
    runner.remove_requests({"p", "c", "d"})


def test_execute_samples_only_completed_sequences(runner: ModelRunner) -> None:
    params = SamplingParams(temperature=0)
    new = [NewRequestData("a", [1, 2, 3, 4, 5], params), NewRequestData("b", [7, 8], params)]
    first = ScheduledSequence("a", 0, [1, 2, 3], [0, 1], sample=False)
    whole = ScheduledSequence("b", 0, [7, 8], [2], sample=True)
    out = runner.execute_model(SchedulerOutput([first, whole], new, frozenset(), 5))
    assert list(out.sampled_token_ids) == ["b"]
    rest = ScheduledSequence("a", 3, [4, 5], [0, 1], sample=True)
    out = runner.execute_model(SchedulerOutput([rest], [], frozenset(), 2))
    assert list(out.sampled_token_ids) == ["a"]
    runner.execute_model(SchedulerOutput([], [], frozenset({"a", "b"}), 0))
    assert runner.requests == {} and runner.input_batch.num_reqs == 0
