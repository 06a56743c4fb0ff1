from __future__ import annotations

import pytest

from k2ray.billing import BUILTIN_PLANS, RequestStatus, UsageCounts, format_usd, meter_request, price_counts

# Hand-computed: 123,456 prompt tokens of which 100,000 cache hits (23,456 uncached), 7,890 completion
# tokens of which 5,000 reasoning, 3 searches.
COUNTS = UsageCounts(num_prompt_tokens=123_456, num_cached_tokens=100_000, num_completion_tokens=7_890,
                     num_reasoning_tokens=5_000, num_web_searches=3)
EXPECTED = {
    # 23,456 x $0.556/M + 100,000 x $0.139/M + 7,890 x $2.222/M + 3 x $0.004
    "evolink": ("0.013041536", "0.0139", "0.01753158", "0.012", "0.056473116"),
    # 23,456 x $0.60/M + 100,000 x $0.15/M + 7,890 x $2.50/M + 3 x $0.005
    "moonshot": ("0.0140736", "0.015", "0.019725", "0.015", "0.0637986"),
    # 23,456 x $1.15/M + 100,000 x $0.15/M + 7,890 x $8.00/M + 3 x $0.005
    "moonshot-turbo": ("0.0269744", "0.015", "0.06312", "0.015", "0.1200944"),
}


def _record(plan_name: str, counts: UsageCounts, status: RequestStatus = RequestStatus.OK):
    return meter_request(request_id="req-1", key_id="key-1", model_id="kimi-k2-thinking", plan_name=plan_name,
                         plan=BUILTIN_PLANS[plan_name], counts=counts, status=status,
                         started_at_ms=1_764_547_200_000, finished_at_ms=1_764_633_599_999)


@pytest.mark.parametrize("plan_name", sorted(EXPECTED))
def test_costs_match_hand_computed_values(plan_name: str) -> None:
    record = _record(plan_name, COUNTS)
    costs = record.costs
    got = tuple(format_usd(p) for p in (costs.input_pico_usd, costs.cached_input_pico_usd, costs.output_pico_usd,
                                        costs.web_search_pico_usd, costs.total_pico_usd))
    assert got == EXPECTED[plan_name]
    assert record.cost_usd == EXPECTED[plan_name][-1]
    assert record.counts.num_uncached_tokens == 23_456
    assert record.day == "2025-12-01"


def test_cache_hits_are_priced_at_the_cache_hit_rate_token_by_token() -> None:
    plan = BUILTIN_PLANS["evolink"]
    miss = price_counts(plan, UsageCounts(num_prompt_tokens=1_000_000))
    hit = price_counts(plan, UsageCounts(num_prompt_tokens=1_000_000, num_cached_tokens=1_000_000))
    assert (miss.total_pico_usd, hit.total_pico_usd) == (556_000 * 10**6, 139_000 * 10**6)  # $0.556, $0.139
    one_hit = price_counts(plan, UsageCounts(num_prompt_tokens=1_000_000, num_cached_tokens=1))
    assert miss.total_pico_usd - one_hit.total_pico_usd == 556_000 - 139_000


def test_reasoning_tokens_are_output_tokens_priced_once() -> None:
    plan = BUILTIN_PLANS["evolink"]
    plain = price_counts(plan, UsageCounts(num_completion_tokens=10))
    thinking = price_counts(plan, UsageCounts(num_completion_tokens=10, num_reasoning_tokens=9))
    assert plain == thinking
    assert plain.output_pico_usd == 10 * 2_222_000


def test_failed_before_output_is_billed_nothing_but_cancelled_pays_for_what_was_delivered() -> None:
    before_output = UsageCounts(num_prompt_tokens=500, num_cached_tokens=100)
    failed = _record("evolink", before_output, RequestStatus.FAILED)
    assert failed.counts == UsageCounts() and failed.costs.total_pico_usd == 0
    assert failed.status is RequestStatus.FAILED
    cancelled = _record("evolink", UsageCounts(num_prompt_tokens=500, num_completion_tokens=3),
                        RequestStatus.CANCELLED)
    assert cancelled.costs.total_pico_usd == 500 * 556_000 + 3 * 2_222_000
    failed_mid_stream = _record("evolink", UsageCounts(num_prompt_tokens=500, num_completion_tokens=3),
                                RequestStatus.FAILED)
    assert failed_mid_stream.costs == cancelled.costs


@pytest.mark.parametrize("fields", [
    {"num_prompt_tokens": 10, "num_cached_tokens": 11},
    {"num_completion_tokens": 1, "num_reasoning_tokens": 2},
    {"num_prompt_tokens": -1},
    {"num_web_searches": 1.0},
    {"num_prompt_tokens": True},
])
def test_inconsistent_counts_are_rejected(fields: dict) -> None:
    with pytest.raises(ValueError):
        UsageCounts(**fields)


def test_record_needs_an_id_and_ordered_timestamps() -> None:
    plan = BUILTIN_PLANS["evolink"]
    with pytest.raises(ValueError, match="request_id"):
        meter_request(request_id="", key_id="k", model_id="m", plan_name="evolink", plan=plan,
                      counts=COUNTS, status=RequestStatus.OK, started_at_ms=0, finished_at_ms=0)
    with pytest.raises(ValueError, match="precedes"):
        meter_request(request_id="r", key_id="k", model_id="m", plan_name="evolink", plan=plan,
                      counts=COUNTS, status=RequestStatus.OK, started_at_ms=2, finished_at_ms=1)
