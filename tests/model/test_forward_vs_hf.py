"""Our Transformer (paged latent cache, absorbed decode, chunked prefill) vs transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from k2ray.model.loader import load_model
from k2ray.model.quantize import quantize_checkpoint

from .hf_checkpoints import TINY_CONFIGS, hf_logits, load_hf_reference, make_hf_checkpoint
from .paged_runner import PagedRunner

# transformers warns about the zero-width shared expert it builds for n_shared_experts=0.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

ATOL = RTOL = 1e-4
LEN_A, LEN_B = 11, 9


def _tokens(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def case(request, tmp_path_factory):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("hf"), request.param)
    hf = load_hf_reference(ckpt)
    vocab = hf.config.vocab_size
    seqs = {"a": _tokens(vocab, LEN_A, 1), "b": _tokens(vocab, LEN_B, 2)}
    refs = {name: hf_logits(hf, toks) for name, toks in seqs.items()}
    return load_model(ckpt, dtype=torch.float32), seqs, refs


def test_single_prefill_matches_hf(case):
    model, seqs, refs = case
    out = PagedRunner(model).step([("a", seqs["a"])])["a"]
    torch.testing.assert_close(out, refs["a"], atol=ATOL, rtol=RTOL)


def test_chunked_prefill_and_batched_decode_match_hf(case):
    """Two sequences through scattered 4-token blocks: prefill chunks that attend to cached context,
    decodes batched ahead of another sequence's prefill chunk, then decodes of both."""
    model, seqs, refs = case
    a, b = seqs["a"], seqs["b"]
    runner = PagedRunner(model, num_blocks=16, block_size=4, seed=7)
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def run(batch):
        for name, logits in runner.step(batch).items():
            got[name].append(logits)

    run([("a", a[:3]), ("b", b[:2])])  # two fresh prefill chunks in one step
    run([("a", a[3:6])])  # chunk with 3 cached tokens, crossing a block boundary
    run([("a", [a[6]]), ("b", b[2:5])])  # a decodes while b's chunk attends to its 2 cached tokens
    run([("a", [a[7]]), ("b", b[5:7])])
    for i in range(8, LEN_A):
        j = i - 1
        run([("a", [a[i]]), ("b", [b[j]])] if j < LEN_B else [("a", [a[i]])])
    for name in ("a", "b"):
        out = torch.cat(got[name])
        torch.testing.assert_close(out, refs[name][: out.shape[0]], atol=ATOL, rtol=RTOL)
    assert runner.tables["a"] != sorted(runner.tables["a"]), "blocks should be non-contiguous"


def _zero_bias(gate) -> None:
    gate.e_score_correction_bias.zero_()


def _no_group_limit(gate) -> None:
    gate.n_group = gate.topk_group = 1


@pytest.mark.parametrize(("config", "ablate"), [("k2_like", _zero_bias), ("grouped_dense2", _no_group_limit)])
def test_comparison_is_sensitive_to_routing_details(tmp_path, config, ablate):
    """Dropping the selection bias or the group limit moves the logits far beyond the tolerance, so the
    HF comparisons above really exercise them."""
    model = load_model(make_hf_checkpoint(tmp_path, config), dtype=torch.float32)
    toks = _tokens(model.args.vocab_size, LEN_A, 1)
    before = PagedRunner(model).step([("a", toks)])["a"]
    for layer in model.layers:
        if hasattr(layer.ffn, "gate"):
            ablate(layer.ffn.gate)
    after = PagedRunner(model).step([("a", toks)])["a"]
    assert (before - after).abs().max() > 100 * ATOL


def _dequantized_hf_reference(dense_ckpt, int4_ckpt):
    """transformers model whose routed experts hold compressed-tensors' decompression of our INT4 tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    hf = load_hf_reference(dense_ckpt)
    group = json.loads((int4_ckpt / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    group_size = group["weights"]["group_size"]
    with safe_open(str(int4_ckpt / "model.safetensors"), framework="pt") as f, torch.no_grad():
        for layer_id, layer in enumerate(hf.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            inter = experts.down_proj.shape[-1]
            for e in range(experts.gate_up_proj.shape[0]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    p = f"model.layers.{layer_id}.mlp.experts.{e}.{proj}."
                    shape = f.get_tensor(p + "weight_shape")
                    q = unpack_from_int32(f.get_tensor(p + "weight_packed"), 4, torch.Size(shape.tolist()))
                    scale = f.get_tensor(p + "weight_scale").float().repeat_interleave(group_size, dim=1)
                    w = q.float() * scale
                    if proj == "down_proj":
                        experts.down_proj[e] = w
                    else:
                        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                        experts.gate_up_proj[e, rows] = w
    return hf


def test_int4_checkpoint_matches_hf_with_dequantized_experts(tmp_path):
    dense = make_hf_checkpoint(tmp_path, "k2_like")
    int4 = quantize_checkpoint(dense, tmp_path / "int4")
    hf = _dequantized_hf_reference(dense, int4)
    model = load_model(int4, dtype=torch.float32)
    toks = _tokens(model.args.vocab_size, LEN_A, 3)
    ref = hf_logits(hf, toks)
    runner = PagedRunner(model)
    out = torch.cat([runner.step([("a", toks[:6])])["a"]] + [runner.step([("a", [t])])["a"] for t in toks[6:]])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    # And the INT4 model really differs from the dense one (the experts were quantized).
    dense_out = PagedRunner(load_model(dense, dtype=torch.float32)).step([("a", toks)])["a"]
    assert (dense_out - out).abs().max() > 100 * ATOL


def test_bf16_model_tracks_fp32(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path, "k2_like")
    toks = _tokens(96, LEN_A, 4)
    fp32 = PagedRunner(load_model(ckpt, dtype=torch.float32)).step([("a", toks)])["a"]
    bf16_model = load_model(ckpt, dtype="bfloat16")
    runner = PagedRunner(bf16_model)
    bf16 = torch.cat([runner.step([("a", toks[:4])])["a"]] + [runner.step([("a", [t])])["a"] for t in toks[4:]])
    assert bf16.dtype == torch.float32 and bf16_model.layers[1].ffn.gate.weight.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()
