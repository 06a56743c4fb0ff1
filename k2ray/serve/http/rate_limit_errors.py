"""Limit verdicts in OpenAI's terms: the x-ratelimit-* headers, 429 with Retry-After, 402 insufficient_quota."""

from __future__ import annotations

from k2ray.billing import format_usd
from k2ray.serve.http.errors import ApiError
from k2ray.serve.http.rate_limits import Decision, Reservation

RATE_LIMIT_CODE = "rate_limit_exceeded"
QUOTA_CODE = "insufficient_quota"


def _duration(seconds: float) -> str:
    """OpenAI's reset format, e.g. `1.5s`."""
    return f"{max(seconds, 0.0):.3f}".rstrip("0").rstrip(".") + "s"


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """OpenAI's headers for the key's per-minute limits (only those the key has), counting this request."""
    headers: dict[str, str] = {}
    if decision.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(decision.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(decision.remaining_requests)
        if decision.reset_requests_s is not None:
            headers["x-ratelimit-reset-requests"] = _duration(decision.reset_requests_s)
    if decision.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(decision.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(decision.remaining_tokens)
        if decision.reset_tokens_s is not None:
            headers["x-ratelimit-reset-tokens"] = _duration(decision.reset_tokens_s)
    return headers


def limit_error(decision: Decision, reservation: Reservation) -> ApiError:
    """429 (a per-minute or concurrency limit: retry later) or 402 (the budget: retrying does not help)."""
    headers = rate_limit_headers(decision)
    limits = reservation.limits
    if decision.refusal in ("budget", "budget_request"):
        budget = format_usd(decision.budget_pico_usd or 0)
        if decision.refusal == "budget":
            message = (f"You exceeded your current quota: this key's budget of ${budget} is spent "
                       f"(${format_usd(decision.spent_pico_usd)}).")
        else:
            message = (f"This request could cost up to ${format_usd(reservation.max_cost_pico_usd)} "
                       f"(its prompt and max_tokens), more than is left of this key's budget of ${budget}; "
                       f"lower max_tokens.")
        return ApiError(402, message, code=QUOTA_CODE, error_type=QUOTA_CODE, headers=headers)
    if decision.refusal == "requests":
        message = (f"Rate limit reached on requests per min (RPM): limit {limits.rpm}. "
                   f"Please try again in {decision.retry_after_s}s.")
        error_type = "requests"
    elif decision.refusal == "tokens":
        message = (f"Rate limit reached on tokens per min (TPM): limit {limits.tpm}, remaining "
                   f"{decision.remaining_tokens}, requested {reservation.num_tokens} (prompt + max_tokens).")
        if reservation.num_tokens > (limits.tpm or 0):
            message += " The request alone exceeds the limit: lower max_tokens."
        error_type = "tokens"
    else:
        message = f"Too many concurrent requests for this key: limit {limits.concurrency}."
        error_type = "requests"
    return ApiError(429, message, code=RATE_LIMIT_CODE, error_type=error_type,
                    retry_after_s=decision.retry_after_s, headers=headers)
