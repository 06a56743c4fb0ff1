"""API keys: created once (the secret is shown only then), stored as salted hashes, verified in constant time.

A secret reads `sk-<key_id>.<random>`: the key id is public (it names the key in listings, usage and
limits); only a PBKDF2-HMAC-SHA256 hash of the whole secret, with a per-key salt, is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from decimal import Decimal

import sqlalchemy as sa

from .meter import now_ms
from .prices import format_usd, usd_to_pico
from .schema import api_keys

SECRET_PREFIX = "sk-"
KEY_ID_SEPARATOR = "."
KEY_ID_BYTES = 8  # 16 hex characters
SECRET_BYTES = 32
SALT_BYTES = 16
HASH_NAME = "sha256"
# Keys are 256-bit random, so the KDF guards a stolen table against nothing a guess could find; it is kept
# cheap because every request verifies one (about 6 ms on one core at this count).
DEFAULT_HASH_ITERATIONS = 10_000
SCHEME_PREFIX = "pbkdf2_sha256$"


@dataclass(frozen=True)
class ApiKey:
    """A key's public record and its limits (None: unlimited; plan None: the model's plan)."""

    key_id: str
    name: str
    plan: str | None
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    budget_pico_usd: int | None
    created_at_ms: int
    revoked_at_ms: int | None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at_ms is not None

    def to_dict(self) -> dict:
        return {"key_id": self.key_id, "name": self.name, "plan": self.plan, "rpm": self.rpm, "tpm": self.tpm,
                "concurrency": self.concurrency,
                "budget_usd": None if self.budget_pico_usd is None else format_usd(self.budget_pico_usd),
                "created_at_ms": self.created_at_ms, "revoked_at_ms": self.revoked_at_ms}


def _hash(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac(HASH_NAME, secret.encode(), salt, iterations)


def _parse_key_id(secret: str) -> str | None:
    if not secret.startswith(SECRET_PREFIX) or KEY_ID_SEPARATOR not in secret:
        return None
    key_id = secret.removeprefix(SECRET_PREFIX).split(KEY_ID_SEPARATOR, 1)[0]
    return key_id or None


def _api_key(row: sa.Row) -> ApiKey:
    return ApiKey(key_id=row.key_id, name=row.name, plan=row.plan, rpm=row.rpm, tpm=row.tpm,
                  concurrency=row.concurrency, budget_pico_usd=row.budget_pico_usd,
                  created_at_ms=row.created_at_ms, revoked_at_ms=row.revoked_at_ms)


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class KeyStore:
    """API keys in the ledger database (the same engine as the Ledger; migrate() creates the table)."""

    def __init__(self, engine: sa.Engine, hash_iterations: int = DEFAULT_HASH_ITERATIONS) -> None:
        if hash_iterations < 1:
            raise ValueError("hash_iterations must be at least 1")
        self.engine = engine
        self.hash_iterations = hash_iterations
        # Hashed when a key id is unknown, so a miss costs what a hit costs.
        self._dummy_salt = secrets.token_bytes(SALT_BYTES)

    def create(self, name: str, *, plan: str | None = None, rpm: int | None = None, tpm: int | None = None,
               concurrency: int | None = None,
               budget_usd: str | Decimal | None = None) -> tuple[ApiKey, str]:
        """Store a new key; returns it and its secret, which is never retrievable again."""
        if not name:
            raise ValueError("a key needs a name")
        key_id = secrets.token_hex(KEY_ID_BYTES)
        secret = f"{SECRET_PREFIX}{key_id}{KEY_ID_SEPARATOR}{secrets.token_urlsafe(SECRET_BYTES)}"
        salt = secrets.token_bytes(SALT_BYTES)
        budget = None if budget_usd is None else usd_to_pico(budget_usd)
        if budget is not None and budget < 0:
            raise ValueError("budget_usd must not be negative")
        row = {"key_id": key_id, "name": name, "plan": plan, "rpm": _positive_or_none("rpm", rpm),
               "tpm": _positive_or_none("tpm", tpm),
               "concurrency": _positive_or_none("concurrency", concurrency), "budget_pico_usd": budget,
               "hash_scheme": f"{SCHEME_PREFIX}{self.hash_iterations}", "salt": salt.hex(),
               "secret_hash": _hash(secret, salt, self.hash_iterations).hex(),
               "created_at_ms": now_ms(), "revoked_at_ms": None}
        with self.engine.begin() as conn:
            conn.execute(sa.insert(api_keys).values(**row))
        return self.get(key_id), secret

    def get(self, key_id: str) -> ApiKey | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return None if row is None else _api_key(row)

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at_ms, api_keys.c.key_id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at_ms.is_(None))
        with self.engine.connect() as conn:
            return [_api_key(row) for row in conn.execute(query)]

    def revoke(self, key_id: str) -> bool:
        """Revoke a live key; False if there is no such key or it was already revoked."""
        with self.engine.begin() as conn:
            result = conn.execute(sa.update(api_keys)
                                  .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at_ms.is_(None))
                                  .values(revoked_at_ms=now_ms()))
        return result.rowcount == 1

    def verify(self, secret: str) -> ApiKey | None:
        """The live key this secret belongs to, or None (malformed, unknown, wrong or revoked)."""
        key_id = _parse_key_id(secret) if isinstance(secret, str) else None
        with self.engine.connect() as conn:
            row = None if key_id is None else conn.execute(
                sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None or not row.hash_scheme.startswith(SCHEME_PREFIX):
            hmac.compare_digest(_hash(str(secret), self._dummy_salt, self.hash_iterations), bytes(32))
            return None
        iterations = int(row.hash_scheme.removeprefix(SCHEME_PREFIX))
        expected = bytes.fromhex(row.secret_hash)
        is_match = hmac.compare_digest(_hash(secret, bytes.fromhex(row.salt), iterations), expected)
        if not is_match or row.revoked_at_ms is not None:
            return None
        return _api_key(row)
