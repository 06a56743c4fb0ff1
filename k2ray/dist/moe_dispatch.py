"""All-to-all MoE dispatch over an EP group: the model's ExpertDispatch (k2ray.model.deepseek_v3).

Routed experts are sharded contiguously, P / N per rank, in physical ids: P = E without redundant experts,
E + num_redundant_experts with an EPLB placement (the model maps logical ids to physical ones before the
dispatch, k2ray.model.expert_map). For each MoE layer every rank
    1. picks, per token, the ranks that own at least one of its top-k experts: one row per (token, rank);
    2. exchanges the per-destination row counts (all_to_all_single of N counts);
    3. sends each row's hidden state, and its top-k ids and weights packed as one int32 tensor, to that
       rank (a token whose experts share a rank travels there once);
    4. runs its local experts on the rows it received (foreign ids in a row contribute nothing), so each
       row comes back as that rank's weighted partial sum;
    5. sends the partial sums back with the reverse all_to_all and adds them up per token.
The router's weights already carry routed_scaling_factor, so the sum is the routed output. Attention is
data-parallel: the ranks' token counts differ, and a rank with none still takes part with empty rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2ray.model.deepseek_v3 import LocalExperts

from .ep_group import EPGroup


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """Where this rank's rows go: row r is token `token_ids[r]`, bound for a rank in rank order."""

    token_ids: torch.Tensor  # int64 [S]
    send_splits: list[int]  # rows to each rank [N]
    recv_splits: list[int]  # rows from each rank [N]


class AllToAllDispatch:
    """One rank's dispatcher, shared by all MoE layers of its model (they call it in the same order)."""

    def __init__(self, group: EPGroup, n_routed_experts: int, num_redundant_experts: int = 0) -> None:
        num_physical = n_routed_experts + num_redundant_experts
        if num_physical % group.world_size:
            raise ValueError(f"n_routed_experts={n_routed_experts} + num_redundant_experts={num_redundant_experts} "
                             f"does not divide by the EP group's {group.world_size} ranks")
        self.group = group
        self.num_local_experts = num_physical // group.world_size
        # Rows this rank sent and received since it was built, for the bytes-moved accounting.
        self.num_sent_rows = 0
        self.num_received_rows = 0

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, local_experts: LocalExperts
    ) -> torch.Tensor:
        plan = self.plan(ids)
        recv_x = self._exchange(x[plan.token_ids], plan.recv_splits, plan.send_splits)
        # Ids and float32 weights travel as one int32 tensor [S, 2A]: one collective fewer per layer.
        routing = torch.cat([ids.to(torch.int32), weights.to(torch.float32).view(torch.int32)], dim=1)
        recv_routing = self._exchange(routing[plan.token_ids], plan.recv_splits, plan.send_splits)
        top_k = ids.shape[1]
        recv_ids = recv_routing[:, :top_k].to(torch.int64)
        recv_weights = recv_routing[:, top_k:].contiguous().view(torch.float32)
        partial = local_experts(recv_x, recv_weights, recv_ids)  # [R, D]
        back = self._exchange(partial.contiguous(), plan.send_splits, plan.recv_splits)  # [S, D]
        out = torch.zeros_like(x)
        out.index_add_(0, plan.token_ids, back.to(out.dtype))
        self.num_sent_rows += len(plan.token_ids)
        self.num_received_rows += sum(plan.recv_splits)
        return out

    def plan(self, ids: torch.Tensor) -> DispatchPlan:
        """ids [T, A] global physical expert ids -> the rows to send, and (one collective) the rows to receive."""
        world = self.group.world_size
        dest_ranks = ids // self.num_local_experts  # [T, A]
        is_bound = torch.zeros(ids.shape[0], world, dtype=torch.bool, device=ids.device)
        is_bound.scatter_(1, dest_ranks, True)  # [T, N]: token t has an expert on rank r
        rank_ids, token_ids = torch.where(is_bound.T)  # rank-major, so rows leave in rank order
        send_counts = is_bound.sum(0)  # int64 [N]
        recv_counts = torch.empty_like(send_counts)
        self.group.all_to_all(recv_counts, send_counts, [1] * world, [1] * world)
        # The split sizes are host lists for all_to_all_single: one host sync per layer.
        return DispatchPlan(token_ids, send_counts.tolist(), recv_counts.tolist())

    def _exchange(self, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
        self.group.all_to_all(out, rows.contiguous(), recv_splits, send_splits)
        return out
