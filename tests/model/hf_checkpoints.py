"""Tiny random DeepSeek-V3 / Kimi-K2 checkpoints written by transformers, plus the transformers reference model.

    path = make_hf_checkpoint(tmp_path, "k2_like")          # save_pretrained + (optionally) K2-style config.json
    hf = load_hf_reference(path)                            # DeepseekV3ForCausalLM, fp32, eager attention
    logits = hf_logits(hf, token_ids)                       # [T, V] float32

TINY_CONFIGS names the variants (stable names; other test packages reuse them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

BASE_CONFIG: dict = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_interleave=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    num_mtp_layers=0,
)

K2_YARN = dict(rope_type="yarn", rope_theta=50000.0, factor=64.0, original_max_position_embeddings=64,
               beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)

# name -> overrides of BASE_CONFIG. `k2_style` rewrites config.json the way Kimi K2 ships it
# (model_type kimi_k2, rope_theta + rope_scaling with "type", noaux_tc fields spelled out).
TINY_CONFIGS: dict[str, dict] = {
    # K2 Thinking's shape of things: n_group 1, q_lora, YaRN factor 64 with beta 1/1, interleaved rope.
    "k2_like": dict(rope_parameters=K2_YARN, k2_style=True),
    # Group-limited routing, two dense layers, no q LoRA, plain rope, rotate-half layout.
    "grouped_dense2": dict(
        n_group=4, topk_group=2, first_k_dense_replace=2, q_lora_rank=None, rope_interleave=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), num_hidden_layers=3,
    ),
    # DeepSeek-V3-like YaRN (beta 32/1) with mscale != mscale_all_dim, grouped routing, no renormalisation.
    "deepseek_yarn": dict(
        n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=2.5, max_position_embeddings=128,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.707),
    ),
    # Tied embeddings and no shared expert.
    "tied_no_shared": dict(tie_word_embeddings=True, n_shared_experts=0, rope_parameters=K2_YARN),
}

K2_STYLE_FIELDS = dict(model_type="kimi_k2", topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1,
                       torch_dtype="float32")
_NORM_JITTER = 0.1
_ROUTER_BIAS_RANGE = 0.5


def _reference_config(overrides: dict):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**(BASE_CONFIG | overrides))


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations (HF's std 0.02 would leave everything in the eps/linear regime)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1 + _NORM_JITTER * torch.randn(param.shape, generator=gen))
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1]))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # Set explicitly after init: non-zero and comparable to sigmoid scores so selection differs
            # from the unbiased top-k.
            buf.copy_((torch.rand(buf.shape, generator=gen) * 2 - 1) * _ROUTER_BIAS_RANGE)


def make_hf_checkpoint(tmp_dir: str | Path, config: str = "k2_like", *, seed: int = 0, **overrides) -> Path:
    """save_pretrained a random DeepseekV3ForCausalLM (fp32) for TINY_CONFIGS[config] | overrides -> its dir."""
    from transformers import DeepseekV3ForCausalLM

    merged = TINY_CONFIGS[config] | overrides
    k2_style = merged.pop("k2_style", False)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(_reference_config(merged))
    _randomise(model, seed)
    out = Path(tmp_dir) / f"{config}-seed{seed}"
    model.save_pretrained(out)
    if k2_style:
        _rewrite_k2_style(out / "config.json")
    return out


def _rewrite_k2_style(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    for key in ("head_dim", "qk_head_dim", "dtype"):
        cfg.pop(key, None)
    cfg |= K2_STYLE_FIELDS
    config_path.write_text(json.dumps(cfg, indent=2))


def load_hf_reference(checkpoint_dir: str | Path):
    """transformers' DeepseekV3ForCausalLM for a checkpoint from make_hf_checkpoint (K2-style or not), fp32."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if cfg.get("model_type") == "kimi_k2":
        rope = dict(cfg.pop("rope_scaling"))
        rope["rope_type"] = rope.pop("type")
        rope["rope_theta"] = cfg.pop("rope_theta")
        cfg["rope_parameters"] = rope
    for key in ("model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "topk_method",
                "scoring_func", "moe_layer_freq", "head_dim", "qk_head_dim"):
        cfg.pop(key, None)
    config = DeepseekV3Config(**cfg)
    model = DeepseekV3ForCausalLM.from_pretrained(
        checkpoint_dir, config=config, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence logits [T, V] float32 from the transformers reference."""
    return model(torch.tensor([token_ids])).logits[0].float()
