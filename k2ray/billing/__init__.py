"""Metering and billing: price plans, usage records, the usage ledger and API keys (pure Python + SQLAlchemy)."""

from .config import BillingConfig
from .db import make_engine
from .keys import ApiKey, KeyStore
from .ledger import Ledger
from .meter import Costs, RequestStatus, UsageCounts, UsageRecord, meter_request, now_ms, price_counts
from .migrations import LATEST_VERSION, migrate
from .prices import BUILTIN_PLANS, DEFAULT_PLAN, PICO_PER_MICRO, PricePlan, format_usd, usd_to_pico
from .usage import UsageReport, UsageTotals
from .writer import LedgerWriteError, LedgerWriter, WriterConfig

__all__ = [
    "ApiKey", "BillingConfig", "BUILTIN_PLANS", "Costs", "DEFAULT_PLAN", "KeyStore", "LATEST_VERSION", "Ledger",
    "LedgerWriteError", "LedgerWriter", "PICO_PER_MICRO", "PricePlan", "RequestStatus", "UsageCounts", "UsageRecord",
    "UsageReport", "UsageTotals", "WriterConfig", "format_usd", "make_engine", "meter_request", "migrate", "now_ms",
    "price_counts", "usd_to_pico",
]
