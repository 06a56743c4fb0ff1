"""What crosses the boundaries of disaggregated serving, as frozen dataclasses.

    decode replica ──CoreReserve──► decode core            (its prefix cache, its blocks)
    decode replica ──PrefillJob───► prefill replica ──CorePrefill──► prefill core
    decode replica ──CoreExpect───► decode core            (a receive posted on the pair)
    decode replica ──KVSendOrder──► the same prefill replica ──CoreSendKV──► prefill core ══ latent KV ══► decode core
    decode replica ──CoreCommit───► decode core            (decodes once the KV has landed)

Control travels as Serve calls (replica to replica) and socket messages (replica to its core); the
bulk KV goes straight from core to core over the pair's process group (k2ray/dist).
"""

from __future__ import annotations

from dataclasses import dataclass

from k2ray.dist.kv_pair_group import PairSpec
from k2ray.dist.kv_wire import KVTransferMeta, KVTransferStats
from k2ray.engine.kv.kv_transfer import PrefillResult
from k2ray.sampling_params import SamplingParams
from k2ray.serve.engine.engine_core_protocol import CoreAdd

# ---- replica <-> replica (Serve calls) ----


@dataclass(frozen=True)
class PrefillJob:
    """Prefill a prompt and hold its KV. `block_hashes` (the prompt's full blocks) steer the request
    router to the replica whose prefix cache holds most of them; `excluded_replica_ids` are replicas
    that already failed this request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_hashes: tuple[int, ...] = ()
    excluded_replica_ids: tuple[str, ...] = ()
    stall_s: float = 0.0  # test deployments only (`k2ray_test.prefill_stall_s`): a stuck prefill


@dataclass(frozen=True)
class PrefillAccepted:
    """The first item of a prefill stream: which replica took the job."""

    replica_id: str


@dataclass(frozen=True)
class PrefillReply:
    """The second item: the prefill's outcome on `replica_id` (send orders are pinned to it). `source_id`
    is the core that holds the KV (the replica's core, or the rank's core an EP replica chose), the one the
    decode core pairs with; None when nothing is held."""

    replica_id: str
    prefilled: Prefilled
    source_id: str | None


@dataclass(frozen=True)
class KVSendOrder:
    """Push the held KV of `meta.request_id` to the decode core waiting at `spec` (rank 1's end)."""

    replica_id: str  # the prefill replica that holds it: the request router sends the order there only
    meta: KVTransferMeta
    spec: PairSpec


@dataclass(frozen=True)
class KVRelease:
    """Drop a held prefill the decode side will not fetch (pinned to `replica_id`)."""

    replica_id: str
    request_id: str


@dataclass(frozen=True)
class ReplicaPin:
    """A call meant for one replica (its stats, say): the request router sends it there only."""

    replica_id: str


# ---- replica <-> its engine core (socket messages) ----


@dataclass(frozen=True)
class CoreReserve:
    """Decode core: look the prompt up in the prefix cache and reserve blocks for the rest (waiting
    for free blocks if need be), or prefill it locally when what is missing is short."""

    add: CoreAdd
    local_prefill_threshold: int
    ack_id: int


@dataclass(frozen=True)
class Reserved:
    """CoreReserve's answer: `meta` is None when the decode core prefills the request itself."""

    meta: KVTransferMeta | None

    @property
    def is_local(self) -> bool:
        return self.meta is None


@dataclass(frozen=True)
class CoreExpect:
    """Decode core: post the receive of a request's KV from the prefill core `source_id` (PrefillReply's);
    the ack carries the PairSpec the sender must use."""

    request_id: str
    source_id: str
    ack_id: int


@dataclass(frozen=True)
class CoreCommit:
    """Decode core: once the KV has landed, start decoding with the prefill's first token; the ack
    carries a Landed."""

    request_id: str
    prefill_result: PrefillResult
    ack_id: int


@dataclass(frozen=True)
class CoreCancelReceive:
    """Decode core: give up the request's receive (its prefill failed); the reservation stays."""

    request_id: str
    ack_id: int


@dataclass(frozen=True)
class Landed:
    stats: KVTransferStats | None
    error: str | None = None


@dataclass(frozen=True)
class CorePrefill:
    """Prefill core: prefill and hold the KV; the ack carries a Prefilled."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    ack_id: int


@dataclass(frozen=True)
class Prefilled:
    result: PrefillResult | None
    error: str | None = None
    is_rejected: bool = False  # the request itself is bad (too long, bad schema): no retry helps
    queue_s: float = 0.0  # how long it waited in the prefill engine's queue


@dataclass(frozen=True)
class CoreSendKV:
    """Prefill core: push a held request's KV, then free its blocks; the ack carries a Sent."""

    request_id: str
    meta: KVTransferMeta
    spec: PairSpec
    ack_id: int


@dataclass(frozen=True)
class CoreCachedHashes:
    """Prefill core: its most recently cached block hashes (short ints), for prefix-affinity routing."""

    max_hashes: int
    ack_id: int


@dataclass(frozen=True)
class Sent:
    stats: KVTransferStats | None
    error: str | None = None
