"""What crosses the engine replica <-> engine core process boundary (one socket pair, pickled messages).

The engine replica (the Serve actor) forwards requests to its engine core process and gets back only
what Serve needs: which requests finished, acknowledgements, and, for requests streamed back through
Serve rather than over the delta channel, their deltas. Token deltas of channel requests go from the
core straight to the router replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.engine.config import EngineConfig
from k2ray.sampling_params import SamplingParams
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure, ReplyAddress

if TYPE_CHECKING:
    from k2ray.serve.test_hooks import Injection


@dataclass(frozen=True)
class CorePDConfig:
    """A prefill or decode core's KV transfers: `host` is where a decode core's pairs listen,
    `core_id` names its pairs; `send_chunk_delay_s` slows each chunk a prefill core sends (a test
    hook, honoured only with `allow_injection`)."""

    transfer: KVTransferConfig
    host: str
    core_id: str
    send_chunk_delay_s: float = 0.0


@dataclass(frozen=True)
class CoreEPConfig:
    """This core is rank `rank` of its replica's EP group (engine.ep_size ranks); rank 0 hosts the
    group's rendezvous on host:port, `group_id` names the group."""

    host: str
    port: int
    group_id: str
    rank: int


@dataclass(frozen=True)
class CoreConfig:
    engine: EngineConfig
    stream_interval: int
    torch_threads: int
    allow_injection: bool = False  # honour requests' test hooks (`testing.allow_injection`)
    pd: CorePDConfig | None = None  # role "prefill" or "decode" only
    cpu_affinity: tuple[int, ...] | None = None  # CPUs the core process may run on; None: any
    ep: CoreEPConfig | None = None  # engine.ep_size > 1 only


@dataclass(frozen=True)
class CoreAdd:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    reply_to: ReplyAddress | None  # None: deltas come back to the replica as CoreDeltas
    injection: Injection | None = None


@dataclass(frozen=True)
class CoreAbort:
    request_id: str
    ack_id: int
    failure: EngineFailure | None = None  # end the request with this error instead of `abort`


@dataclass(frozen=True)
class CoreStatsQuery:
    ack_id: int


@dataclass(frozen=True)
class CoreShutdown:
    pass


@dataclass(frozen=True)
class CoreReady:
    max_model_len: int  # what a request may use: min(model limit, KV cache capacity)
    block_size: int


@dataclass(frozen=True)
class CoreDeltas:
    """One step's deltas of the requests that have no reply address."""

    deltas: list[tuple[str, EngineDelta]]


@dataclass(frozen=True)
class CoreFinished:
    """Channel requests that are over: final delta written, or their router unreachable (aborted)."""

    request_ids: list[str]


@dataclass(frozen=True)
class CoreAck:
    ack_id: int
    payload: object = None  # stats (dict[str, int]), or a P/D message's answer (pd_protocol)


@dataclass(frozen=True)
class CoreFailed:
    """The core could not start (or died of an unexpected error); the replica is unusable."""

    message: str
