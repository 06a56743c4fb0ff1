from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The grammar of `json_object`: any JSON object (OpenAI's JSON mode never yields a bare array or scalar).
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class StructuredOutputParams:
    """Constrain the output to JSON: any object (`json_object`) or one matching `json_schema`.

    `enforce_after_token_id`: constrain only the tokens after the first time this token is sampled
    (K2 Thinking's `</think>`, so the reasoning stays free); None constrains from the first token.
    Once the grammar is complete the request finishes with a stop token.
    """

    json_object: bool = False
    json_schema: dict[str, Any] | None = None
    enforce_after_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.json_object == (self.json_schema is not None):
            raise ValueError("structured output needs exactly one of json_object or json_schema")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema must be a JSON object, got {type(self.json_schema).__name__}")
        if self.enforce_after_token_id is not None and self.enforce_after_token_id < 0:
            raise ValueError(f"enforce_after_token_id must be a token id, got {self.enforce_after_token_id}")

    @property
    def schema_key(self) -> str:
        """The schema as canonical JSON text: equal schemas share one compiled grammar."""
        return json.dumps(JSON_OBJECT_SCHEMA if self.json_object else self.json_schema, sort_keys=True)


@dataclass
class SamplingParams:
    """How to sample one request, in vLLM's vocabulary.

    `temperature == 0` means greedy. `top_k` of None means no top-k cut; `logprobs` of None
    means no logprobs, an int N means the sampled token's logprob plus the top N alternatives.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutputParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 or None, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
