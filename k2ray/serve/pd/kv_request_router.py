"""KVAwareRequestRouter: Serve's request router for both P/D pools.

It ranks a pool's replicas from the routing stats they report (`record_routing_stats`):
- a call whose first argument names a `replica_id` (a send order, a release) goes to that replica:
  the KV it is about sits there. If that replica is gone the call goes to another, which answers
  that it holds no such KV (the caller's retry path), rather than wait for a replica that is gone;
- a prefill job goes to the replica whose prefix cache holds the longest run of the prompt's first
  blocks (prefix affinity), skipping replicas that already failed it, ties to the least loaded;
- anything else (a decode request) goes to the least loaded: fewest requests in flight, then most
  free KV blocks.
Requests in flight are what this router itself has sent and not seen finish (Serve's queue-length
cache, fresh at every send) where it knows them, else the replica's reported running and waiting
requests: reported stats are up to a stats period old, so a burst ranked on them alone would pile onto
one replica. Ties go to a random one of the tied replicas, for the same reason.
Serve then takes the first ranked replica that has room (`max_ongoing_requests`).
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from k2ray.serve.pd.prefix_hashes import num_leading_matches


# Not FIFOMixin: it hands the replica one request's routing found to the oldest pending request, so
# of two concurrent calls pinned to replicas A and B both could land on B (and a prefill could run
# where another prompt's prefix is cached). RequestRouter's own matching gives each request the
# replica chosen for it.
class KVAwareRequestRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        first = pending_request.args[0] if pending_request is not None and pending_request.args else None
        pinned = getattr(first, "replica_id", None)
        if isinstance(pinned, str):
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == pinned]
            if chosen:
                return [chosen]
        excluded = set(getattr(first, "excluded_replica_ids", ()))
        pool = [r for r in candidate_replicas if r.replica_id.unique_id not in excluded] or candidate_replicas
        block_hashes = getattr(first, "block_hashes", ())
        ranked = sorted(pool, key=lambda r: (-_affinity(r, block_hashes), *self._load(r), random.random()))
        return [[replica] for replica in ranked]

    def num_in_flight(self, replica: RunningReplica) -> int | None:
        """Requests this router sent to the replica that have not finished; None when unknown."""
        return self.replica_queue_len_cache.get(replica.replica_id)

    def _load(self, replica: RunningReplica) -> tuple[int, int]:
        stats: dict[str, Any] = replica.routing_stats or {}
        num_in_flight = self.num_in_flight(replica)
        if num_in_flight is None:
            num_in_flight = stats.get("num_running", 0) + stats.get("num_waiting", 0)
        return num_in_flight, -stats.get("num_free_blocks", 0)


def _affinity(replica: RunningReplica, block_hashes: tuple[int, ...]) -> int:
    if not block_hashes:
        return 0
    cached = (replica.routing_stats or {}).get("cached_hashes") or ()
    return num_leading_matches(block_hashes, frozenset(cached))
