"""Expert-parallel load balancing (EPLB): a redundant-expert placement from recorded expert load.

DeepSeek's EPLB, global policy (github.com/deepseek-ai/EPLB, `rebalance_experts` with one node group), per
MoE layer:
    1. replicate: start from one physical expert per logical one; each of the R redundant slots goes to
       the expert with the most tokens per replica so far;
    2. pack: physical experts, heaviest first (load = the expert's tokens / its replicas), each to the least
       loaded rank that still has a free slot, every rank taking exactly P / N. Unlike the reference, a rank
       already holding a replica of the same expert is passed over while another has room: a second copy on
       one rank takes no load off it.
Within a rank the slots are ordered by logical id. `python -m k2ray.dist.eplb` turns an engine's stats
(`expert_load.tokens_per_expert`) into a placement file for `ep_placement`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from k2ray.model.args import ModelArgs
from k2ray.model.expert_map import ExpertMap, moe_layer_ids


def replicate_experts(expert_tokens: Sequence[int], num_physical_experts: int) -> list[int]:
    """Tokens per logical expert [E] -> replicas per logical expert [E], summing to num_physical_experts."""
    num_replicas = [1] * len(expert_tokens)
    for _ in range(num_physical_experts - len(expert_tokens)):
        # Ties go to the fewest replicas, then the lowest id: a layer without load still gets a spread,
        # deterministic placement.
        hottest = max(range(len(expert_tokens)),
                      key=lambda e: (expert_tokens[e] / num_replicas[e], -num_replicas[e], -e))
        num_replicas[hottest] += 1
    return num_replicas


def pack_ranks(expert_tokens: Sequence[int], num_replicas: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Spread the physical experts over the ranks, P / N each, balancing tokens: each rank's logical ids."""
    items = [(expert_tokens[e] / count, e) for e, count in enumerate(num_replicas) for _ in range(count)]
    items.sort(key=lambda item: (-item[0], item[1]))
    slots_per_rank = len(items) // num_ranks
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0.0] * num_ranks
    for load, expert in items:
        has_room = [r for r in range(num_ranks) if len(ranks[r]) < slots_per_rank]
        without_copy = [r for r in has_room if expert not in ranks[r]]
        rank = min(without_copy or has_room, key=lambda r: (loads[r], r))
        ranks[rank].append(expert)
        loads[rank] += load
    return [sorted(experts) for experts in ranks]


def rebalance(
    expert_tokens: Sequence[Sequence[int]], layer_ids: Sequence[int], num_ranks: int, num_redundant_experts: int
) -> ExpertMap:
    """Tokens per (MoE layer, logical expert) [L, E] -> a placement of E + R physical experts over N ranks."""
    if num_redundant_experts < 0:
        raise ValueError(f"num_redundant_experts must be non-negative, got {num_redundant_experts}")
    if len(expert_tokens) != len(layer_ids):
        raise ValueError(f"load for {len(expert_tokens)} MoE layers, {len(layer_ids)} layer ids")
    n_experts = len(expert_tokens[0]) if expert_tokens else 0
    num_physical = n_experts + num_redundant_experts
    if num_physical % num_ranks:
        raise ValueError(f"{n_experts} experts + {num_redundant_experts} redundant do not divide by {num_ranks} ranks")
    rows = []
    for tokens in expert_tokens:
        ranks = pack_ranks(tokens, replicate_experts(tokens, num_physical), num_ranks)
        rows.append(tuple(expert for rank in ranks for expert in rank))
    return ExpertMap(num_ranks, n_experts, tuple(layer_ids), tuple(rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="EPLB: an expert placement (ep_placement) from expert load stats")
    parser.add_argument("stats", type=Path, help="an engine's stats as JSON: its expert_load.tokens_per_expert "
                                                 "[MoE layer][expert] (or an EP group's, merged)")
    parser.add_argument("--model", required=True, help="the checkpoint directory (for its MoE layers)")
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--num-redundant-experts", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    stats = json.loads(args.stats.read_text())
    expert_tokens = stats.get("expert_load", stats)["tokens_per_expert"]
    layer_ids = moe_layer_ids(ModelArgs.from_checkpoint(args.model))
    rebalance(expert_tokens, layer_ids, args.ep_size, args.num_redundant_experts).save(args.out)


if __name__ == "__main__":
    main()
