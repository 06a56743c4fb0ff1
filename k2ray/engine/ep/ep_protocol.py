"""What crosses between an offline EP engine (`EPLLMEngine`, in the caller's process) and its rank
processes (k2ray/dist/ep_rank_process.py): one socket pair per rank, pickled messages."""

from __future__ import annotations

from dataclasses import dataclass

from k2ray.engine.config import EngineConfig
from k2ray.engine.outputs import RequestOutput
from k2ray.sampling_params import SamplingParams


@dataclass(frozen=True)
class RankConfig:
    """Rank `rank` of `engine.ep_size`; rank 0 hosts the group's rendezvous on host:port."""

    engine: EngineConfig
    host: str
    port: int
    group_id: str
    rank: int
    torch_threads: int


@dataclass(frozen=True)
class RankReady:
    max_model_len: int
    num_total_blocks: int


@dataclass(frozen=True)
class RankAdd:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    stream: bool = False  # an output every step (deltas), not only the final one


@dataclass(frozen=True)
class RankAbort:
    request_ids: list[str]


@dataclass(frozen=True)
class RankWake:
    """Nothing to do: ends an idle rank's wait so it agrees on the next step now."""


@dataclass(frozen=True)
class RankShutdown:
    pass


@dataclass(frozen=True)
class RankStepOutputs:
    """One step of one rank: its outputs, the requests it failed (id -> why) or rejected at add, and its load."""

    outputs: list[RequestOutput]
    failed: dict[str, str]
    rejected: dict[str, str]
    num_free_blocks: int
    num_running: int


@dataclass(frozen=True)
class RankFailed:
    """The rank could not start, or lost its group: `request_ids` were aborted and their blocks freed
    (`num_free_blocks` of `num_total_blocks` are free now)."""

    message: str
    request_ids: list[str]
    num_free_blocks: int = 0
    num_total_blocks: int = 0
