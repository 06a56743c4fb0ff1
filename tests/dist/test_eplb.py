"""EPLB: replicas go to the hottest experts, every rank gets P / N physical experts, the packing lowers the
max/mean rank load of the load it was computed from, and the placement file round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from k2ray.dist.eplb import main, pack_ranks, rebalance, replicate_experts
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.expert_map import ExpertMap, load_imbalance, rank_loads

# 16 experts, a few very hot (the shape of a skewed workload).
SKEWED = [900, 40, 30, 700, 20, 10, 10, 300, 5, 5, 5, 5, 200, 5, 5, 5]


def test_replicas_go_to_the_most_tokens_per_replica():
    num_replicas = replicate_experts(SKEWED, 20)
    # Tokens per replica of the hottest expert, slot by slot: 900 (e0), 700 (e3), 450 (e0), 350 (e3).
    assert num_replicas == [3, 1, 1, 3] + [1] * 12
    assert replicate_experts([0] * 4, 6) == [2, 2, 1, 1]  # no load: ties to the lowest ids


def test_packing_fills_every_rank_and_avoids_second_copies():
    num_replicas = replicate_experts(SKEWED, 20)
    ranks = pack_ranks(SKEWED, num_replicas, 4)
    assert [len(rank) for rank in ranks] == [5] * 4
    assert sorted(e for rank in ranks for e in rank) == sorted(e for e, n in enumerate(num_replicas) for _ in range(n))
    assert all(len(set(rank)) == len(rank) for rank in ranks)


@pytest.mark.parametrize(("num_ranks", "num_redundant"), [(2, 0), (2, 2), (4, 4), (4, 8)])
def test_rebalance_lowers_the_rank_imbalance(num_ranks, num_redundant):
    load = [SKEWED, list(reversed(SKEWED))]
    placement = rebalance(load, (1, 2), num_ranks, num_redundant)
    assert placement.num_physical_experts == 16 + num_redundant
    identity = rank_loads(torch.tensor(load), num_ranks)
    balanced = rank_loads(physical_load(placement, load), num_ranks)
    assert load_imbalance(balanced) < load_imbalance(identity)
    assert (balanced.sum(1) == identity.sum(1)).all()


def physical_load(placement: ExpertMap, load: list[list[int]]) -> torch.Tensor:
    """Each physical expert's share: its expert's tokens split evenly over the replicas (what the router does)."""
    rows = []
    for row, tokens in zip(placement.physical_to_logical, load, strict=True):
        num_replicas = [row.count(e) for e in range(len(tokens))]
        rows.append([tokens[e] / num_replicas[e] for e in row])
    return torch.tensor(rows)


def test_more_redundant_experts_balance_better():
    load = [SKEWED]
    imbalances = [load_imbalance(rank_loads(physical_load(rebalance(load, (1,), 4, r), load), 4)) for r in (0, 4, 8)]
    assert imbalances[0] > imbalances[1] > imbalances[2]


def test_rebalance_rejects_uneven_slots():
    with pytest.raises(ValueError, match="do not divide by 4 ranks"):
        rebalance([SKEWED], (1,), 4, 2)


def test_cli_writes_a_placement_the_model_accepts(tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"num_running": 0, "expert_load": {"tokens_per_expert": [SKEWED, SKEWED]}}))
    out = tmp_path / "placement.json"
    main([str(stats), "--model", str(tiny_checkpoint_dir()), "--ep-size", "2", "--num-redundant-experts", "2",
          "--out", str(out)])
    placement = ExpertMap.load(out)
    assert placement.num_ranks == 2 and placement.num_redundant_experts == 2 and placement.moe_layer_ids == (1, 2)
    assert placement == rebalance([SKEWED, SKEWED], (1, 2), 2, 2)
