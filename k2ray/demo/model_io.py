"""The demo model's config and its weights between transformers' DeepseekV3ForCausalLM and K2's on-disk names."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from k2ray.model.tiny_checkpoint import TINY_CONFIG, write_state_checkpoint

# K2 Thinking's architecture at demo sizes; the vocab fields are filled in from the trained tokenizer.
DEMO_SIZES: dict = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}
# K2 specials by offset from the first special id (see k2ray.api.tokenizer_assets).
BOS_OFFSET, IM_END_OFFSET, PAD_OFFSET = 0, 2, 255
# Fields of K2's config.json that transformers' DeepseekV3Config does not take (or spells differently).
_K2_ONLY_FIELDS = ("model_type", "architectures", "torch_dtype", "topk_method", "scoring_func", "moe_layer_freq",
                   "quantization_config", "ep_size", "seq_aux", "aux_loss_alpha", "pretraining_tp",
                   "num_nextn_predict_layers", "use_cache", "attention_dropout")


def demo_config(num_base_tokens: int, vocab_size: int, sizes: dict | None = None) -> dict:
    """K2-format config.json (without quantization_config) for a tokenizer of `num_base_tokens` + specials."""
    config = copy.deepcopy(TINY_CONFIG) | (sizes or DEMO_SIZES)
    config |= {"vocab_size": vocab_size, "bos_token_id": num_base_tokens + BOS_OFFSET,
               "eos_token_id": num_base_tokens + IM_END_OFFSET, "pad_token_id": num_base_tokens + PAD_OFFSET}
    return config


def hf_config(k2_config: dict):
    """transformers' DeepseekV3Config for a K2-format config (rope_scaling -> rope_parameters)."""
    from transformers import DeepseekV3Config

    cfg = {k: v for k, v in copy.deepcopy(k2_config).items() if k not in _K2_ONLY_FIELDS}
    rope = dict(cfg.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    rope["rope_theta"] = cfg.pop("rope_theta")
    cfg["rope_parameters"] = rope
    cfg["rope_interleave"] = True
    return DeepseekV3Config(**cfg)


def k2_state(hf_state: dict[str, torch.Tensor], n_routed_experts: int,
             dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """HF module state (fused 3D experts) -> K2's per-expert tensor names; router tensors stay fp32."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        tensor = tensor.detach()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2, dim=1)
            for e in range(n_routed_experts):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e].to(dtype).contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = up[e].to(dtype).contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(n_routed_experts):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e].to(dtype).contiguous()
        elif name.endswith(("gate.weight", "e_score_correction_bias")):
            out[name] = tensor.to(torch.float32).contiguous()
        else:
            out[name] = tensor.to(dtype).contiguous()
    return out


def write_demo_checkpoint(out_dir: str | Path, k2_config: dict, hf_state: dict[str, torch.Tensor]) -> Path:
    """K2-format shards (routed experts INT4) + config.json + generation_config.json from a trained HF state."""
    state = k2_state(hf_state, k2_config["n_routed_experts"])
    return write_state_checkpoint(out_dir, state, k2_config)
