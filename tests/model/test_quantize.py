"""quantize_checkpoint writes what compressed-tensors itself reads and writes (K2 Thinking's INT4 format)."""

from __future__ import annotations

import json

import pytest
import torch
from k2ray.kernels import dequantize_int4, quantize_int4, unpack_int4
from safetensors import safe_open
from torch import nn

from k2ray.model.quantize import K2_QUANTIZATION_CONFIG, k2_quantization_config, quantize_checkpoint

from .hf_checkpoints import make_hf_checkpoint

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
HALF_STEP = 0.5
ROUNDING_EPS = 1e-6  # fp32 division: w / scale may land one ulp past a half step


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    dense = make_hf_checkpoint(root, "k2_like")
    (dense / "tiktoken.model").write_text("dGVzdA== 0\n")
    (dense / "chat_template.jinja").write_text("{{ messages }}")
    return dense, quantize_checkpoint(dense, root / "int4")


def test_compressed_tensors_unpacks_the_same_integers():
    w = _weight(48, 128, 0)
    packed, scale = quantize_int4(w)
    q = unpack_int4(packed)
    theirs = ct_helpers.unpack_from_int32(packed, 4, torch.Size(w.shape))
    assert torch.equal(theirs, q)
    assert torch.equal(ct_helpers.pack_to_int32(q, 4), packed)
    assert int(q.min()) >= -8 and int(q.max()) <= 7


def test_compressed_tensors_quantizes_to_the_same_integers_with_our_scale():
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import quantize

    weights = QuantizationConfig.model_validate(k2_quantization_config()).config_groups["group_0"].weights
    w = _weight(32, 96, 1)
    packed, scale = quantize_int4(w)
    theirs = quantize(x=w, scale=scale, zero_point=None, args=weights, dtype=torch.int8)
    assert torch.equal(theirs, unpack_int4(packed))


def _module_tree(names: list[str], in_features: int, out_features: int) -> nn.Module:
    root = nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(in_features, out_features, bias=False))
    return root


@torch.no_grad()
def test_model_compressor_round_trip_and_ignore_list():
    """compressed-tensors' own path: apply K2's config (ignore list included), compress, decompress."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    names = ["model.layers.1.mlp.experts.3.gate_proj", "model.layers.1.mlp.experts.3.down_proj",
             "model.layers.1.mlp.shared_experts.up_proj", "model.layers.0.mlp.up_proj",
             "model.layers.1.self_attn.o_proj", "lm_head"]
    root = _module_tree(names, 64, 32)
    qconfig = QuantizationConfig.model_validate(k2_quantization_config())
    apply_quantization_config(root, qconfig)
    ours = {}
    for i, name in enumerate(names):
        module = root.get_submodule(name)
        module.weight.copy_(_weight(32, 64, i))
        if hasattr(module, "quantization_scheme"):
            ours[name] = quantize_int4(module.weight.detach())
            module.weight_scale.data = ours[name][1].clone()
    assert sorted(ours) == sorted(names[:2]), "K2's ignore list must leave only routed experts quantized"
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(root)
    for name, (packed, _) in ours.items():
        assert torch.equal(root.get_submodule(name).weight_packed, packed)
    compressor.decompress_model(root)
    for name, (packed, scale) in ours.items():
        decompressed = root.get_submodule(name).weight
        assert torch.equal(decompressed.to(torch.bfloat16), dequantize_int4(packed, scale, dtype=torch.bfloat16))


def test_quantize_checkpoint_layout(quantized):
    dense, int4 = quantized
    config = json.loads((int4 / "config.json").read_text())
    assert config["quantization_config"] == K2_QUANTIZATION_CONFIG
    assert (int4 / "tiktoken.model").read_text() == "dGVzdA== 0\n"
    assert (int4 / "chat_template.jinja").exists()
    with safe_open(str(dense / "model.safetensors"), "pt") as f_dense, safe_open(str(int4 / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in f_dense.keys():  # noqa: SIM118 - safe_open is not a Mapping
            module = name.removesuffix(".weight")
            if ".mlp.experts." in name:
                assert name not in names
                packed, scale = f.get_tensor(module + ".weight_packed"), f.get_tensor(module + ".weight_scale")
                shape = f.get_tensor(module + ".weight_shape")
                out_f, in_f = f_dense.get_tensor(name).shape
                assert (packed.dtype, tuple(packed.shape)) == (torch.int32, (out_f, in_f // 8))
                assert (scale.dtype, tuple(scale.shape)) == (torch.bfloat16, (out_f, in_f // 32))
                assert shape.dtype == torch.int64 and shape.tolist() == [out_f, in_f]
            else:
                assert torch.equal(f.get_tensor(name), f_dense.get_tensor(name)), name


def _error_in_steps(w: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int = 32) -> float:
    """max |w - dequant(q)| / scale over every weight, in units of its group's quantization step."""
    n, k = w.shape
    err = (w.float() - dequantize_int4(packed, scale, group_size, dtype=torch.float32)).abs()
    return float((err.view(n, k // group_size, group_size) / scale.float().unsqueeze(-1)).max())


def test_quantize_int4_rounds_every_weight_to_its_nearest_step():
    # The scale is stored in bf16; a scale rounded down would clamp each group's largest weight.
    for seed in range(4):
        w = _weight(128, 256, seed)
        packed, scale = quantize_int4(w)
        assert _error_in_steps(w, packed, scale) <= HALF_STEP + ROUNDING_EPS


def test_quantize_checkpoint_rounds_every_weight_to_its_nearest_step(quantized):
    dense, int4 = quantized
    with safe_open(str(dense / "model.safetensors"), "pt") as f_dense, safe_open(str(int4 / "model.safetensors"), "pt") as f:
        experts = [n for n in f_dense.keys() if ".mlp.experts." in n]  # noqa: SIM118 - not a Mapping
        assert experts
        worst = max(_error_in_steps(f_dense.get_tensor(name), f.get_tensor(name.removesuffix("weight") + "weight_packed"),
                                    f.get_tensor(name.removesuffix("weight") + "weight_scale")) for name in experts)
    assert worst <= HALF_STEP + ROUNDING_EPS


def test_quantize_checkpoint_refuses_quantized_input(quantized):
    _, int4 = quantized
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(int4, int4.parent / "again")
