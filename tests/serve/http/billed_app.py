"""A router app over a FakeEngine with real billing: a SQLite ledger, API keys and an in-process limiter."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import httpx

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.billing import ApiKey, BillingConfig, UsageRecord
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.serve.http.auth import AdminGuard, Authenticator
from k2ray.serve.http.limits_actor import LocalLimiter
from k2ray.serve.http.metering import Billing
from k2ray.serve.http.rate_limits import RateLimiter
from k2ray.serve.http.router import build_router_app
from k2ray.tools import WebSearch

from ..fakes import FAKE_MAX_MODEL_LEN, FakeEngine, make_context

CKPT = str(tiny_checkpoint_dir())
ADMIN_TOKEN = "admin-test-token"
DEFAULT_SCRIPT = "<think>ponder</think>Hi there<|im_end|>"
TEST_FLUSH_INTERVAL_S = 0.02


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class BilledApp:
    app: object
    engine: FakeEngine
    billing: Billing
    clock: ManualClock
    auth: Authenticator

    def http(self, secret: str | None = None, header: str = "authorization") -> httpx.AsyncClient:
        headers = {}
        if secret is not None:
            headers = {"authorization": f"Bearer {secret}"} if header == "authorization" else {"x-api-key": secret}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://router",
                                 headers=headers)

    def create_key(self, name: str = "test", **limits) -> tuple[ApiKey, str]:
        return self.billing.keys.create(name, **limits)

    async def record(self, request_id: str) -> UsageRecord:
        """The request's ledger record, once this replica's writer has written it."""
        await asyncio.to_thread(self.billing.writer.flush, 5.0)
        record = self.billing.ledger.get(request_id)
        assert record is not None, f"no usage record for {request_id}"
        return record

    async def records(self) -> int:
        await asyncio.to_thread(self.billing.writer.flush, 5.0)
        return self.billing.ledger.report().totals.requests


def billed_app(tokenizer: K2Tokenizer, tmp_path: Path, *, script: str = DEFAULT_SCRIPT, is_auth_on: bool = True,
               admin_token: str | None = ADMIN_TOKEN, key_cache_ttl_s: float = 10.0, max_inflight: int = 8,
               ledger: str | None = None, web_search: WebSearch | None = None,
               max_model_len: int = FAKE_MAX_MODEL_LEN, **engine_kwargs) -> BilledApp:
    """`ledger`: a DSN; None: a SQLite file in tmp_path. `web_search`: the router's search tool, if any."""
    clock = ManualClock()
    config = BillingConfig(ledger=ledger or str(tmp_path / "ledger.db"), flush_interval_s=TEST_FLUSH_INTERVAL_S)
    billing = Billing.open(config, lambda ledger: LocalLimiter(RateLimiter(ledger.spent_pico_usd, clock)))
    engine = FakeEngine(tokenizer.encode(script), **engine_kwargs)
    auth = Authenticator(billing.keys if is_auth_on else None, key_cache_ttl_s, clock)
    ctx = dataclasses.replace(make_context(CKPT, engine, max_inflight=max_inflight), billing=billing, auth=auth,
                              admin=AdminGuard(admin_token), web_search=web_search, max_model_len=max_model_len)
    return BilledApp(build_router_app(ctx), engine, billing, clock, auth)
