"""The admin API under /admin/ (keys create/list/revoke, usage across keys), guarded by the admin token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from k2ray.serve.http.errors import ApiError, error_response, invalid_request
from k2ray.serve.http.request_limits import read_body
from k2ray.serve.http.router_context import RouterContext
from k2ray.serve.http.usage_routes import flushed, query_date, require_billing


class KeyCreateRequest(BaseModel):
    """POST /admin/keys: the key's name and limits (None: unlimited); money as a decimal string."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    plan: str | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    budget_usd: str | int | None = None


async def _admin(ctx: RouterContext, request: Request,
                 action: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]) -> JSONResponse:
    try:
        ctx.admin.check(request.headers)
        require_billing(ctx)
        status, body = await action()
    except ApiError as err:
        return error_response(err, "openai")
    return JSONResponse(body, status_code=status)


def add_admin_routes(app: FastAPI, ctx: RouterContext) -> None:
    @app.post("/admin/keys")
    async def create_key(request: Request) -> JSONResponse:
        async def action() -> tuple[int, dict[str, Any]]:
            billing = require_billing(ctx)
            try:
                body = KeyCreateRequest.model_validate_json(await read_body(request, ctx.limits.max_body_bytes))
            except ValidationError as exc:
                raise invalid_request(f"Invalid key request: {exc.errors()[0]['msg']}") from None
            if body.plan is not None and body.plan not in billing.config.all_plans():
                raise invalid_request(f"unknown plan {body.plan!r}: {sorted(billing.config.all_plans())}",
                                      param="plan")
            try:
                key, secret = await asyncio.to_thread(
                    billing.keys.create, body.name, plan=body.plan, rpm=body.rpm, tpm=body.tpm,
                    concurrency=body.concurrency,
                    budget_usd=None if body.budget_usd is None else str(body.budget_usd))
            except ValueError as exc:
                raise invalid_request(str(exc), param="budget_usd") from None
            return 201, {"key": key.to_dict(), "secret": secret}

        return await _admin(ctx, request, action)

    @app.get("/admin/keys")
    async def list_keys(request: Request) -> JSONResponse:
        async def action() -> tuple[int, dict[str, Any]]:
            keys = await asyncio.to_thread(require_billing(ctx).keys.list)
            return 200, {"object": "list", "data": [key.to_dict() for key in keys]}

        return await _admin(ctx, request, action)

    @app.post("/admin/keys/{key_id}/revoke")
    async def revoke_key(request: Request, key_id: str) -> JSONResponse:
        async def action() -> tuple[int, dict[str, Any]]:
            if not await asyncio.to_thread(require_billing(ctx).keys.revoke, key_id):
                raise ApiError(404, f"No live key {key_id!r}.", param="key_id")
            ctx.auth.forget(key_id)
            return 200, {"key_id": key_id, "revoked": True}

        return await _admin(ctx, request, action)

    @app.get("/admin/usage")
    async def usage(request: Request) -> JSONResponse:
        async def action() -> tuple[int, dict[str, Any]]:
            billing = require_billing(ctx)
            key_id = request.query_params.get("key_id")
            since, until = query_date(request, "since"), query_date(request, "until")
            await flushed(billing)
            report = await asyncio.to_thread(billing.ledger.report, key_id, since, until)
            body: dict[str, Any] = {"object": "usage", "key_id": key_id, **report.to_dict()}
            if key_id is None:
                per_key = await asyncio.to_thread(billing.ledger.totals_per_key, since, until)
                body["keys"] = {k: totals.to_dict() for k, totals in per_key.items()}
            return 200, body

        return await _admin(ctx, request, action)
