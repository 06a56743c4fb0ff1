"""Metering: the token and search counts of one request, priced by a plan into its usage record."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .prices import PICO_PER_MICRO, PricePlan, format_usd

MS_PER_S = 1000
NS_PER_MS = 10**6


class RequestStatus(str, enum.Enum):
    OK = "ok"
    CANCELLED = "cancelled"  # the client went away: billed for what was delivered
    FAILED = "failed"  # billed for what was delivered; nothing if it failed before any output


@dataclass(frozen=True)
class UsageCounts:
    """A request's meters as the API reports them: prompt includes cached, completion includes reasoning."""

    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_completion_tokens: int = 0
    num_reasoning_tokens: int = 0
    num_web_searches: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompt_tokens", "num_cached_tokens", "num_completion_tokens",
                     "num_reasoning_tokens", "num_web_searches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.num_cached_tokens > self.num_prompt_tokens:
            raise ValueError(f"num_cached_tokens ({self.num_cached_tokens}) exceeds "
                             f"num_prompt_tokens ({self.num_prompt_tokens})")
        if self.num_reasoning_tokens > self.num_completion_tokens:
            raise ValueError(f"num_reasoning_tokens ({self.num_reasoning_tokens}) exceeds "
                             f"num_completion_tokens ({self.num_completion_tokens})")

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens


@dataclass(frozen=True)
class Costs:
    """Exact pico-USD per meter."""

    input_pico_usd: int
    cached_input_pico_usd: int
    output_pico_usd: int
    web_search_pico_usd: int

    @property
    def total_pico_usd(self) -> int:
        return self.input_pico_usd + self.cached_input_pico_usd + self.output_pico_usd + self.web_search_pico_usd


def price_counts(plan: PricePlan, counts: UsageCounts) -> Costs:
    # micro-USD per 1M tokens x tokens = pico-USD exactly; reasoning is inside completion, priced once.
    return Costs(
        input_pico_usd=counts.num_uncached_tokens * plan.input_micro_usd_per_mtok,
        cached_input_pico_usd=counts.num_cached_tokens * plan.cached_input_micro_usd_per_mtok,
        output_pico_usd=counts.num_completion_tokens * plan.output_micro_usd_per_mtok,
        web_search_pico_usd=counts.num_web_searches * plan.web_search_micro_usd * PICO_PER_MICRO,
    )


def now_ms() -> int:
    """Wall-clock epoch milliseconds, the ledger's timestamps."""
    return time.time_ns() // NS_PER_MS


def utc_day(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / MS_PER_S, tz=timezone.utc).date().isoformat()


@dataclass(frozen=True)
class UsageRecord:
    """One request's row in the ledger, keyed by request_id. Timestamps are epoch milliseconds (UTC)."""

    request_id: str
    key_id: str
    model_id: str
    plan: str
    status: RequestStatus
    counts: UsageCounts
    costs: Costs
    started_at_ms: int
    finished_at_ms: int
    day: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("a usage record needs a request_id")
        if self.finished_at_ms < self.started_at_ms:
            raise ValueError("finished_at_ms precedes started_at_ms")
        object.__setattr__(self, "day", utc_day(self.finished_at_ms))

    @property
    def cost_usd(self) -> str:
        return format_usd(self.costs.total_pico_usd)


def meter_request(*, request_id: str, key_id: str, model_id: str, plan_name: str, plan: PricePlan,
                  counts: UsageCounts, status: RequestStatus, started_at_ms: int,
                  finished_at_ms: int) -> UsageRecord:
    """Price one finished request. A request that failed before any output is recorded with zero usage."""
    if status is RequestStatus.FAILED and counts.num_completion_tokens == 0:
        counts = UsageCounts()
    return UsageRecord(request_id=request_id, key_id=key_id, model_id=model_id, plan=plan_name,
                       status=status, counts=counts, costs=price_counts(plan, counts),
                       started_at_ms=started_at_ms, finished_at_ms=finished_at_ms)
