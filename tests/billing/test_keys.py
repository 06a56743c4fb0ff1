from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from k2ray.billing import KeyStore, Ledger
from k2ray.billing.schema import api_keys

# Cheap hashing keeps the test fast; the stored scheme carries the count, so verify uses the key's own.
TEST_ITERATIONS = 100


@pytest.fixture
def store(ledger_dsn: str) -> Iterator[KeyStore]:
    ledger = Ledger.open(ledger_dsn)
    yield KeyStore(ledger.engine, hash_iterations=TEST_ITERATIONS)
    ledger.close()


def test_create_shows_the_secret_once_and_stores_only_a_salted_hash(store: KeyStore) -> None:
    key, secret = store.create("alice", plan="moonshot", rpm=3, tpm=500_000, concurrency=1, budget_usd="12.345")
    assert secret.startswith(f"sk-{key.key_id}.")
    assert (key.name, key.plan, key.rpm, key.tpm, key.concurrency) == ("alice", "moonshot", 3, 500_000, 1)
    assert key.budget_pico_usd == 12_345_000_000_000 and key.to_dict()["budget_usd"] == "12.345"
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key.key_id)).one()
    stored = " ".join(str(v) for v in row)
    assert secret not in stored and secret.split(".", 1)[1] not in stored
    other, other_secret = store.create("bob")
    with store.engine.connect() as conn:
        salts = [r.salt for r in conn.execute(sa.select(api_keys.c.salt))]
    assert len(set(salts)) == 2 and other_secret != secret
    assert (other.plan, other.rpm, other.budget_pico_usd) == (None, None, None)


def test_verify_accepts_only_the_exact_live_secret(store: KeyStore) -> None:
    key, secret = store.create("alice")
    assert store.verify(secret) == key
    key_id, random_part = secret.removeprefix("sk-").split(".", 1)
    flipped = random_part[:-1] + ("A" if random_part[-1] != "A" else "B")
    other, other_secret = store.create("bob")
    for wrong in (f"sk-{key_id}.{flipped}", secret + "x", secret[:-1], "", "sk-", "sk-.", "Bearer " + secret,
                  f"sk-{other.key_id}.{random_part}", f"sk-{key_id}", "sk-nosuchkey.abc", "x" * 10_000):
        assert store.verify(wrong) is None, wrong
    assert store.verify(other_secret) == other


def test_revoked_keys_stop_verifying(store: KeyStore) -> None:
    key, secret = store.create("alice")
    assert store.revoke(key.key_id)
    assert not store.revoke(key.key_id)  # already revoked
    assert not store.revoke("nosuchkey")
    assert store.verify(secret) is None
    revoked = store.get(key.key_id)
    assert revoked is not None and revoked.is_revoked
    live, _ = store.create("bob")
    assert [k.key_id for k in store.list()] == [key.key_id, live.key_id]
    assert [k.key_id for k in store.list(include_revoked=False)] == [live.key_id]


def test_verify_uses_each_keys_stored_hash_cost(store: KeyStore) -> None:
    key, secret = store.create("alice")
    rehashed = KeyStore(store.engine, hash_iterations=TEST_ITERATIONS * 2)
    assert rehashed.verify(secret) == key


@pytest.mark.parametrize("fields", [{"rpm": 0}, {"tpm": -5}, {"concurrency": 1.5}, {"budget_usd": "-1"},
                                    {"budget_usd": "0.0000000000001"}])
def test_bad_limits_are_rejected(store: KeyStore, fields: dict) -> None:
    with pytest.raises(ValueError):
        store.create("alice", **fields)
    assert store.list() == []
