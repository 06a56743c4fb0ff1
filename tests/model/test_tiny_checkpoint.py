"""The embedded k2-tiny checkpoint: reproducible from its seed, K2's format, loads and runs on every path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from k2ray.kernels import HAS_TRITON
from safetensors import safe_open

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.loader import checkpoint_files, load_model
from k2ray.model.quantize import K2_QUANTIZATION_CONFIG
from k2ray.model.tiny_checkpoint import DEFAULT_SEED, write_tiny_checkpoint

from .paged_runner import PagedRunner

MAX_CHECKPOINT_BYTES = 4 * 2**20
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def test_shipped_checkpoint_is_reproducible(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "tiny", DEFAULT_SEED)
    for name in WEIGHT_FILES:
        assert (out / name).read_bytes() == (tiny_checkpoint_dir() / name).read_bytes(), (
            f"{name} differs: regenerate with `python -m k2ray.model.tiny_checkpoint`"
        )


def test_shipped_checkpoint_has_the_contract_config():
    ckpt = tiny_checkpoint_dir()
    cfg = json.loads((ckpt / "config.json").read_text())
    expected = dict(model_type="kimi_k2", vocab_size=768, hidden_size=128, num_hidden_layers=3,
                    first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=256,
                    moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                    n_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                    routed_scaling_factor=2.827, max_position_embeddings=262144, bos_token_id=512, eos_token_id=514)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["rope_scaling"]["factor"] == 64.0 and cfg["rope_scaling"]["original_max_position_embeddings"] == 4096
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["quantization_config"] == K2_QUANTIZATION_CONFIG
    assert sum(p.stat().st_size for p in checkpoint_files(ckpt)) < MAX_CHECKPOINT_BYTES


def test_shipped_checkpoint_stores_k2_tensors():
    names: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(tiny_checkpoint_dir()):
        with safe_open(str(path), "pt") as f:
            names |= {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    assert names["model.layers.1.mlp.experts.15.down_proj.weight_packed"].dtype == torch.int32
    assert names["model.layers.2.mlp.experts.0.gate_proj.weight_scale"].dtype == torch.bfloat16
    assert names["model.layers.1.mlp.shared_experts.up_proj.weight"].dtype == torch.bfloat16
    assert names["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    bias = names["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bool((bias != 0).all())
    assert not any(".experts." in n and n.endswith(".weight") for n in names)


def test_shipped_checkpoint_generates_in_bf16():
    model = load_model(tiny_checkpoint_dir())  # dtype auto -> bfloat16
    assert model.embed.weight.dtype == torch.bfloat16
    runner = PagedRunner(model)
    token = 512
    out = []
    logits = runner.step([("a", [token, 515, 65, 66])])["a"]
    for _ in range(6):
        token = int(logits[-1].argmax())
        out.append(token)
        logits = runner.step([("a", [token])])["a"]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert len(set(out)) > 1, "a random model should not collapse to one token"


_TRITON_SCRIPT = """
import sys, torch
sys.path.insert(0, {helpers!r})
from paged_runner import PagedRunner
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.loader import load_model

def run(backend):
    model = load_model(tiny_checkpoint_dir(), dtype=torch.float32, kernel_backend=backend)
    runner = PagedRunner(model, seed=5)
    toks = list(range(100, 112))
    outs = [runner.step([("a", toks[:5])])["a"], runner.step([("b", toks[:3])])["b"]]
    outs += [torch.cat(list(runner.step([("a", [t]), ("b", [t])]).values())) for t in toks[5:]]
    return torch.cat(outs), model.layers[1].ffn.experts.packed

ref, _ = run("torch")
out, packed = run("triton")
assert packed, "triton backend should keep INT4 experts packed"
torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
print("max diff", (out - ref).abs().max().item())
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check; GPU runs use the kernels' own tests")
def test_triton_backend_matches_torch_under_the_interpreter():
    """kernel_backend="triton" end to end (store_latent_kv, mla_decode_attention, fused_moe_int4) on CPU via
    TRITON_INTERPRET=1, in a child process because the variable must be set before triton is imported."""
    script = _TRITON_SCRIPT.format(helpers=str(Path(__file__).parent))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.gpu
def test_triton_backend_matches_torch_on_cuda():
    """bf16 on the GPU: compiled kernels vs the torch references, same weights and cache layout."""
    toks = list(range(100, 112))

    def run(backend: str) -> torch.Tensor:
        model = load_model(tiny_checkpoint_dir(), dtype=torch.bfloat16, device="cuda", kernel_backend=backend)
        runner = PagedRunner(model, seed=5)
        outs = [runner.step([("a", toks[:5])])["a"]]
        outs += [runner.step([("a", [t])])["a"] for t in toks[5:]]
        return torch.cat(outs)

    ref, out = run("torch"), run("triton")
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
