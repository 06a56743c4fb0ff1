"""The logical -> physical routed-expert map of an EP group: redundant experts (EPLB placements).

An EP group of N ranks holds P = E + R physical experts per MoE layer (E logical, R redundant), P / N per
rank: rank r holds physical ids [r * P / N, (r + 1) * P / N). Physical expert p runs logical expert
`physical_to_logical[layer][p]`; a logical expert held by several physical experts is replicated, and the
router splits its tokens across the replicas by token index (`replica_tables`). Saved as JSON and loaded
with `ep_placement: FILE`; k2ray.dist.eplb computes one from the engine's expert load statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .args import ModelArgs

PLACEMENT_FORMAT = "k2ray-expert-placement"
PLACEMENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ExpertMap:
    """`physical_to_logical[i]` is MoE layer `moe_layer_ids[i]`'s map, P entries each."""

    num_ranks: int
    n_routed_experts: int
    moe_layer_ids: tuple[int, ...]
    physical_to_logical: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be at least 1, got {self.num_ranks}")
        if len(self.moe_layer_ids) != len(self.physical_to_logical):
            raise ValueError(f"{len(self.moe_layer_ids)} MoE layer ids for {len(self.physical_to_logical)} maps")
        num_physical = self.num_physical_experts
        if num_physical < self.n_routed_experts or num_physical % self.num_ranks:
            raise ValueError(f"{num_physical} physical experts: need at least n_routed_experts="
                             f"{self.n_routed_experts}, a multiple of num_ranks={self.num_ranks}")
        for layer_id, row in zip(self.moe_layer_ids, self.physical_to_logical, strict=True):
            if len(row) != num_physical:
                raise ValueError(f"layer {layer_id}: {len(row)} physical experts, expected {num_physical}")
            if set(row) != set(range(self.n_routed_experts)):
                raise ValueError(f"layer {layer_id}: physical experts must hold logical ids in [0, "
                                 f"{self.n_routed_experts}), every one of them at least once")

    @property
    def num_physical_experts(self) -> int:
        return len(self.physical_to_logical[0]) if self.physical_to_logical else self.n_routed_experts

    @property
    def num_redundant_experts(self) -> int:
        return self.num_physical_experts - self.n_routed_experts

    @property
    def num_local_experts(self) -> int:
        return self.num_physical_experts // self.num_ranks

    @classmethod
    def identity(cls, args: ModelArgs, num_ranks: int) -> ExpertMap:
        """No redundant experts: physical id = logical id (the contiguous E / N slices)."""
        layer_ids = moe_layer_ids(args)
        row = tuple(range(args.n_routed_experts))
        return cls(num_ranks, args.n_routed_experts, layer_ids, tuple(row for _ in layer_ids))

    def layer(self, layer_id: int) -> tuple[int, ...]:
        return self.physical_to_logical[self.moe_layer_ids.index(layer_id)]

    def check_matches(self, args: ModelArgs, ep_size: int) -> None:
        """Raise ValueError unless the map was made for this model and group size."""
        if self.num_ranks != ep_size:
            raise ValueError(f"the expert placement is for {self.num_ranks} EP ranks, the group has {ep_size}")
        if self.n_routed_experts != args.n_routed_experts:
            raise ValueError(f"the expert placement has {self.n_routed_experts} logical experts, the model "
                             f"{args.n_routed_experts}")
        if self.moe_layer_ids != moe_layer_ids(args):
            raise ValueError(f"the expert placement's MoE layers {list(self.moe_layer_ids)} are not the model's "
                             f"{list(moe_layer_ids(args))}")

    def rank_of(self, physical_id: int) -> int:
        return physical_id // self.num_local_experts

    def to_json(self) -> dict:
        return {"format": PLACEMENT_FORMAT, "version": PLACEMENT_VERSION, "num_ranks": self.num_ranks,
                "n_routed_experts": self.n_routed_experts, "moe_layer_ids": list(self.moe_layer_ids),
                "physical_to_logical": [list(row) for row in self.physical_to_logical]}

    @classmethod
    def from_json(cls, data: dict) -> ExpertMap:
        if data.get("format") != PLACEMENT_FORMAT or data.get("version") != PLACEMENT_VERSION:
            raise ValueError(f"not a {PLACEMENT_FORMAT} v{PLACEMENT_VERSION} file (format={data.get('format')!r}, "
                             f"version={data.get('version')!r})")
        try:
            return cls(int(data["num_ranks"]), int(data["n_routed_experts"]),
                       tuple(int(i) for i in data["moe_layer_ids"]),
                       tuple(tuple(int(e) for e in row) for row in data["physical_to_logical"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed expert placement: {exc!r}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> ExpertMap:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read expert placement {path}: {exc}") from exc
        return cls.from_json(data)


def moe_layer_ids(args: ModelArgs) -> tuple[int, ...]:
    return tuple(layer for layer in range(args.num_hidden_layers) if args.is_moe_layer(layer))


def replica_tables(physical_to_logical: tuple[int, ...], n_routed_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's replicas: (table int64 [E, max replicas], num_replicas int64 [E]); row e lists e's physical
    ids ascending, padded with its first (a padded entry is never chosen: the router picks index < count)."""
    replicas: list[list[int]] = [[] for _ in range(n_routed_experts)]
    for physical, logical in enumerate(physical_to_logical):
        replicas[logical].append(physical)
    width = max(len(ids) for ids in replicas)
    table = torch.tensor([ids + [ids[0]] * (width - len(ids)) for ids in replicas], dtype=torch.int64)
    return table, torch.tensor([len(ids) for ids in replicas], dtype=torch.int64)


def rank_loads(physical_counts: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[layers, P] tokens per physical expert -> [layers, N] tokens per rank (physical ids are rank-major)."""
    num_layers, num_physical = physical_counts.shape
    return physical_counts.view(num_layers, num_ranks, num_physical // num_ranks).sum(-1)


def load_imbalance(rank_tokens: torch.Tensor) -> float:
    """[layers, N] tokens per rank -> the layers' summed max rank load over their summed mean rank load.

    Each MoE layer waits for its busiest rank, so this is the MoE time spent over the balanced time;
    1.0 is perfect balance (and what a group with no tokens yet reports)."""
    total_mean = rank_tokens.double().mean(-1).sum().item()
    if total_mean == 0:
        return 1.0
    return rank_tokens.double().amax(-1).sum().item() / total_mean
