"""Per-key limits over a sliding minute: requests, tokens (reserved at admission, corrected at the end),
concurrent requests, and a budget that no admitted request can overrun.

`RateLimiter` is plain Python with one clock; the router replicas share one instance inside a named Ray
actor (limits_actor.py), so every limit holds for the deployment, never per replica.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

WINDOW_S = 60.0  # requests/min and tokens/min are counted over the last minute
MIN_RETRY_AFTER_S = 1

Refusal = Literal["requests", "tokens", "concurrency", "budget", "budget_request"]


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    budget_pico_usd: int | None = None

    @property
    def is_unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.concurrency is None and self.budget_pico_usd is None


@dataclass(frozen=True)
class Reservation:
    """What a request asks for at admission: its prompt + max_tokens, and its worst-case cost."""

    key_id: str
    limits: KeyLimits
    num_tokens: int
    max_cost_pico_usd: int


@dataclass(frozen=True)
class Decision:
    """The admission verdict with the counts the x-ratelimit-* headers report (after this request)."""

    admission_id: str | None  # None: refused
    refusal: Refusal | None = None
    retry_after_s: int | None = None
    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    spent_pico_usd: int = 0
    budget_pico_usd: int | None = None

    @property
    def is_admitted(self) -> bool:
        return self.admission_id is not None


@dataclass
class _Admitted:
    key_id: str
    admitted_at: float
    num_tokens: int
    max_cost_pico_usd: int


@dataclass
class _KeyState:
    spent_pico_usd: int
    request_times: deque[float] = field(default_factory=deque)
    # admission id -> its admission, oldest first; entries past the window are dropped
    token_entries: OrderedDict[str, _Admitted] = field(default_factory=OrderedDict)
    num_inflight: int = 0
    reserved_pico_usd: int = 0

    def prune(self, now: float) -> None:
        horizon = now - WINDOW_S
        while self.request_times and self.request_times[0] <= horizon:
            self.request_times.popleft()
        while self.token_entries and next(iter(self.token_entries.values())).admitted_at <= horizon:
            self.token_entries.popitem(last=False)

    @property
    def num_window_tokens(self) -> int:
        return sum(entry.num_tokens for entry in self.token_entries.values())

    def seconds_until_tokens_fit(self, limit: int, num_tokens: int, now: float) -> float:
        """How long until the window has room for `num_tokens` more (entries age out oldest first)."""
        used = self.num_window_tokens
        for entry in self.token_entries.values():
            used -= entry.num_tokens
            if used + num_tokens <= limit:
                return max(entry.admitted_at + WINDOW_S - now, 0.0)
        return WINDOW_S  # more than the limit on its own: no wait makes it fit


def _retry_after(seconds: float) -> int:
    return max(MIN_RETRY_AFTER_S, math.ceil(seconds))


class RateLimiter:
    """All keys' limit state. `spent_of(key_id)` loads a key's spend (the ledger's total) the first time
    the key is seen; from then on finished requests add their cost here."""

    def __init__(self, spent_of: Callable[[str], int], clock: Callable[[], float] = time.monotonic) -> None:
        self._spent_of = spent_of
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._admitted: dict[str, _Admitted] = {}

    def _state(self, key_id: str) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState(spent_pico_usd=self._spent_of(key_id))
        return state

    def admit(self, reservation: Reservation) -> Decision:
        now = self._clock()
        limits = reservation.limits
        state = self._state(reservation.key_id)
        state.prune(now)
        refusal, retry_after = self._refusal(state, reservation, now)
        admission_id = None
        if refusal is None:
            admission_id = uuid.uuid4().hex
            admitted = _Admitted(reservation.key_id, now, reservation.num_tokens, reservation.max_cost_pico_usd)
            state.request_times.append(now)
            state.token_entries[admission_id] = admitted
            state.num_inflight += 1
            state.reserved_pico_usd += reservation.max_cost_pico_usd
            self._admitted[admission_id] = admitted
        return Decision(
            admission_id=admission_id, refusal=refusal, retry_after_s=retry_after,
            limit_requests=limits.rpm,
            remaining_requests=None if limits.rpm is None else max(0, limits.rpm - len(state.request_times)),
            limit_tokens=limits.tpm,
            remaining_tokens=None if limits.tpm is None else max(0, limits.tpm - state.num_window_tokens),
            reset_requests_s=None if not state.request_times else state.request_times[0] + WINDOW_S - now,
            reset_tokens_s=None if not state.token_entries else
            next(iter(state.token_entries.values())).admitted_at + WINDOW_S - now,
            spent_pico_usd=state.spent_pico_usd, budget_pico_usd=limits.budget_pico_usd)

    def _refusal(self, state: _KeyState, reservation: Reservation, now: float) -> tuple[Refusal | None, int | None]:
        limits = reservation.limits
        if limits.budget_pico_usd is not None:
            committed = state.spent_pico_usd + state.reserved_pico_usd
            if state.spent_pico_usd >= limits.budget_pico_usd:
                return "budget", None
            if committed + reservation.max_cost_pico_usd > limits.budget_pico_usd:
                return "budget_request", None
        if limits.rpm is not None and len(state.request_times) >= limits.rpm:
            return "requests", _retry_after(state.request_times[0] + WINDOW_S - now)
        if limits.tpm is not None and state.num_window_tokens + reservation.num_tokens > limits.tpm:
            return "tokens", _retry_after(state.seconds_until_tokens_fit(limits.tpm, reservation.num_tokens, now))
        if limits.concurrency is not None and state.num_inflight >= limits.concurrency:
            return "concurrency", MIN_RETRY_AFTER_S
        return None, None

    def finish(self, admission_id: str, num_tokens: int, cost_pico_usd: int) -> None:
        """The request is over: its real tokens replace the reservation, its cost is spent. Idempotent."""
        admitted = self._admitted.pop(admission_id, None)
        if admitted is None:
            return
        state = self._state(admitted.key_id)
        state.num_inflight -= 1
        state.reserved_pico_usd -= admitted.max_cost_pico_usd
        state.spent_pico_usd += cost_pico_usd
        admitted.num_tokens = num_tokens  # counted in the window while its admission is inside it

    def spent_pico_usd(self, key_id: str) -> int:
        return self._state(key_id).spent_pico_usd

    @property
    def num_inflight(self) -> int:
        return len(self._admitted)
