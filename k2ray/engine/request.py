from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from k2ray.sampling_params import SamplingParams

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Decode side: blocks reserved, latent KV still arriving from a prefill engine.
    WAITING_FOR_REMOTE_KVS = enum.auto()
    # Prefill side: first token sampled, blocks held for the decode engine to read until released.
    FINISHED_PREFILLED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR,
                       RequestStatus.FINISHED_PREFILLED})
# A prefilled request ran out of its one-token share, as in vLLM (the decode engine decides the
# real finish reason, first token included).
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error",
                   RequestStatus.FINISHED_PREFILLED: "length"}


class Request:
    """One single-sequence generation request as the scheduler sees it.

    `all_token_ids` = prompt + outputs so far; `num_computed_tokens` of them have latent KV in the
    cache. `max_tokens` is resolved (never None). `block_hashes` holds the chain hash of each full
    block of `all_token_ids`, extended lazily by the KV cache manager. `remote_decode` requests
    (prefill role) stop after their first token and keep their blocks for a decode engine.
    A constrained request is not scheduled until its compiled `grammar` is set; a parked request
    holds its blocks until `lease_deadline` (engine clock), then it fails and they are freed.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: frozenset[int], max_tokens: int, remote_decode: bool = False) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        # Set by the scheduler on admission. Queues are ordered by (priority, arrival_index), lowest
        # first; preemption picks the highest (lowest priority, then youngest).
        self.arrival_index = 0
        self.priority = sampling_params.priority
        self.max_tokens = max_tokens
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prefix-cache hit tokens of the first admission; a recompute after preemption keeps it.
        self.num_cached_tokens: int | None = None
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_hashes: list[bytes] = []
        self.remote_decode = remote_decode
        self.grammar: CompiledGrammar | None = None
        self.lease_deadline: float | None = None

    @property
    def schedule_order(self) -> tuple[int, int]:
        """Sort key of the waiting and running queues (vLLM's priority policy): first served first."""
        return self.priority, self.arrival_index

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_waiting_for_grammar(self) -> bool:
        return self.sampling_params.structured_output is not None and self.grammar is None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
