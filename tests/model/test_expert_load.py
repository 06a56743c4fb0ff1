"""Expert load statistics: the MoE layers count, on the device, exactly the routing an independent top-k of the
router's scores gives; redundant experts (an ExpertMap) keep the output and split a replicated expert's tokens
over its replicas by token index."""

from __future__ import annotations

import pytest
import torch

from k2ray.model.deepseek_v3 import MoE
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.expert_map import ExpertMap, load_imbalance, moe_layer_ids, rank_loads
from k2ray.model.loader import load_model

from .hf_checkpoints import make_hf_checkpoint
from .paged_runner import PagedRunner

GROUP_SCORE_EXPERTS = 2  # noaux_tc ranks a group by the sum of its two best experts


def reference_top_k(moe: MoE, x: torch.Tensor) -> list[list[int]]:
    """noaux_tc's choice written out per token: sigmoid scores + bias, best groups, best experts in them."""
    gate = moe.gate
    choice = (torch.sigmoid(x.double() @ gate.weight.double().T) + gate.e_score_correction_bias.double()).tolist()
    num_experts = len(choice[0])
    per_group = num_experts // gate.n_group
    picks = []
    for row in choice:
        groups = [sorted(row[g * per_group:(g + 1) * per_group], reverse=True) for g in range(gate.n_group)]
        group_scores = [sum(group[:GROUP_SCORE_EXPERTS]) for group in groups]
        best_groups = sorted(range(gate.n_group), key=lambda g: -group_scores[g])[:gate.topk_group]
        candidates = [e for e in range(num_experts) if e // per_group in best_groups]
        picks.append(sorted(candidates, key=lambda e: -row[e])[:gate.top_k])
    return picks


def capture_moe_inputs(model) -> tuple[dict[int, list[torch.Tensor]], list]:
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for layer_id, layer in enumerate(model.layers):
        if isinstance(layer.ffn, MoE):
            inputs[layer_id] = []
            hooks.append(layer.ffn.register_forward_pre_hook(lambda _, a, i=layer_id: inputs[i].append(a[0])))
    return inputs, hooks


STEPS = [[("a", [3, 17, 5, 90, 41, 8]), ("b", [66, 23])], [("a", [11]), ("b", [7]), ("c", list(range(40, 52)))]]


@pytest.fixture(scope="module")
def tiny():
    return load_model(tiny_checkpoint_dir(), dtype=torch.float32)


@pytest.fixture(scope="module", params=["k2-tiny", "grouped_dense2"])
def model(request, tiny, tmp_path_factory):
    if request.param == "k2-tiny":
        return tiny
    return load_model(make_hf_checkpoint(tmp_path_factory.mktemp("grouped"), request.param), dtype=torch.float32)


def test_counts_equal_an_independent_top_k(model):
    inputs, hooks = capture_moe_inputs(model)
    runner = PagedRunner(model)
    model.take_expert_load()
    try:
        for step in STEPS:
            runner.step(step)
    finally:
        for hook in hooks:
            hook.remove()
    load = model.take_expert_load()
    num_tokens = sum(len(toks) for step in STEPS for _, toks in step)
    for row, layer_id in enumerate(moe_layer_ids(model.args)):
        x = torch.cat(inputs[layer_id])
        expected = torch.zeros(model.args.n_routed_experts, dtype=torch.int64)
        for picks in reference_top_k(model.layers[layer_id].ffn, x):
            expected[picks] += 1
        assert torch.equal(load.logical[row], expected), f"layer {layer_id}"
        assert int(expected.sum()) == num_tokens * model.args.num_experts_per_tok
    assert torch.equal(load.physical, load.logical)  # no redundant experts: physical ids are the logical ones
    assert not model.take_expert_load().logical.any()  # the take restarted the count


def test_expert_load_reads_without_restarting(model):
    runner = PagedRunner(model)
    model.take_expert_load()
    runner.step(STEPS[0])
    first = model.expert_load().logical.clone()
    assert first.any() and torch.equal(model.expert_load().logical, first)
    runner.step([("a", [9])])
    assert (model.expert_load().logical.sum(1) == first.sum(1) + model.args.num_experts_per_tok).all()


def replicated_map(args, num_ranks: int, hot: list[int]) -> ExpertMap:
    """Each `hot` expert gets one extra physical expert, appended after the identity ones."""
    row = tuple(range(args.n_routed_experts)) + tuple(hot)
    layer_ids = moe_layer_ids(args)
    return ExpertMap(num_ranks, args.n_routed_experts, layer_ids, tuple(row for _ in layer_ids))


def test_replicas_keep_the_output_and_split_the_tokens(tiny):
    plain, args = tiny, tiny.args
    hot = [0, 5, 9, 12]
    replicated = load_model(tiny_checkpoint_dir(), dtype=torch.float32, ep_placement=replicated_map(args, 1, hot))
    moe = replicated.layers[1].ffn
    for extra, logical in enumerate(hot):  # the replica slots hold the same weights as the expert
        assert torch.equal(moe.experts.w13[args.n_routed_experts + extra], plain.layers[1].ffn.experts.w13[logical])
    expected, got = PagedRunner(plain), PagedRunner(replicated)
    plain.take_expert_load()
    replicated.take_expert_load()
    for step in STEPS:
        out, ref = got.step(step), expected.step(step)
        for seq in ref:
            torch.testing.assert_close(out[seq], ref[seq], atol=1e-5, rtol=1e-5)
    load, ref_load = replicated.take_expert_load(), plain.take_expert_load()
    assert torch.equal(load.logical, ref_load.logical)
    for extra, logical in enumerate(hot):
        first, second = load.physical[:, logical], load.physical[:, args.n_routed_experts + extra]
        # The expert's k-th token of a step takes replica k mod 2: the halves differ by at most one per step.
        assert ((first + second) == ref_load.logical[:, logical]).all()
        assert ((first - second).abs() <= len(STEPS)).all()


def test_a_replicated_experts_tokens_alternate_over_its_replicas(tiny):
    placement = replicated_map(tiny.args, 1, [3])
    moe = load_model(tiny_checkpoint_dir(), dtype=torch.float32, ep_placement=placement).layers[1].ffn
    ids = torch.tensor([[3, 1], [3, 2], [0, 3], [3, 4], [5, 3]])
    assert moe._physical_ids(ids).tolist() == [[3, 1], [16, 2], [0, 3], [16, 4], [5, 3]]


def test_rank_loads_and_imbalance():
    physical = torch.tensor([[4, 0, 2, 2], [1, 1, 1, 1]])  # 2 layers, 2 ranks of 2 physical experts
    per_rank = rank_loads(physical, 2)
    assert per_rank.tolist() == [[4, 4], [2, 2]]
    assert load_imbalance(per_rank) == 1.0
    assert load_imbalance(torch.tensor([[6, 2], [2, 2]])) == (6 + 2) / (4 + 2)
    assert load_imbalance(torch.zeros(2, 4, dtype=torch.int64)) == 1.0


@pytest.mark.parametrize(("change", "match"), [
    (dict(num_ranks=4), "multiple of num_ranks"),
    (dict(physical_to_logical=((0,) * 18, tuple(range(16)) + (0, 1))), "every one of them"),
    (dict(moe_layer_ids=(1,)), "MoE layer ids"),
])
def test_expert_map_rejects_bad_placements(change, match):
    fields = dict(num_ranks=2, n_routed_experts=16, moe_layer_ids=(1, 2),
                  physical_to_logical=(tuple(range(16)) + (0, 1),) * 2) | change
    with pytest.raises(ValueError, match=match):
        ExpertMap(**fields)


def test_model_rejects_a_placement_for_another_group(tiny, tmp_path):
    args = tiny.args
    path = tmp_path / "placement.json"
    replicated_map(args, 2, [0, 1]).save(path)
    assert ExpertMap.load(path) == replicated_map(args, 2, [0, 1])
    with pytest.raises(ValueError, match="for 2 EP ranks, the group has 1"):
        load_model(tiny_checkpoint_dir(), dtype=torch.float32, ep_placement=path)
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a k2ray-expert-placement"):
        ExpertMap.load(path)
