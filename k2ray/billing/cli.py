"""`k2ray keys ...` and `k2ray usage ...`: the work behind the subcommands (k2ray/cli.py parses them)."""

from __future__ import annotations

import csv
import io
import json
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from .config import BillingConfig
from .keys import KeyStore
from .ledger import Ledger
from .usage import UsageReport

CSV_FIELDS = ("day", "requests", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
              "web_searches", "cost_usd")
TOTAL_ROW = "total"


def load_billing_config(config_path: str | None) -> BillingConfig:
    """The `billing:` section of a deployment YAML (defaults without a file or section)."""
    if config_path is None:
        return BillingConfig()
    document = yaml.safe_load(Path(config_path).read_text()) or {}
    if not isinstance(document, dict):
        raise SystemExit(f"{config_path}: expected a mapping at the top level")
    if "applications" in document:  # a Serve config file: the first application's args, as the router reads it
        document = (document["applications"] or [{}])[0].get("args") or {}
    return BillingConfig.model_validate(document.get("billing") or {})


def _open(config: BillingConfig) -> tuple[Ledger, KeyStore]:
    ledger = Ledger.open(config.ledger)
    return ledger, KeyStore(ledger.engine, hash_iterations=config.key_hash_iterations)


def keys_create(config: BillingConfig, name: str, *, plan: str | None, rpm: int | None, tpm: int | None,
                concurrency: int | None, budget_usd: str | None) -> list[str]:
    """Output lines: the key's record as JSON, then the secret alone on the last line (shown only now)."""
    if plan is not None and plan not in config.all_plans():
        raise SystemExit(f"unknown plan {plan!r}: {sorted(config.all_plans())}")
    ledger, store = _open(config)
    try:
        key, secret = store.create(name, plan=plan, rpm=rpm, tpm=tpm, concurrency=concurrency,
                                   budget_usd=budget_usd)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    finally:
        ledger.close()
    return [json.dumps(key.to_dict()), secret]


def keys_list(config: BillingConfig) -> list[str]:
    ledger, store = _open(config)
    try:
        return [json.dumps(key.to_dict()) for key in store.list()]
    finally:
        ledger.close()


def keys_revoke(config: BillingConfig, key_id: str) -> list[str]:
    ledger, store = _open(config)
    try:
        if not store.revoke(key_id):
            raise SystemExit(f"no live key {key_id!r}")
    finally:
        ledger.close()
    return [f"revoked {key_id}"]


def _csv(report: UsageReport) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for day, totals in report.days:
        writer.writerow({"day": day, **totals.to_dict()})
    writer.writerow({"day": TOTAL_ROW, **report.totals.to_dict()})
    return out.getvalue().rstrip("\n")


def usage(config: BillingConfig, *, key_id: str | None, since: date | None, output_format: str) -> list[str]:
    """One key's usage, or everyone's (with per-key totals) without key_id."""
    ledger = Ledger.open(config.ledger)
    try:
        report = ledger.report(key_id, since=since)
        per_key = None if key_id is not None else ledger.totals_per_key(since=since)
    finally:
        ledger.close()
    if output_format == "csv":
        return [_csv(report)]
    body: dict[str, Any] = report.to_dict()
    if per_key is not None:
        body["keys"] = {k: totals.to_dict() for k, totals in per_key.items()}
    return [json.dumps(body)]
