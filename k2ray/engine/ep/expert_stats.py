"""Expert load statistics of an engine: what its stats call reports about the routed experts.

Each EP rank counts the routing of its own tokens (to every rank's experts), so a replica's load is the sum
of its ranks' reports (`ExpertLoadStats.merge`). Totals are cumulative since the engine started; whoever
exports them as counters takes the growth between readings. `tokens_per_expert` is what an EPLB placement
is computed from (k2ray.dist.eplb); per-rank tokens and their max/mean imbalance are the compact view at K2
scale (60 MoE layers x 384 experts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from k2ray.model.deepseek_v3 import ExpertLoad
from k2ray.model.expert_map import load_imbalance, rank_loads


@dataclass(frozen=True, slots=True)
class ExpertLoadStats:
    """Tokens (token x top-k slot) routed since start: [MoE layer][logical expert] and [MoE layer][EP rank];
    `rank_imbalance` is the layers' summed max rank load over their summed mean (1.0 = balanced)."""

    tokens_per_expert: tuple[tuple[int, ...], ...]
    tokens_per_rank: tuple[tuple[int, ...], ...]
    rank_imbalance: float

    @classmethod
    def from_load(cls, load: ExpertLoad, ep_size: int) -> ExpertLoadStats:
        per_rank = rank_loads(load.physical, ep_size)
        return cls(_rows(load.logical), _rows(per_rank), load_imbalance(per_rank))

    @classmethod
    def merge(cls, reports: Sequence[ExpertLoadStats]) -> ExpertLoadStats:
        """The EP group's load: the sum of its ranks' reports."""
        if not reports:
            raise ValueError("no expert load reports to merge")
        per_expert = sum(torch.tensor(r.tokens_per_expert, dtype=torch.int64) for r in reports)
        per_rank = sum(torch.tensor(r.tokens_per_rank, dtype=torch.int64) for r in reports)
        return cls(_rows(per_expert), _rows(per_rank), load_imbalance(per_rank))

    @property
    def num_tokens_per_expert(self) -> list[int]:
        """Summed over the MoE layers (what ExpertMetrics.record takes, as growth between reports)."""
        return [sum(column) for column in zip(*self.tokens_per_expert, strict=True)]


def _rows(counts: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(row) for row in counts.tolist())
