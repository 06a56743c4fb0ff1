"""ModelArgs: the DeepSeek-V3-architecture fields of a checkpoint's config.json (Kimi K2 and DeepSeek-V3).

Everything the model needs is parsed and validated here, once, at load time; an unsupported value fails
with a message that names the config field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_ROPE_TYPES = ("default", "yarn")
# transformers' defaults for fields a config may leave out.
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_RMS_NORM_EPS = 1e-6
DEFAULT_YARN_BETA_FAST = 32.0
DEFAULT_YARN_BETA_SLOW = 1.0
PACK_QUANTIZED_FORMAT = "pack-quantized"
# Routing fields whose defaults differ between DeepSeek's and transformers' config classes: never guess them.
MOE_REQUIRED_FIELDS = ("moe_intermediate_size", "num_experts_per_tok", "norm_topk_prob", "routed_scaling_factor")
SUPPORTED_QUANT_BITS = 4


class UnsupportedConfigError(ValueError):
    """A config.json value this implementation does not support; the message names the field."""


def _require(ok: bool, field_name: str, value: Any, expected: str) -> None:
    if not ok:
        raise UnsupportedConfigError(f"unsupported config field {field_name}={value!r}: expected {expected}")


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = DEFAULT_YARN_BETA_FAST
    beta_slow: float = DEFAULT_YARN_BETA_SLOW
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QuantizationArgs:
    """compressed-tensors pack-quantized weight-only INT (K2 Thinking: 4 bits, group 32, symmetric)."""

    num_bits: int
    group_size: int
    ignore: tuple[str, ...]
    targets: tuple[str, ...] = ("Linear",)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def is_quantized(self, module_name: str) -> bool:
        """Whether the Linear `module_name` (HF name, e.g. model.layers.1.mlp.experts.0.up_proj) is packed.

        compressed-tensors semantics: "re:" entries are `re.match`ed (anchored at the start), others compare exactly.
        """
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[len("re:") :], module_name):
                    return False
            elif pattern == module_name:
                return False
        return True


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    # mla
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # moe
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # rope
    rope_theta: float
    rope_scaling: YarnScaling | None
    rope_interleave: bool
    max_position_embeddings: int
    # misc
    rms_norm_eps: float
    tie_word_embeddings: bool
    model_type: str
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str | None = None
    quantization: QuantizationArgs | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one latent cache row: [c_kv | k_pe]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> ModelArgs:
        with open(Path(checkpoint_dir) / "config.json") as f:
            return cls.from_hf_config(json.load(f))

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        _check_supported(cfg)
        heads = cfg["num_attention_heads"]
        n_routed, n_group, topk_group = _parse_moe_groups(cfg)
        rope_theta, rope_scaling = _parse_rope(cfg)
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            intermediate_size=cfg["intermediate_size"],
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            n_routed_experts=n_routed,
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
            first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
            moe_layer_freq=cfg.get("moe_layer_freq") or 1,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            max_position_embeddings=cfg["max_position_embeddings"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=cfg["model_type"],
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            quantization=_parse_quantization(cfg.get("quantization_config")),
        )


def _check_supported(cfg: dict) -> None:
    model_type = cfg.get("model_type")
    _require(model_type in SUPPORTED_MODEL_TYPES, "model_type", model_type, f"one of {SUPPORTED_MODEL_TYPES}")
    checks = (
        ("hidden_act", "silu", ("silu",)),
        ("topk_method", "noaux_tc", ("noaux_tc",)),
        ("scoring_func", "sigmoid", ("sigmoid",)),
        ("attention_bias", False, (False,)),
    )
    for name, default, allowed in checks:
        value = cfg.get(name, default)
        _require(value in allowed, name, value, f"one of {allowed}")
    _require(cfg.get("q_lora_rank") is None or cfg["q_lora_rank"] > 0, "q_lora_rank", cfg.get("q_lora_rank"),
             "a positive int or null")


def _parse_moe_groups(cfg: dict) -> tuple[int, int, int]:
    heads = cfg["num_attention_heads"]
    _require(
        cfg.get("num_key_value_heads", heads) == heads, "num_key_value_heads", cfg.get("num_key_value_heads"),
        f"num_attention_heads ({heads}); MLA has no grouped KV heads",
    )
    n_routed = cfg.get("n_routed_experts") or 0
    n_group = cfg.get("n_group") or 1
    topk_group = cfg.get("topk_group") or n_group
    _require(n_routed % n_group == 0, "n_group", n_group, f"a divisor of n_routed_experts ({n_routed})")
    # A group's score is the sum of its best two experts, so grouped routing needs two per group.
    _require(n_group == 1 or n_routed // n_group >= 2, "n_group", n_group, "at most n_routed_experts / 2")
    _require(1 <= topk_group <= n_group, "topk_group", topk_group, f"1..n_group ({n_group})")
    if n_routed:
        for name in MOE_REQUIRED_FIELDS:
            if cfg.get(name) is None:
                raise UnsupportedConfigError(f"missing config field {name} (required when n_routed_experts > 0)")
    return n_routed, n_group, topk_group


def _parse_rope(cfg: dict) -> tuple[float, YarnScaling | None]:
    """Accepts K2 style (`rope_theta` + `rope_scaling`) and transformers-5 style (`rope_parameters`)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    field_name = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope_type = params.get("rope_type", params.get("type", "default"))
    _require(rope_type in SUPPORTED_ROPE_TYPES, f"{field_name}.rope_type", rope_type,
             f"one of {SUPPORTED_ROPE_TYPES}")
    rope_theta = float(params.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA)))
    if rope_type == "default":
        return rope_theta, None
    original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    original = int(original or cfg["max_position_embeddings"])
    factor = params.get("factor")
    # transformers derives a missing factor from the context extension ratio (DeepSeek-V3 convention).
    factor = float(factor) if factor is not None else cfg["max_position_embeddings"] / original
    return rope_theta, YarnScaling(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or DEFAULT_YARN_BETA_FAST),
        beta_slow=float(params.get("beta_slow") or DEFAULT_YARN_BETA_SLOW),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _parse_quantization(qcfg: dict | None) -> QuantizationArgs | None:
    if not qcfg:
        return None
    prefix = "quantization_config"
    method = qcfg.get("quant_method")
    _require(method == "compressed-tensors", f"{prefix}.quant_method", method, "'compressed-tensors'")
    fmt = qcfg.get("format")
    _require(fmt == PACK_QUANTIZED_FORMAT, f"{prefix}.format", fmt, repr(PACK_QUANTIZED_FORMAT))
    groups = qcfg.get("config_groups") or {}
    _require(len(groups) == 1, f"{prefix}.config_groups", list(groups), "exactly one group")
    name, group = next(iter(groups.items()))
    gp = f"{prefix}.config_groups.{name}"
    _require(group.get("input_activations") is None, f"{gp}.input_activations", group.get("input_activations"),
             "null (weight-only)")
    weights = group.get("weights") or {}
    expected = {"num_bits": (SUPPORTED_QUANT_BITS,), "type": ("int",), "symmetric": (True,),
                "strategy": ("group",), "dynamic": (False, None), "actorder": (None,)}
    for key, allowed in expected.items():
        _require(weights.get(key) in allowed, f"{gp}.weights.{key}", weights.get(key), f"one of {allowed}")
    group_size = weights.get("group_size")
    _require(isinstance(group_size, int) and group_size > 0, f"{gp}.weights.group_size", group_size, "a positive int")
    targets = tuple(group.get("targets") or ())
    _require(targets == ("Linear",), f"{gp}.targets", list(targets), "['Linear']")
    return QuantizationArgs(
        num_bits=weights["num_bits"], group_size=group_size, ignore=tuple(qcfg.get("ignore") or ()),
        targets=targets, raw=qcfg,
    )
