"""One rank of an expert-parallel engine group: an LLMEngine whose MoE layers dispatch over the group, stepped
in lockstep with the other ranks.

Attention is data-parallel: every rank has its own scheduler, requests and latent KV cache, and only the
routed experts are shared, through the all_to_all dispatch each MoE layer calls in every forward. So every
rank must run the same forwards: before each step the ranks agree (one all_to_all of two flags per rank)
whether any of them has work or wants to stop, and a rank whose engine step ran no forward (nothing of its
own to schedule, a grammar still compiling, a step that failed before its forward) runs an empty one, zero
tokens through the dispatch, so the others' collectives complete. A lost rank (EPPeerUnavailable) fails the
whole group: every rank's requests end and the caller tears the rank down.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from k2ray.engine.config import EngineConfig, resolve_device
from k2ray.engine.ep.ep_llm_engine import check_ep_size
from k2ray.engine.errors import EngineStepError
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.runner.model_runner import ModelRunner
from k2ray.engine.outputs import RequestOutput
from k2ray.model.args import ModelArgs
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.deepseek_v3 import LocalExperts
from k2ray.model.expert_map import ExpertMap

from .ep_group import EPGroup, EPGroupSpec, EPPeerUnavailable
from .moe_dispatch import AllToAllDispatch

# The flags each rank sends every other rank before a step: [has_work, wants_stop].
NUM_FLAGS = 2


@dataclass(frozen=True, slots=True)
class GroupAgreement:
    """What the ranks agreed before a step: `is_busy` some rank has work (all step); `is_stopping` some
    rank stops (all stop)."""

    is_busy: bool
    is_stopping: bool


class CountingDispatch:
    """The MoE layers' dispatch, counting its calls: a step whose engine ran no forward shows as no call."""

    def __init__(self, inner: AllToAllDispatch) -> None:
        self.inner = inner
        self.num_calls = 0

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 local_experts: LocalExperts) -> torch.Tensor:
        self.num_calls += 1  # before the call: a forward that failed inside the dispatch still counts
        return self.inner(x, weights, ids, local_experts)


@torch.inference_mode()
def run_empty_forward(runner: ModelRunner) -> None:
    """The model on zero tokens: every MoE layer still takes part in the group's collectives."""
    device = runner.device
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    metadata = AttentionMetadata(
        query_start_loc=torch.zeros(1, dtype=torch.int64, device=device), seq_lens=empty,
        block_tables=torch.zeros(0, 1, dtype=torch.int32, device=device), slot_mapping=empty, num_decodes=0,
        max_seq_len=0, query_start_loc_cpu=(0,), seq_lens_cpu=(), prefill_context_chunk=runner.prefill_context_chunk)
    runner.model(empty, empty, runner.kv_caches, metadata)


class EPEngine:
    """Rank `spec.rank` of an EP group: `engine` is its own LLMEngine (add requests to it as usual); the
    owner's loop calls `agree` before every step and `step` when the group is busy. Not thread-safe."""

    def __init__(self, config: EngineConfig, spec: EPGroupSpec, **engine_kwargs) -> None:
        if spec.world_size != config.ep_size:
            raise ValueError(f"the group has {spec.world_size} ranks, the engine's ep_size is {config.ep_size}")
        check_ep_size(config.model, config.ep_size)
        device = resolve_device(config.device)
        if device.type == "cuda" and device.index is None:  # one GPU per rank, of those the process sees
            device = torch.device("cuda", spec.rank % torch.cuda.device_count())
            config = replace(config, device=str(device))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.group = EPGroup(spec, device, config.ep_timeout_s)
        num_experts = ModelArgs.from_checkpoint(config.model).n_routed_experts
        # An EPLB placement adds redundant experts: the dispatch routes over all physical ones.
        num_redundant = 0 if config.ep_placement is None else ExpertMap.load(config.ep_placement).num_redundant_experts
        self.dispatch = CountingDispatch(AllToAllDispatch(self.group, num_experts, num_redundant))
        self.engine = LLMEngine(config, ep_rank=spec.rank, expert_dispatch=self.dispatch, **engine_kwargs)
        self.group.connect()  # every rank has loaded its experts: meet (bounded by ep_timeout_s)
        self._send_flags = torch.zeros(spec.world_size, NUM_FLAGS, dtype=torch.int64, device=device)
        self._recv_flags = torch.zeros_like(self._send_flags)
        self._failed_ids: list[str] = []  # a step's failed requests, while it finds out whether the group is lost

    @property
    def rank(self) -> int:
        return self.group.rank

    def agree(self, has_work: bool, wants_stop: bool = False) -> GroupAgreement:
        """One collective with every rank (each must call it, once per step); EPPeerUnavailable if one is gone."""
        self._send_flags[:, 0] = int(has_work)
        self._send_flags[:, 1] = int(wants_stop)
        splits = [1] * self.group.world_size
        self.group.all_to_all(self._recv_flags, self._send_flags, splits, splits)
        busy, stopping = self._recv_flags.amax(dim=0).tolist()
        return GroupAgreement(bool(busy), bool(stopping))

    def step(self) -> list[RequestOutput]:
        """The engine's step, with exactly one forward through the group whatever the step did. Raises what
        the engine raises (its requests failed as usual), or EPPeerUnavailable once the group is lost."""
        num_calls = self.dispatch.num_calls
        try:
            outputs = self.engine.step()
        except EngineStepError as exc:
            self._failed_ids.extend(exc.request_ids)  # finished by the engine; fail_all reports them too
            self._complete_step(num_calls)
            self._failed_ids.clear()
            raise
        self._complete_step(num_calls)
        return outputs

    def _complete_step(self, num_calls: int) -> None:
        if not self.group.is_connected:
            raise EPPeerUnavailable(f"EP rank {self.rank}: the group was lost during the step")
        if self.dispatch.num_calls == num_calls:
            run_empty_forward(self.engine.model_runner)

    def fail_all(self) -> list[str]:
        """The group is lost: abort every request on this rank (their blocks freed); their ids."""
        request_ids = self.engine.scheduler.all_request_ids()
        self.engine.abort_requests(request_ids)
        return [*self._failed_ids, *request_ids]

    def shutdown(self) -> None:
        self.engine.shutdown()
        self.group.teardown()
