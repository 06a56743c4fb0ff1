"""The ledger's tables, as of the latest migration (migrations.py creates and alters them)."""

from __future__ import annotations

import sqlalchemy as sa

REQUEST_ID_LENGTH = 128
KEY_ID_LENGTH = 64
NAME_LENGTH = 200

metadata = sa.MetaData()

schema_versions = sa.Table(
    "k2ray_schema_versions", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(NAME_LENGTH), nullable=False),
    sa.Column("applied_at_ms", sa.BigInteger, nullable=False),
)

# One immutable row per request; money in pico-USD (integers), day = UTC date of finished_at_ms.
usage = sa.Table(
    "k2ray_usage", metadata,
    sa.Column("request_id", sa.String(REQUEST_ID_LENGTH), primary_key=True),
    sa.Column("key_id", sa.String(KEY_ID_LENGTH), nullable=False),
    sa.Column("model_id", sa.String(NAME_LENGTH), nullable=False),
    sa.Column("plan", sa.String(NAME_LENGTH), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("num_prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("num_cached_tokens", sa.BigInteger, nullable=False),
    sa.Column("num_uncached_tokens", sa.BigInteger, nullable=False),
    sa.Column("num_completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("num_reasoning_tokens", sa.BigInteger, nullable=False),
    sa.Column("num_web_searches", sa.BigInteger, nullable=False),
    sa.Column("input_pico_usd", sa.BigInteger, nullable=False),
    sa.Column("cached_input_pico_usd", sa.BigInteger, nullable=False),
    sa.Column("output_pico_usd", sa.BigInteger, nullable=False),
    sa.Column("web_search_pico_usd", sa.BigInteger, nullable=False),
    sa.Column("total_pico_usd", sa.BigInteger, nullable=False),
    sa.Column("started_at_ms", sa.BigInteger, nullable=False),
    sa.Column("finished_at_ms", sa.BigInteger, nullable=False),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Index("k2ray_usage_key_day", "key_id", "day"),
    sa.Index("k2ray_usage_day", "day"),
)

api_keys = sa.Table(
    "k2ray_api_keys", metadata,
    sa.Column("key_id", sa.String(KEY_ID_LENGTH), primary_key=True),
    sa.Column("name", sa.String(NAME_LENGTH), nullable=False),
    sa.Column("plan", sa.String(NAME_LENGTH)),  # None: the model's plan
    sa.Column("rpm", sa.Integer),  # None: unlimited
    sa.Column("tpm", sa.BigInteger),
    sa.Column("concurrency", sa.Integer),
    sa.Column("budget_pico_usd", sa.BigInteger),
    sa.Column("hash_scheme", sa.String(64), nullable=False),
    sa.Column("salt", sa.String(64), nullable=False),  # hex
    sa.Column("secret_hash", sa.String(128), nullable=False),  # hex
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("revoked_at_ms", sa.BigInteger),
)

VERSION_1_TABLES = (usage, api_keys)
