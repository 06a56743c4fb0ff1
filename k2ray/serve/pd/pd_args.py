"""The `pd` section of the serve config: how the decode pool drives the prefill pool."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from k2ray.dist.kv_connector import DEFAULT_KV_TRANSFER_TIMEOUT_S, DEFAULT_MAX_CHUNK_BYTES


class PDArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A prompt whose part missing from the decode replica's prefix cache is shorter than this many
    # tokens is prefilled by the decode replica itself (Dynamo's conditional disaggregation); 0: never.
    local_prefill_threshold: int = Field(default=256, ge=0)
    # Another prefill replica is tried this many times after one died, timed out or failed its transfer.
    prefill_retries: int = Field(default=1, ge=0)
    prefill_timeout_s: float = Field(default=120.0, gt=0.0)  # one prefill call, queueing included
    kv_transfer_timeout_s: float = Field(default=DEFAULT_KV_TRANSFER_TIMEOUT_S, gt=0.0)  # every wait of a transfer
    kv_max_chunk_bytes: int = Field(default=DEFAULT_MAX_CHUNK_BYTES, ge=1)
    # Address a decode core's KV pairs listen on (prefill cores connect to it); None: the node IP Ray
    # gives the decode replica (127.0.0.1 under `k2ray serve`).
    kv_host: str | None = None
    # How often replicas report their load (and a prefill replica its cached block hashes) to Serve's
    # request routers.
    routing_stats_period_s: float = Field(default=1.0, gt=0.0)
    # A prefill replica advertises at most this many of its most recently cached block hashes.
    affinity_max_hashes: int = Field(default=4096, ge=0)
