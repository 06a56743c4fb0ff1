"""Where the limits live: one `RateLimiter` for the whole deployment, in a named Ray actor.

Every router replica gets the same actor by name (`get_if_exists`, in the Serve app's namespace), so
requests/min, tokens/min, concurrency and budgets are counted once for all replicas. The actor is
detached (a replica going away does not take it along) and single-threaded (calls run in order, so a
caller's `finish` never overtakes its `admit`). If it restarts, windows start empty and spend is
reloaded from the ledger.
"""

from __future__ import annotations

import logging
from typing import Protocol

import ray
from ray.serve._private.constants import SERVE_NAMESPACE

from k2ray.billing import Ledger
from k2ray.serve.http.errors import ApiError
from k2ray.serve.http.rate_limits import Decision, RateLimiter, Reservation

logger = logging.getLogger(__name__)

LIMITS_ACTOR_SUFFIX = "-limits"
LIMITS_ACTOR_MAX_RESTARTS = 3
LIMITER_UNAVAILABLE = "The rate limiter is unavailable, please try again later"
LIMITER_RETRY_AFTER_S = 1


class Limiter(Protocol):
    async def admit(self, reservation: Reservation) -> Decision: ...

    def finish(self, admission_id: str, num_tokens: int, cost_pico_usd: int) -> None: ...


class LocalLimiter:
    """A RateLimiter in this process: one router (unit tests, a single local replica)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def admit(self, reservation: Reservation) -> Decision:
        return self.limiter.admit(reservation)

    def finish(self, admission_id: str, num_tokens: int, cost_pico_usd: int) -> None:
        self.limiter.finish(admission_id, num_tokens, cost_pico_usd)


class LimitsActor:
    """The shared RateLimiter; spend is loaded from the ledger the first time a key is seen."""

    def __init__(self, ledger_dsn: str) -> None:
        self._ledger = Ledger.open(ledger_dsn)
        self._limiter = RateLimiter(self._ledger.spent_pico_usd)

    def admit(self, reservation: Reservation) -> Decision:
        return self._limiter.admit(reservation)

    def finish(self, admission_id: str, num_tokens: int, cost_pico_usd: int) -> None:
        self._limiter.finish(admission_id, num_tokens, cost_pico_usd)

    def spent_pico_usd(self, key_id: str) -> int:
        return self._limiter.spent_pico_usd(key_id)


class ActorLimiter:
    """The router's handle on the shared LimitsActor."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor

    async def admit(self, reservation: Reservation) -> Decision:
        try:
            return await self.actor.admit.remote(reservation)
        except ray.exceptions.RayError:
            logger.exception("the limits actor failed")
            raise ApiError(503, LIMITER_UNAVAILABLE, retry_after_s=LIMITER_RETRY_AFTER_S) from None

    def finish(self, admission_id: str, num_tokens: int, cost_pico_usd: int) -> None:
        # Not awaited: the caller's calls run in order on the actor, and the response need not wait.
        self.actor.finish.remote(admission_id, num_tokens, cost_pico_usd)


def limits_actor_name(app_name: str) -> str:
    return f"{app_name}{LIMITS_ACTOR_SUFFIX}"


def get_or_create_limits_actor(app_name: str, ledger_dsn: str) -> ActorLimiter:
    """The deployment's LimitsActor, created by whichever router replica asks first. It lives in Serve's
    namespace (with the controller and replicas), not the namespace of the job that deployed the app."""
    actor = ray.remote(LimitsActor).options(
        name=limits_actor_name(app_name), namespace=SERVE_NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, max_concurrency=1, max_restarts=LIMITS_ACTOR_MAX_RESTARTS,
    ).remote(ledger_dsn)
    return ActorLimiter(actor)
