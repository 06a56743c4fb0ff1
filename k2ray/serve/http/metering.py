"""Metering on the router: one usage record per request, priced and queued to the ledger off the request path,
and the request's admission against its key's shared limits.

`dispatch` (router_context.py) is the one caller: it makes a `RequestMeter` per request from the usage
callable its handler passes (the same usage the client receives), admits it before the engine starts,
and finishes it exactly once on every exit path: ok, failed (billed for what was delivered: nothing if
no output came) or cancelled by the client (billed for what was delivered until then).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from k2ray.api.anthropic_protocol import AnthropicUsage
from k2ray.api.openai_responses import Usage
from k2ray.billing import (
    PICO_PER_MICRO,
    ApiKey,
    BillingConfig,
    KeyStore,
    Ledger,
    LedgerWriter,
    PricePlan,
    RequestStatus,
    UsageCounts,
    format_usd,
    meter_request,
    now_ms,
)
from k2ray.serve.http.auth import Caller
from k2ray.serve.http.limits_actor import Limiter
from k2ray.serve.http.rate_limit_errors import limit_error, rate_limit_headers
from k2ray.serve.http.rate_limits import Decision, KeyLimits, Reservation
from k2ray.serve.metrics import RouterMetrics

logger = logging.getLogger(__name__)

UsageFn = Callable[[], UsageCounts]


def openai_counts(usage: Usage) -> UsageCounts:
    """Meters of an OpenAI usage object (prompt includes cached, completion includes reasoning)."""
    server_tools = getattr(usage, "server_tool_use", None)
    return UsageCounts(num_prompt_tokens=usage.prompt_tokens,
                       num_cached_tokens=usage.prompt_tokens_details.cached_tokens,
                       num_completion_tokens=usage.completion_tokens,
                       num_reasoning_tokens=usage.completion_tokens_details.reasoning_tokens,
                       num_web_searches=getattr(server_tools, "web_search_requests", 0) or 0)


def anthropic_counts(usage: AnthropicUsage, num_reasoning_tokens: int) -> UsageCounts:
    """Meters of an Anthropic usage object, whose input_tokens exclude cache reads."""
    server_tools = getattr(usage, "server_tool_use", None)
    return UsageCounts(num_prompt_tokens=usage.input_tokens + usage.cache_read_input_tokens,
                       num_cached_tokens=usage.cache_read_input_tokens,
                       num_completion_tokens=usage.output_tokens, num_reasoning_tokens=num_reasoning_tokens,
                       num_web_searches=getattr(server_tools, "web_search_requests", 0) or 0)


def key_limits(key: ApiKey | None) -> KeyLimits:
    if key is None:
        return KeyLimits()
    return KeyLimits(rpm=key.rpm, tpm=key.tpm, concurrency=key.concurrency, budget_pico_usd=key.budget_pico_usd)


@dataclass
class Billing:
    """The router replica's billing: the ledger, its batched writer, the key store and the shared limiter."""

    config: BillingConfig
    ledger: Ledger
    writer: LedgerWriter
    keys: KeyStore
    limiter: Limiter
    metrics: RouterMetrics | None = None  # billed units and micro-USD, the ledger writer's failures and lag

    @classmethod
    def open(cls, config: BillingConfig, limiter: Callable[[Ledger], Limiter],
             metrics: RouterMetrics | None = None) -> Billing:
        ledger = Ledger.open(config.ledger)
        return cls(config=config, ledger=ledger, writer=LedgerWriter(ledger, config.writer_config(), metrics),
                   keys=KeyStore(ledger.engine, hash_iterations=config.key_hash_iterations),
                   limiter=limiter(ledger), metrics=metrics)

    def plan_for(self, caller: Caller, model_plan: str | None) -> tuple[str, PricePlan]:
        """The key's own plan, else the model's (its variant's), else billing's default."""
        key_plan = caller.key.plan if caller.key is not None else None
        return self.config.plan(key_plan or model_plan)

    def close(self) -> None:
        """Write every queued record (the router is shutting down), then let go of the database."""
        try:
            self.writer.close()
        finally:
            self.ledger.close()


class RequestMeter:
    """One request's metering; `finish` records it once, whatever path the request leaves by."""

    def __init__(self, billing: Billing, caller: Caller, request_id: str, model_id: str, model_plan: str | None,
                 usage: UsageFn) -> None:
        self._billing = billing
        self._caller = caller
        self._request_id = request_id
        self._model_id = model_id
        self._usage = usage
        self._plan_name, self._plan = billing.plan_for(caller, model_plan)
        self._started_at_ms = now_ms()
        self._admission_id: str | None = None
        self._is_done = False
        self.headers: dict[str, str] = {}

    async def admit(self, num_reserved_tokens: int, num_max_completion_tokens: int, num_max_searches: int = 0) -> None:
        """Reserve the request against its key's limits; 429/402 (and no record) when over one."""
        limits = key_limits(self._caller.key)
        if limits.is_unlimited:
            return
        num_prompt = num_reserved_tokens - num_max_completion_tokens
        max_cost = (num_prompt * self._plan.input_micro_usd_per_mtok
                    + num_max_completion_tokens * self._plan.output_micro_usd_per_mtok
                    + num_max_searches * self._plan.web_search_micro_usd * PICO_PER_MICRO)
        reservation = Reservation(self._caller.key_id, limits, num_reserved_tokens, max_cost)
        decision: Decision = await self._billing.limiter.admit(reservation)
        self.headers = rate_limit_headers(decision)
        if not decision.is_admitted:
            self._is_done = True  # refused before it ran: nothing to record
            raise limit_error(decision, reservation)
        self._admission_id = decision.admission_id

    def finish(self, status: RequestStatus, *, is_delivered: bool = True) -> None:
        """Record the request; `is_delivered` False: the client got none of its output (billed nothing)."""
        if self._is_done:
            return
        self._is_done = True
        counts = UsageCounts()
        if is_delivered:
            try:
                counts = self._usage()
            except ValueError:
                logger.exception("request %s reported invalid usage; recorded as failed", self._request_id)
                status = RequestStatus.FAILED
        record = meter_request(request_id=self._request_id, key_id=self._caller.key_id, model_id=self._model_id,
                               plan_name=self._plan_name, plan=self._plan, counts=counts, status=status,
                               started_at_ms=self._started_at_ms, finished_at_ms=now_ms())
        if self._admission_id is not None:
            self._billing.limiter.finish(self._admission_id,
                                         record.counts.num_prompt_tokens + record.counts.num_completion_tokens,
                                         record.costs.total_pico_usd)
        if self._billing.metrics is not None:
            self._billing.metrics.record_billed(record)
        try:
            self._billing.writer.submit(record)
        except RuntimeError:  # the writer closed under a request still finishing (replica shutdown)
            logger.error("usage record %s (%s USD) lost: the ledger writer is closed", self._request_id,
                         format_usd(record.costs.total_pico_usd))


class UnmeteredRequest:
    """The meter of a deployment without billing: admits everything, records nothing."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    async def admit(self, num_reserved_tokens: int, num_max_completion_tokens: int, num_max_searches: int = 0) -> None:
        return None

    def finish(self, status: RequestStatus, *, is_delivered: bool = True) -> None:
        return None
