"""Offline INT4 quantization into Kimi K2 Thinking's on-disk format (compressed-tensors pack-quantized W4A16).

Every Linear that K2's ignore list leaves out (that is, the routed experts) becomes
`weight_packed` int32 [N, K / 8] + `weight_scale` bf16 [N, K / group] + `weight_shape` int64 [2];
everything else is copied unchanged. Shards are rewritten one at a time under their own names.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from k2ray.kernels import quantize_int4
from k2ray.kernels.int4_layout import K2_GROUP_SIZE

from .args import ModelArgs, QuantizationArgs
from .loader import INDEX_FILE, MODULE_MAP, checkpoint_files

# K2 Thinking's quantization_config, verbatim apart from group_size (k2_facts §2.1).
K2_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
K2_QUANTIZATION_CONFIG = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": K2_GROUP_SIZE,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": K2_IGNORE,
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
SAFETENSORS_METADATA = {"format": "pt"}
# Files that describe the weights and are rewritten here rather than copied.
REWRITTEN_FILES = {"config.json", INDEX_FILE}
_LINEAR_MODULES = tuple(pattern for pattern, _, is_linear in MODULE_MAP if is_linear)


def k2_quantization_config(group_size: int = K2_GROUP_SIZE) -> dict:
    config = copy.deepcopy(K2_QUANTIZATION_CONFIG)
    config["config_groups"]["group_0"]["weights"]["group_size"] = group_size
    return config


def quantize_state(
    tensors: dict[str, torch.Tensor], quant: QuantizationArgs, linear_patterns: tuple[str, ...] = _LINEAR_MODULES
) -> dict[str, torch.Tensor]:
    """HF-named dense tensors -> the same names with every quantized Linear's `weight` packed."""
    linear = re.compile("|".join(f"(?:{p})" for p in linear_patterns))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or not linear.fullmatch(module) or not quant.is_quantized(module):
            out[name] = tensor
            continue
        if tensor.dim() != 2 or tensor.shape[1] % quant.group_size:
            raise ValueError(f"cannot group-quantize {name} {tuple(tensor.shape)}: in_features must divide by "
                             f"group_size={quant.group_size}")
        packed, scale = quantize_int4(tensor, quant.group_size)
        out[f"{module}.weight_packed"] = packed
        out[f"{module}.weight_scale"] = scale
        out[f"{module}.weight_shape"] = torch.tensor(tuple(tensor.shape), dtype=torch.int64)
    return out


def quantize_checkpoint(src: str | Path, dst: str | Path, group_size: int = K2_GROUP_SIZE) -> Path:
    """Write `src` (a dense bf16/fp16/fp32 K2/DeepSeek-V3 checkpoint) to `dst` in K2 Thinking's INT4 format."""
    src, dst = Path(src), Path(dst)
    with open(src / "config.json") as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized (config.json has quantization_config)")
    config["quantization_config"] = k2_quantization_config(group_size)
    quant = ModelArgs.from_hf_config(config).quantization  # validates the whole config first
    assert quant is not None
    dst.mkdir(parents=True, exist_ok=True)

    weight_map: dict[str, str] = {}
    for path in checkpoint_files(src):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a Mapping
        shard = quantize_state(tensors, quant)
        save_file(shard, str(dst / path.name), metadata=SAFETENSORS_METADATA)
        weight_map |= dict.fromkeys(shard, path.name)

    if (src / INDEX_FILE).exists():
        total = sum((dst / name).stat().st_size for name in set(weight_map.values()))
        with open(dst / INDEX_FILE, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(dst / "config.json", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    for extra in sorted(src.iterdir()):
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in REWRITTEN_FILES:
            shutil.copy2(extra, dst / extra.name)
    return dst
