from __future__ import annotations

import copy
import math

import pytest
import torch

from k2ray.model.args import ModelArgs, UnsupportedConfigError
from k2ray.model.quantize import K2_IGNORE, k2_quantization_config
from k2ray.model.rope import rope_inv_freq, softmax_scale, yarn_attention_factor, yarn_get_mscale

# moonshotai/Kimi-K2-Thinking config.json values (k2_facts §1, §2.1).
K2_THINKING_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 262144,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
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
    "v_head_dim": 128,
    "vocab_size": 163840,
    "quantization_config": k2_quantization_config(),
}


def _k2(**changes) -> dict:
    cfg = copy.deepcopy(K2_THINKING_CONFIG)
    cfg.update(changes)
    return cfg


def test_k2_thinking_config_parses():
    args = ModelArgs.from_hf_config(_k2())
    assert args.model_type == "kimi_k2"
    assert (args.kv_cache_dim, args.qk_head_dim) == (576, 192)
    assert not args.is_moe_layer(0) and all(args.is_moe_layer(i) for i in range(1, 61))
    assert (args.n_routed_experts, args.num_experts_per_tok, args.n_group, args.topk_group) == (384, 8, 1, 1)
    assert args.routed_scaling_factor == 2.827 and args.norm_topk_prob and args.rope_interleave
    assert args.rms_norm_eps == 1e-5 and args.eos_token_id == 163586 and not args.tie_word_embeddings
    yarn = args.rope_scaling
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast, yarn.beta_slow) == (64.0, 4096, 1.0, 1.0)
    assert args.quantization.group_size == 32 and args.quantization.num_bits == 4
    assert args.quantization.ignore == tuple(K2_IGNORE)


def test_k2_yarn_numbers_from_the_facts_sheet():
    args = ModelArgs.from_hf_config(_k2())
    assert yarn_get_mscale(64, 1.0) == pytest.approx(1.41589, abs=1e-5)
    assert softmax_scale(args) == pytest.approx(0.14468, abs=1e-5)
    assert yarn_attention_factor(args.rope_scaling) == 1.0
    base = 1.0 / (50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    inv_freq = rope_inv_freq(args)
    # beta_fast = beta_slow = 1 put the correction dim at 19.16: pairs <= 19 keep their frequency, >= 20 / 64.
    torch.testing.assert_close(inv_freq[:20], base[:20])
    torch.testing.assert_close(inv_freq[20:], base[20:] / 64)


def test_rope_parameters_style_equals_rope_scaling_style():
    k2 = _k2()
    rope = dict(k2.pop("rope_scaling"), rope_theta=k2.pop("rope_theta"))
    rope["rope_type"] = rope.pop("type")
    tf5 = dict(k2, rope_parameters=rope, model_type="deepseek_v3")
    a, b = ModelArgs.from_hf_config(_k2()), ModelArgs.from_hf_config(tf5)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling)


def test_deepseek_v3_config_with_groups_and_no_q_lora():
    cfg = _k2(model_type="deepseek_v3", n_routed_experts=256, n_group=8, topk_group=4, first_k_dense_replace=3,
              q_lora_rank=None, quantization_config=None, rope_scaling=None, tie_word_embeddings=True)
    args = ModelArgs.from_hf_config(cfg)
    assert args.q_lora_rank is None and args.quantization is None and args.rope_scaling is None
    assert (args.n_group, args.topk_group) == (8, 4) and args.tie_word_embeddings
    assert [args.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert softmax_scale(args) == pytest.approx(1 / math.sqrt(192))


def _quant(**weight_changes) -> dict:
    qcfg = k2_quantization_config()
    qcfg["config_groups"]["group_0"]["weights"].update(weight_changes)
    return qcfg


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(model_type="llama"), "model_type"),
        (dict(topk_method="greedy"), "topk_method"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(num_key_value_heads=8), "num_key_value_heads"),
        (dict(n_group=5), "n_group"),
        (dict(topk_group=2), "topk_group"),
        (dict(rope_scaling={"type": "longrope", "factor": 4.0}), "rope_scaling.rope_type"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 4.0}), "rope_parameters.rope_type"),
        (dict(quantization_config={"quant_method": "fp8", "fmt": "e4m3"}), "quantization_config.quant_method"),
        (dict(quantization_config=dict(k2_quantization_config(), format="float-quantized")),
         "quantization_config.format"),
        (dict(quantization_config=_quant(num_bits=8)), "quantization_config.config_groups.group_0.weights.num_bits"),
        (dict(quantization_config=_quant(symmetric=False)), "weights.symmetric"),
        (dict(quantization_config=_quant(strategy="channel")), "weights.strategy"),
    ],
)
def test_unsupported_values_fail_naming_the_field(changes, field):
    with pytest.raises(UnsupportedConfigError, match=field.replace(".", r"\.")):
        ModelArgs.from_hf_config(_k2(**changes))


def test_missing_routing_field_fails_naming_it():
    cfg = _k2()
    del cfg["norm_topk_prob"]
    with pytest.raises(UnsupportedConfigError, match="missing config field norm_topk_prob"):
        ModelArgs.from_hf_config(cfg)


@pytest.mark.parametrize(
    ("module", "quantized"),
    [
        ("model.layers.1.mlp.experts.0.gate_proj", True),
        ("model.layers.60.mlp.experts.383.down_proj", True),
        ("model.layers.1.mlp.shared_experts.up_proj", False),
        ("model.layers.0.mlp.down_proj", False),
        ("model.layers.3.self_attn.kv_b_proj", False),
        ("lm_head", False),
    ],
)
def test_k2_ignore_list_quantizes_routed_experts_only(module, quantized):
    assert ModelArgs.from_hf_config(_k2()).quantization.is_quantized(module) is quantized
