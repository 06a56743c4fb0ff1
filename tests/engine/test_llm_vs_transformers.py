"""Greedy token ids from LLM (skip_tokenizer_init, prompt_token_ids) equal transformers' generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_model_test_helper, track_engine
from k2ray.kernels import dequantize_int4
from safetensors.torch import load_file, save_file

from k2ray import LLM, SamplingParams

hf_checkpoints = load_model_test_helper("hf_checkpoints")

NUM_NEW_TOKENS = 10
PROMPT_LENGTHS = (1, 3, 17, 40, 9, 61)
# Small blocks so prompts span many of them.
BLOCK_SIZE = 4


def make_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    # Shared prefixes and a duplicate, so the prefix cache has something to hit.
    prompts.append(prompts[3][:33] + [5, 6, 7])
    prompts.append(list(prompts[5]))
    return prompts


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    # No eos at all (min_new_tokens would mask the eos logit, which ignore_eos does not do).
    model.generation_config.eos_token_id = None
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new,
                             do_sample=False, pad_token_id=0)
        outs.append(gen[0, len(prompt):].tolist())
    return outs


def engine_greedy(path: Path, prompts: list[list[int]], num_new: int, **engine_kwargs) -> tuple[LLM, list]:
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=BLOCK_SIZE, **engine_kwargs)
    track_engine(llm)
    params = SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, outputs


ENGINE_SETUPS = {
    "large_budget_cached": dict(num_kv_blocks=256, max_num_batched_tokens=1024, enable_prefix_caching=True),
    "tiny_uncached": dict(num_kv_blocks=24, max_num_batched_tokens=16, enable_prefix_caching=False),
    "tiny_cached": dict(num_kv_blocks=24, max_num_batched_tokens=16, enable_prefix_caching=True),
}


@pytest.fixture(scope="module", params=["k2_like", "grouped_dense2", "deepseek_yarn"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, list[list[int]], list[list[int]]]:
    path = hf_checkpoints.make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    reference = hf_checkpoints.load_hf_reference(path)
    prompts = make_prompts(reference.config.vocab_size)
    return path, prompts, hf_greedy(reference, prompts, NUM_NEW_TOKENS)


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_greedy_matches_transformers(checkpoint, setup: str) -> None:
    path, prompts, expected = checkpoint
    llm, outputs = engine_greedy(path, prompts, NUM_NEW_TOKENS, **ENGINE_SETUPS[setup])
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    scheduler, manager = llm.llm_engine.scheduler, llm.llm_engine.kv_cache_manager
    if setup.startswith("tiny"):
        assert scheduler.num_preemptions > 0
    if ENGINE_SETUPS[setup]["enable_prefix_caching"]:
        assert manager.prefix_cache_hits > 0
        assert outputs[-1].num_cached_tokens > 0
    else:
        assert all(o.num_cached_tokens == 0 for o in outputs)


def _dequantized_copy(quantized: Path, dst: Path) -> Path:
    """The INT4 checkpoint with every packed weight expanded back to fp32, for transformers."""
    dst.mkdir()
    config = json.loads((quantized / "config.json").read_text())
    group_size = config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"]
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(quantized.glob("*.safetensors")):
        tensors.update(load_file(shard))
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(("weight_scale", "weight_shape")):
            continue
        if name.endswith("weight_packed"):
            module = name.removesuffix(".weight_packed")
            weight = dequantize_int4(tensor, tensors[f"{module}.weight_scale"], group_size, torch.float32)
            out[f"{module}.weight"] = weight.view(tensors[f"{module}.weight_shape"].tolist()).contiguous()
        else:
            out[name] = tensor
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_int4_checkpoint_matches_transformers_on_dequantized_weights(tmp_path: Path) -> None:
    from k2ray.model.quantize import quantize_checkpoint

    dense = hf_checkpoints.make_hf_checkpoint(tmp_path, "k2_like", seed=2)
    quantized = quantize_checkpoint(dense, tmp_path / "int4")
    reference = hf_checkpoints.load_hf_reference(_dequantized_copy(quantized, tmp_path / "dequantized"))
    prompts = make_prompts(reference.config.vocab_size, seed=3)
    expected = hf_greedy(reference, prompts, NUM_NEW_TOKENS)
    _, outputs = engine_greedy(quantized, prompts, NUM_NEW_TOKENS, **ENGINE_SETUPS["tiny_cached"])
    assert [o.outputs[0].token_ids for o in outputs] == expected
