"""A deterministic random Kimi-K2-architecture checkpoint in K2's on-disk format (k2-tiny, the tests' model).

    python -m k2ray.model.tiny_checkpoint [--out DIR] [--seed N]

Writes config.json (model_type kimi_k2, K2 Thinking's fields at tiny sizes), generation_config.json and
two safetensors shards + index with HF tensor names; routed experts INT4 pack-quantized with K2's
quantization_config. Tokenizer files in DIR are left alone (the tokenizer helper writes them).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .args import ModelArgs
from .default_checkpoint import tiny_checkpoint_dir
from .quantize import INDEX_FILE, SAFETENSORS_METADATA, k2_quantization_config, quantize_state

DEFAULT_SEED = 0
NUM_SHARDS = 2
# e_score_correction_bias ~ U(-B, B): non-zero so selection and weighting visibly differ.
ROUTER_BIAS_RANGE = 0.1
NORM_WEIGHT_JITTER = 0.1

TINY_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 512,
    "eos_token_id": 514,
    "pad_token_id": 767,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "kv_lora_rank": 32,
    "max_position_embeddings": 262144,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 64,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 64.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 16,
    "vocab_size": 768,
}


def _linear_shapes(args: ModelArgs, layer: int) -> dict[str, tuple[int, int]]:
    """HF Linear name (without .weight) -> [out, in] for one layer."""
    d, h, p = args.hidden_size, args.num_attention_heads, f"model.layers.{layer}."
    shapes = {
        p + "self_attn.kv_a_proj_with_mqa": (args.kv_cache_dim, d),
        p + "self_attn.kv_b_proj": (h * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank),
        p + "self_attn.o_proj": (d, h * args.v_head_dim),
    }
    if args.q_lora_rank is None:
        shapes[p + "self_attn.q_proj"] = (h * args.qk_head_dim, d)
    else:
        shapes[p + "self_attn.q_a_proj"] = (args.q_lora_rank, d)
        shapes[p + "self_attn.q_b_proj"] = (h * args.qk_head_dim, args.q_lora_rank)
    mlps = {p + "mlp": args.intermediate_size}
    if args.is_moe_layer(layer):
        inter = args.moe_intermediate_size
        mlps = {p + f"mlp.experts.{e}": inter for e in range(args.n_routed_experts)}
        mlps[p + "mlp.shared_experts"] = inter * args.n_shared_experts
        shapes[p + "mlp.gate"] = (args.n_routed_experts, d)
    for prefix, inter in mlps.items():
        shapes |= {prefix + ".gate_proj": (inter, d), prefix + ".up_proj": (inter, d), prefix + ".down_proj": (d, inter)}
    return shapes


def random_state(args: ModelArgs, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Dense HF-named weights; Linear weights ~ N(0, 1/in) keep activations O(1) through the stack."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    def norm(dim: int) -> torch.Tensor:
        return (1 + NORM_WEIGHT_JITTER * torch.randn(dim, generator=gen)).to(dtype)

    d = args.hidden_size
    state = {"model.embed_tokens.weight": normal((args.vocab_size, d), 1.0)}
    for layer in range(args.num_hidden_layers):
        p = f"model.layers.{layer}."
        state[p + "input_layernorm.weight"] = norm(d)
        state[p + "post_attention_layernorm.weight"] = norm(d)
        state[p + "self_attn.kv_a_layernorm.weight"] = norm(args.kv_lora_rank)
        if args.q_lora_rank is not None:
            state[p + "self_attn.q_a_layernorm.weight"] = norm(args.q_lora_rank)
        for name, (out_f, in_f) in _linear_shapes(args, layer).items():
            state[name + ".weight"] = normal((out_f, in_f), 1 / math.sqrt(in_f))
        if args.is_moe_layer(layer):
            bias = (torch.rand(args.n_routed_experts, generator=gen) * 2 - 1) * ROUTER_BIAS_RANGE
            state[p + "mlp.gate.e_score_correction_bias"] = bias.to(torch.float32)
    state["model.norm.weight"] = norm(d)
    state["lm_head.weight"] = normal((args.vocab_size, d), 1 / math.sqrt(d))
    return state


def _shard_of(name: str, args: ModelArgs) -> int:
    # Split by layer like K2's shards: embeddings + the first layers, then the rest + head.
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) * NUM_SHARDS // args.num_hidden_layers
    return 0 if name.startswith("model.embed_tokens") else NUM_SHARDS - 1


def write_tiny_checkpoint(out_dir: str | Path, seed: int = DEFAULT_SEED, config: dict | None = None) -> Path:
    config = dict(config or TINY_CONFIG)
    args = ModelArgs.from_hf_config(config)
    return write_state_checkpoint(out_dir, random_state(args, seed), config)


def write_state_checkpoint(out_dir: str | Path, dense_state: dict[str, torch.Tensor], config: dict) -> Path:
    """Dense HF-named weights -> K2's format in `out_dir`: routed experts INT4, shards, index, configs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config["quantization_config"] = k2_quantization_config()
    args = ModelArgs.from_hf_config(config)
    assert args.quantization is not None
    state = quantize_state(dense_state, args.quantization)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(NUM_SHARDS)]
    for name, tensor in state.items():
        shards[_shard_of(name, args)][name] = tensor.contiguous()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        save_file(shard, str(out_dir / file_name), metadata=SAFETENSORS_METADATA)
        weight_map |= dict.fromkeys(shard, file_name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
    _write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=tiny_checkpoint_dir())
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    opts = parser.parse_args(argv)
    print(write_tiny_checkpoint(opts.out, opts.seed))


if __name__ == "__main__":
    main()
