"""GET /v1/usage: the caller's own totals and per-day breakdown, read from the ledger."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from k2ray.serve.http.errors import ApiError, error_response, invalid_request
from k2ray.serve.http.metering import Billing
from k2ray.serve.http.router_context import RouterContext

# This replica's queued records are written before the ledger is read (the caller sees its own requests
# at once); a ledger slower than this answers without them.
USAGE_FLUSH_TIMEOUT_S = 5.0
BILLING_DISABLED = "Usage metering is not enabled on this deployment (no `billing` section in its config)."


def query_date(request: Request, name: str) -> date | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise invalid_request(f"{name} must be a date (YYYY-MM-DD), got {value!r}", param=name) from None


def require_billing(ctx: RouterContext) -> Billing:
    if ctx.billing is None:
        raise ApiError(404, BILLING_DISABLED)
    return ctx.billing


async def flushed(billing: Billing) -> None:
    await asyncio.to_thread(billing.writer.flush, USAGE_FLUSH_TIMEOUT_S)


def add_usage_routes(app: FastAPI, ctx: RouterContext) -> None:
    @app.get("/v1/usage")
    async def usage(request: Request) -> JSONResponse:
        try:
            caller = await ctx.auth.authenticate(request.headers)
            billing = require_billing(ctx)
            since, until = query_date(request, "since"), query_date(request, "until")
            await flushed(billing)
            report = await asyncio.to_thread(billing.ledger.report, caller.key_id, since, until)
        except ApiError as err:
            return error_response(err, "openai")
        body: dict[str, Any] = {"object": "usage", "key_id": caller.key_id, **report.to_dict()}
        return JSONResponse(body)
