"""Who is calling: API keys on every /v1 route (`Authorization: Bearer sk-...` or Anthropic's `x-api-key`),
and the admin token on /admin/.

A verified key is cached for `ttl_s` under the SHA-256 of its secret (KeyStore.verify costs a salted KDF,
about 6 ms): a revocation reaches the replica that revoked at once and the others within `ttl_s`.
Secrets and the admin token never appear in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from k2ray.billing import ApiKey, KeyStore
from k2ray.serve.http.errors import ApiError

ANONYMOUS_KEY_ID = "anonymous"  # whom requests are metered to when router.auth is off
BEARER_PREFIX = "bearer "
MAX_CACHED_KEYS = 4096
MISSING_KEY = ("Missing API key: send it as `Authorization: Bearer sk-...` (OpenAI) or `x-api-key: sk-...` "
               "(Anthropic).")
INVALID_KEY = "Invalid API key: it is unknown, wrong or revoked."
ADMIN_DISABLED = "The admin API is disabled: no admin token is configured (router.admin_token or admin_token_file)."
ADMIN_UNAUTHORIZED = "The admin API needs `Authorization: Bearer <admin token>`."


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request; key None when auth is off."""

    key_id: str
    key: ApiKey | None = None


ANONYMOUS = Caller(ANONYMOUS_KEY_ID)


def presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith(BEARER_PREFIX):
        return authorization[len(BEARER_PREFIX):].strip() or None
    return headers.get("x-api-key", "").strip() or None


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", error_type="invalid_request_error")


class Authenticator:
    """API-key checks with a short-lived cache of verified secrets (`keys` None: auth off)."""

    def __init__(self, keys: KeyStore | None, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, ApiKey]] = OrderedDict()

    @property
    def is_enabled(self) -> bool:
        return self.keys is not None

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        if self.keys is None:
            return ANONYMOUS
        secret = presented_key(headers)
        if secret is None:
            raise unauthorized(MISSING_KEY)
        digest = hashlib.sha256(secret.encode()).digest()
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return Caller(cached[1].key_id, cached[1])
        key = await asyncio.to_thread(self.keys.verify, secret)
        if key is None:
            self._cache.pop(digest, None)
            raise unauthorized(INVALID_KEY)
        self._cache[digest] = (now + self.ttl_s, key)
        self._cache.move_to_end(digest)
        while len(self._cache) > MAX_CACHED_KEYS:
            self._cache.popitem(last=False)
        return Caller(key.key_id, key)

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache (it was revoked through this replica)."""
        for digest in [d for d, (_, key) in self._cache.items() if key.key_id == key_id]:
            del self._cache[digest]


class AdminGuard:
    """The admin token check: constant-time, and a clear 404 when no token is configured."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def check(self, headers: Mapping[str, str]) -> None:
        if self._token is None:
            raise ApiError(404, ADMIN_DISABLED)
        presented = (presented_key(headers) or "").encode()
        if not hmac.compare_digest(presented, self._token):
            raise unauthorized(ADMIN_UNAUTHORIZED)


def read_admin_token(token: str | None, token_file: str | None) -> str | None:
    """The configured admin token, inline or from a file (a mounted secret, read on the replica)."""
    if token:
        return token
    if token_file is None:
        return None
    with open(token_file, encoding="utf-8") as f:
        return f.read().strip() or None
