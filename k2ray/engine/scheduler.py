from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable

from k2ray.engine.config import DEFAULT_DECODE_RESERVED_SHARE, DEFAULT_KV_LEASE_TIMEOUT_S
from k2ray.engine.kv.kv_cache_manager import KVBlocks, KVCacheManager, cdiv
from k2ray.engine.kv.kv_transfer import KVReservation
from k2ray.engine.outputs import ModelRunnerOutput, NewRequestData, ScheduledSequence, SchedulerOutput
from k2ray.engine.request import Request, RequestStatus
from k2ray.engine.stop_checker import check_stop_token


def _schedule_order(request: Request) -> tuple[int, int]:
    return request.schedule_order


class RequestRejected(ValueError):
    """A request that can never be served (too long for the model or the KV cache)."""


class Scheduler:
    """Continuous batching under a token budget, in vLLM's model.

    Each request has `num_tokens` (prompt + outputs so far) and `num_computed_tokens` (those with
    KV in the cache). A step hands out at most `max_num_batched_tokens` tokens: first to running
    requests, then to waiting requests (after their prefix-cache hits), each getting
    min(num_tokens - num_computed_tokens, what is left) (a decode needs 1, an unfinished prefill its
    next chunk). Prefill chunks and decodes thus share one budget, and chunked prefill and prefix
    caching are the same mechanism. When blocks run out, the last running request is preempted: its
    blocks are freed, its num_computed_tokens reset to 0, and it goes back to the queue to be
    recomputed (prompt + outputs so far).

    Decodes are never starved by a long prefill ahead of them in the queue (a resumed or higher-priority
    256K prompt would otherwise take the whole budget for a hundred steps): with chunked prefill, prefill
    chunks together take at most the budget minus the decodes' reserve, which is one token per running
    decode up to `decode_reserved_share` of the budget. A reserve the decodes do not need goes to prefills.

    Both queues are in `Request.schedule_order`, vLLM's priority policy: lower `priority` first,
    then arrival. So higher-priority requests are admitted first, get the budget first and are
    preempted last (the victim is the lowest-priority, youngest running request); with equal
    priorities this is first-come first-served.

    Disaggregation parks requests that hold blocks but take no steps: a `remote_decode` request
    (prefill role) once its first token is sampled, until `release_prefilled`; a decode-side
    request whose KV is on its way (`reserve_remote_kv`), until `commit_remote_kv` queues it with
    num_computed_tokens = its prompt. An abort frees a parked request's blocks like any other, and
    so does the end of its lease: `kv_lease_timeout_s` after parking, by `clock`.

    A constrained request waits in the queue without holding it up until its grammar is compiled.
    """

    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True,
                 kv_lease_timeout_s: float = DEFAULT_KV_LEASE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 decode_reserved_share: float = DEFAULT_DECODE_RESERVED_SHARE) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.decode_reserved_share = decode_reserved_share
        self.kv_lease_timeout_s = kv_lease_timeout_s
        self.clock = clock
        self.requests: dict[str, Request] = {}
        # Both sorted by schedule_order, first served first.
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.parked: dict[str, Request] = {}
        self._known_to_runner: set[str] = set()
        self._finished_ids: set[str] = set()
        self._num_arrivals = 0
        self.num_preemptions = 0
        self.num_expired_leases = 0

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """max_tokens after defaulting; raises RequestRejected if the request can never fit."""
        if num_prompt_tokens < 1:
            raise RequestRejected("the prompt must contain at least one token")
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise RequestRejected(f"the prompt has {num_prompt_tokens} tokens; this model serves at most "
                                  f"{self.max_model_len} tokens (prompt + output)")
        capacity = self.kv_cache_manager.num_total_blocks * self.kv_cache_manager.block_size
        if max_tokens is None:
            max_tokens = min(self.max_model_len, capacity) - num_prompt_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise RequestRejected(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                                  f"max_model_len ({self.max_model_len})")
        if max_tokens < 1 or cdiv(num_prompt_tokens + max_tokens, self.kv_cache_manager.block_size) \
                > self.kv_cache_manager.num_total_blocks:
            raise RequestRejected(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                                  f"the KV cache capacity ({capacity} tokens)")
        return max_tokens

    def make_request(self, request_id: str, prompt_token_ids: list[int], sampling_params,
                     eos_token_ids: frozenset[int], remote_decode: bool = False) -> Request:
        """Validated request (raises RequestRejected); reads only configuration, so any thread may call it."""
        max_tokens = self.resolve_max_tokens(len(prompt_token_ids), sampling_params.max_tokens)
        return Request(request_id, prompt_token_ids, sampling_params, eos_token_ids, max_tokens, remote_decode)

    def add_request(self, request: Request) -> None:
        self._check_new_id(request.request_id)
        self._num_arrivals += 1
        request.arrival_index = self._num_arrivals
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_schedule_order)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def all_request_ids(self) -> list[str]:
        """Every request holding engine state: scheduled ones and parked ones."""
        return [*self.requests, *self.parked]

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        finished = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None) or self.parked.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                self.waiting.remove(request)
            request.status = status
            self.kv_cache_manager.free(request)
            self._finish(request)
            finished.append(request)
        return finished

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        prefill_budget = budget - self._decode_reserve()
        scheduled: list[ScheduledSequence] = []
        new_requests: list[NewRequestData] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_left = request.num_tokens - request.num_computed_tokens
            num_new = self._num_new_tokens(num_left, budget, prefill_budget)
            if num_new == 0:  # a prefill chunk with the prefill share spent: it waits a step
                index += 1
                continue
            if not self._allocate_or_preempt(request, num_new, preempted):
                break
            prefill_budget -= num_new if num_left > 1 else 0
            scheduled.append(self._schedule_one(request, num_new, new_requests))
            budget -= num_new
            index += 1
        if not preempted:
            budget = self._schedule_waiting(budget, prefill_budget, scheduled, new_requests)
        finished_ids, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(scheduled, new_requests, finished_ids, self.max_num_batched_tokens - budget,
                               frozenset(r.request_id for r in preempted))

    def _decode_reserve(self) -> int:
        """Tokens of this step prefill chunks leave to the running decodes: one each, up to the reserved share
        (and always short of the whole budget, so prefills keep moving)."""
        if not self.enable_chunked_prefill:  # an unchunkable prompt needs the whole budget at once
            return 0
        num_decodes = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        reserve = min(num_decodes, math.ceil(self.decode_reserved_share * self.max_num_batched_tokens))
        return min(reserve, self.max_num_batched_tokens - 1)

    @staticmethod
    def _num_new_tokens(num_left: int, budget: int, prefill_budget: int) -> int:
        """A decode (one token left) draws on the whole budget, a prefill chunk also on the prefill share."""
        return min(num_left, budget) if num_left == 1 else max(0, min(num_left, budget, prefill_budget))

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        while self.kv_cache_manager.allocate_slots(request, num_new) is None:
            # Lowest priority, then youngest: `running` is in schedule order and is walked from the
            # head, so the victim was not scheduled this step (or it is `request` itself).
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, budget: int, prefill_budget: int, scheduled: list[ScheduledSequence],
                          new_requests: list[NewRequestData]) -> int:
        index = 0  # requests ahead of it wait for their grammar: they keep their place
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[index]
            if request.is_waiting_for_grammar:
                index += 1
                continue
            computed_blocks, num_hit = self._lookup_prefix(request)
            num_computed = request.num_computed_tokens + num_hit
            num_new = request.num_tokens - num_computed
            if num_new > budget and not self.enable_chunked_prefill:
                break
            is_prefill, num_new = num_new > 1, self._num_new_tokens(num_new, budget, prefill_budget)
            if num_new == 0:
                break
            if self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks, num_hit) is None:
                break
            del self.waiting[index]
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_computed
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=_schedule_order)
            scheduled.append(self._schedule_one(request, num_new, new_requests))
            budget -= num_new
            prefill_budget -= num_new if is_prefill else 0
        return budget

    def _schedule_one(self, request: Request, num_new: int,
                      new_requests: list[NewRequestData]) -> ScheduledSequence:
        if request.request_id not in self._known_to_runner:
            self._known_to_runner.add(request.request_id)
            new_requests.append(NewRequestData(request.request_id, request.prompt_token_ids,
                                               request.sampling_params, list(request.output_token_ids),
                                               request.grammar))
        start = request.num_computed_tokens
        request.num_computed_tokens += num_new
        return ScheduledSequence(
            request_id=request.request_id, num_computed_tokens=start,
            token_ids=request.all_token_ids[start:start + num_new],
            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
            sample=request.num_computed_tokens == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        request.num_computed_tokens = 0
        # Its arrival index is kept: it goes ahead of every later arrival of its priority.
        bisect.insort(self.waiting, request, key=_schedule_order)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[Request]:
        """Append sampled tokens, finish requests that hit a token-level stop. Returns the requests
        that got a new token this step (finished ones included)."""
        # The step's forward succeeded: the blocks its schedule cached hold their KV.
        self.kv_cache_manager.commit_cached_blocks()
        updated = []
        for request_id, token_id in runner_output.sampled_token_ids.items():
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            request.append_output_token(token_id)
            if request.remote_decode:
                self._park_prefilled(request)
                updated.append(request)
                continue
            status = check_stop_token(request, self.max_model_len)
            if status is not None:
                self.finish_requests([request_id], status)
            updated.append(request)
        return updated

    def _finish(self, request: Request) -> None:
        if request.request_id in self._known_to_runner:
            self._known_to_runner.discard(request.request_id)
            self._finished_ids.add(request.request_id)

    def _lookup_prefix(self, request: Request) -> tuple[KVBlocks | None, int]:
        if request.request_id in self.kv_cache_manager.req_to_blocks:
            # Committed remote KV: its blocks are in the table and counted in num_computed_tokens.
            return None, 0
        return self.kv_cache_manager.get_computed_blocks(request)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self.parked:
            raise ValueError(f"request id {request_id!r} is already in use")

    # ---- disaggregation: prefill side ----

    def _park_prefilled(self, request: Request) -> None:
        del self.requests[request.request_id]
        self.running.remove(request)
        request.status = RequestStatus.FINISHED_PREFILLED
        self._park(request)
        self._finish(request)

    def _park(self, request: Request) -> None:
        request.lease_deadline = self.clock() + self.kv_lease_timeout_s
        self.parked[request.request_id] = request

    def expire_leases(self) -> list[Request]:
        """Fail (FINISHED_ERROR) every parked request whose lease is over and free its blocks."""
        now, expired = self.clock(), []
        # `parked` is in parking order and every lease is equally long: the expired ones lead.
        for request in list(self.parked.values()):
            if request.lease_deadline > now:
                break
            expired.append(request)
        self.num_expired_leases += len(expired)
        return self.finish_requests([r.request_id for r in expired], RequestStatus.FINISHED_ERROR)

    def release_prefilled(self, request_id: str) -> bool:
        """Free a prefilled request's blocks (its KV has been read). False if it is not parked as
        prefilled (already released or aborted)."""
        request = self.parked.get(request_id)
        # By status alone a stop string on the first token (FINISHED_STOPPED) would be missed.
        if request is None or not request.remote_decode:
            return False
        del self.parked[request_id]
        self.kv_cache_manager.free(request)
        return True

    # ---- disaggregation: decode side ----

    def reserve_remote_kv(self, request: Request) -> KVReservation | None:
        """Park `request` with blocks for its prompt: prefix-cache hits first, then blocks the
        caller fills. None (nothing changed) when the pool cannot cover them now."""
        self._check_new_id(request.request_id)
        hits, _ = self.kv_cache_manager.get_computed_blocks(request)
        blocks = self.kv_cache_manager.allocate_for_external(request, request.num_prompt_tokens, hits)
        if blocks is None:
            return None
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self._park(request)
        return KVReservation(request.request_id, tuple(blocks.block_ids), len(hits))

    def commit_remote_kv(self, request_id: str, first_token_id: int | None) -> Request | None:
        """The prompt's KV has landed: cache it, append the first token and queue the request for
        decode (or finish it, if the first token stops it). None if it is not reserved (aborted)."""
        request = self.parked.get(request_id)
        if request is None or request.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
            return None
        if request.num_output_tokens == 0 and first_token_id is None:
            raise ValueError(f"request {request_id!r}: the first token is needed to commit its KV")
        if request.num_output_tokens and first_token_id not in (None, request.output_token_ids[0]):
            raise ValueError(f"request {request_id!r}: first token {first_token_id} differs from the one "
                             f"given at reservation ({request.output_token_ids[0]})")
        del self.parked[request_id]
        self.kv_cache_manager.mark_external_computed(request, request.num_prompt_tokens)
        if request.num_output_tokens == 0:
            request.append_output_token(first_token_id)
        request.status = RequestStatus.WAITING
        self.add_request(request)
        status = check_stop_token(request, self.max_model_len)
        if status is not None:
            self.finish_requests([request_id], status)
        return request
