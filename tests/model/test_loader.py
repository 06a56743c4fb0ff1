"""load_model: name table, INT4 handling (dequantized / packed), checkpoint validation, expert-parallel slices."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from k2ray.kernels import dequantize_int4
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.expert_map import ExpertMap, moe_layer_ids
from k2ray.model.loader import CheckpointError, checkpoint_files, load_model, load_model_with_report
from k2ray.model.quantize import quantize_checkpoint

from .hf_checkpoints import make_hf_checkpoint
from .paged_runner import PagedRunner

TOKENS = [3, 17, 5, 90, 41, 8, 66, 23, 11]


def _chunked_then_decode(model, toks=TOKENS, split=5) -> torch.Tensor:
    runner = PagedRunner(model, seed=11)
    outs = [runner.step([("a", toks[:split])])["a"]]
    outs += [runner.step([("a", [t])])["a"] for t in toks[split:]]
    return torch.cat(outs)


@pytest.fixture(scope="module")
def int4_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return quantize_checkpoint(make_hf_checkpoint(root, "k2_like"), root / "int4")


def test_torch_backend_dequantizes_experts_once(int4_ckpt):
    model = load_model(int4_ckpt, dtype=torch.float32)
    experts = model.layers[1].ffn.experts
    assert not experts.packed and experts.w13.dtype == torch.float32
    tensors = load_file(str(int4_ckpt / "model.safetensors"))
    p = "model.layers.1.mlp.experts.5.up_proj."
    up = dequantize_int4(tensors[p + "weight_packed"], tensors[p + "weight_scale"], dtype=torch.float32)
    inter = model.args.moe_intermediate_size
    assert torch.equal(experts.w13[5, inter:], up)
    assert not any(p.requires_grad for p in model.parameters())


def test_packed_experts_match_dequantized(int4_ckpt):
    dense = load_model(int4_ckpt, dtype=torch.float32)
    packed = load_model(int4_ckpt, dtype=torch.float32, pack_experts=True)
    experts = packed.layers[1].ffn.experts
    assert experts.packed and experts.w13_packed.dtype == torch.int32 and experts.w2_scale.dtype == torch.bfloat16
    torch.testing.assert_close(_chunked_then_decode(packed), _chunked_then_decode(dense), atol=1e-5, rtol=1e-5)


def _ep_forward(ckpt, ep_size: int, pack: bool) -> torch.Tensor:
    """Run ep_size expert-parallel workers in threads on the same tokens; their expert_dispatch runs the local
    slice on every token and sums the slices with a barrier all-reduce (k2ray.dist has the all_to_all one)."""
    barrier = threading.Barrier(ep_size)
    partials: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def reducer(rank: int):
        def all_reduce(x, weights, ids, local_experts) -> torch.Tensor:
            partials[rank] = local_experts(x, weights, ids)
            barrier.wait()
            total = sum(partials[r] for r in range(ep_size))
            barrier.wait()  # everyone has read the partials before the next layer overwrites them
            return total

        return all_reduce

    models = [load_model(ckpt, dtype=torch.float32, ep_rank=r, ep_size=ep_size, expert_dispatch=reducer(r),
                         pack_experts=pack) for r in range(ep_size)]

    def worker(rank: int) -> None:
        outputs[rank] = _chunked_then_decode(models[rank])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(ep_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(outputs[0], outputs[ep_size - 1])
    full = models[0].layers[1].ffn.experts
    assert (full.expert_start, full.num_local_experts) == (0, models[0].args.n_routed_experts // ep_size)
    return outputs[0]


@pytest.mark.parametrize("pack", [False, True])
def test_expert_parallel_slices_sum_to_the_full_model(int4_ckpt, pack):
    full = _chunked_then_decode(load_model(int4_ckpt, dtype=torch.float32, pack_experts=pack))
    torch.testing.assert_close(_ep_forward(int4_ckpt, 2, pack), full, atol=1e-5, rtol=1e-5)


def _no_forward(x, weights, ids, local_experts):
    raise AssertionError("these models only load")


def _checkpoint_expert_bytes(ckpt) -> int:
    total = 0
    for path in checkpoint_files(ckpt):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if ".mlp.experts." in name:
                    tensor = f.get_tensor(name)
                    total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("pack", [False, True])
def test_each_ep_rank_reads_and_holds_only_its_own_experts(pack):
    """k2-tiny (16 INT4 experts per MoE layer) over ep_size 1, 2, 4: every rank reads the replicated tensors and
    1/N of the routed experts' bytes, and holds 1/N of the routed expert weights."""
    ckpt = tiny_checkpoint_dir()
    full, full_report = load_model_with_report(ckpt, torch.float32, pack_experts=pack)
    full_held = full.parameter_bytes()
    expert_read = _checkpoint_expert_bytes(ckpt)
    assert full_report.num_tensors_skipped == 0 and full_report.num_bytes_read > expert_read > 0
    for ep_size in (2, 4):
        for rank in range(ep_size):
            model, report = load_model_with_report(ckpt, torch.float32, ep_rank=rank, ep_size=ep_size,
                                                   expert_dispatch=_no_forward, pack_experts=pack)
            held = model.parameter_bytes()
            assert held.replicated == full_held.replicated
            assert held.routed_experts * ep_size == full_held.routed_experts
            assert report.num_bytes_read == full_report.num_bytes_read - expert_read + expert_read // ep_size
            assert report.num_tensors_read + report.num_tensors_skipped == full_report.num_tensors_read


@pytest.mark.parametrize("pack", [False, True])
def test_a_placement_fills_each_slot_with_its_logical_expert(pack):
    ckpt = tiny_checkpoint_dir()
    full = load_model(ckpt, torch.float32, pack_experts=pack)
    args = full.args
    row = (15, 0, 3, 3, 7, 1, 2, 4, 5) + (6, 8, 9, 10, 11, 12, 13, 14, 0)  # experts 3 and 0 twice
    placement = ExpertMap(2, args.n_routed_experts, moe_layer_ids(args), (row,) * len(moe_layer_ids(args)))
    for rank in range(2):
        model, report = load_model_with_report(ckpt, torch.float32, ep_rank=rank, ep_size=2,
                                               expert_dispatch=_no_forward, pack_experts=pack,
                                               ep_placement=placement)
        experts, reference = model.layers[2].ffn.experts, full.layers[2].ffn.experts
        leaves = ("w13_packed", "w13_scale", "w2_packed", "w2_scale") if pack else ("w13", "w2")
        for local, logical in enumerate(row[rank * 9:(rank + 1) * 9]):
            for leaf in leaves:
                assert torch.equal(getattr(experts, leaf)[local], getattr(reference, leaf)[logical])
        assert report.num_tensors_skipped > 0  # the other rank's experts stayed unread


def test_expert_parallel_needs_a_reduce(int4_ckpt):
    with pytest.raises(ValueError, match="expert_dispatch"):
        load_model(int4_ckpt, ep_rank=0, ep_size=2)


def _copy_with(src, dst, config_edit=None, tensor_edit=None):
    shutil.copytree(src, dst)
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensor_edit is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_reported(int4_ckpt, tmp_path):
    bad = _copy_with(int4_ckpt, tmp_path / "bad", tensor_edit=lambda t: t.pop("model.layers.2.self_attn.o_proj.weight"))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(bad)


def test_packed_module_on_the_ignore_list_is_rejected(int4_ckpt, tmp_path):
    def ignore_experts(cfg):
        cfg["quantization_config"]["ignore"].append("re:.*experts.*")

    bad = _copy_with(int4_ckpt, tmp_path / "bad", config_edit=ignore_experts)
    with pytest.raises(CheckpointError, match="stored packed"):
        load_model(bad)


def test_dense_module_that_should_be_quantized_is_rejected(int4_ckpt, tmp_path):
    def unignore_shared(cfg):
        cfg["quantization_config"]["ignore"].remove("re:.*shared_experts.*")

    bad = _copy_with(int4_ckpt, tmp_path / "bad", config_edit=unignore_shared)
    with pytest.raises(CheckpointError, match="stored dense"):
        load_model(bad)


def test_unknown_tensor_is_rejected_but_extra_layers_are_skipped(int4_ckpt, tmp_path):
    extra_layer = _copy_with(int4_ckpt, tmp_path / "mtp", tensor_edit=lambda t: t.update(
        {"model.layers.3.self_attn.o_proj.weight": torch.zeros(2, 2)}))
    load_model(extra_layer)  # num_hidden_layers is 3: layer 3 is a multi-token-prediction layer, not served
    unknown = _copy_with(int4_ckpt, tmp_path / "unknown", tensor_edit=lambda t: t.update(
        {"model.rotary_emb.inv_freq": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(unknown)


def test_dtype_auto_follows_the_config(int4_ckpt):
    model = load_model(int4_ckpt, dtype="auto")  # make_hf_checkpoint's K2-style config says float32
    assert model.embed.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(int4_ckpt, dtype="int8")
