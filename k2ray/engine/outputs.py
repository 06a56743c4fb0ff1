from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from k2ray.sampling_params import SamplingParams

if TYPE_CHECKING:  # kv_transfer imports this module
    from xgrammar import CompiledGrammar

    from k2ray.engine.kv.kv_transfer import PrefillResult


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """vLLM's RequestOutput. From AsyncLLMEngine each one is a delta (new tokens/text only);
    from LLM.generate it is the whole result. A prefill-role engine's finished output carries
    `prefill_result` (first token, held KV blocks) for the decode engine."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prefill_result: PrefillResult | None = None


# ---- engine-internal contracts: scheduler -> model runner -> scheduler ----

@dataclass(frozen=True, slots=True)
class NewRequestData:
    """Sent to the runner once, the first time a request is scheduled; a request whose first
    token came from a prefill engine arrives with it in `output_token_ids` (for the penalties).
    A constrained request comes with its compiled `grammar`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    grammar: CompiledGrammar | None = None


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One request's work this step: compute `token_ids`, which sit at positions
    num_computed_tokens .. num_computed_tokens + len(token_ids) - 1, into the blocks `block_ids`.
    `sample` is set when this step completes the request's known tokens (a decode, or the last
    prefill chunk), so the runner samples a next token from its last position."""

    request_id: str
    num_computed_tokens: int
    token_ids: list[int]
    block_ids: list[int]
    sample: bool


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    new_requests: list[NewRequestData]
    finished_request_ids: frozenset[str]
    num_scheduled_tokens: int
    preempted_request_ids: frozenset[str] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class SampledLogprobs:
    """The sampled token's logprob and rank, then the top-N (token id, logprob) alternatives."""

    logprob: float
    rank: int
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelRunnerOutput:
    """New token per sampled request (requests that only advanced a prefill chunk are absent)."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, SampledLogprobs]
