from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# The grammar of `json_object`: any JSON object (OpenAI's JSON mode never yields a bare array or scalar).
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


ToolChoiceMode = Literal["auto", "required", "named", "none"]
TOOL_CHOICE_MODES: tuple[str, ...] = ("auto", "required", "named", "none")
# Calls one tool-call section may hold when parallel calls are allowed: each position carries its own
# running index in the grammar, so the bound keeps the grammar small.
DEFAULT_MAX_TOOL_CALLS = 8


@dataclass(frozen=True)
class ToolFunction:
    """A declared function: its name and the JSON schema of its arguments (None: any JSON object)."""

    name: str
    parameters: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.name or "<|" in self.name:
            raise ValueError(f"a tool name must be non-empty text without K2 markers, got {self.name!r}")
        if self.parameters is not None and not isinstance(self.parameters, dict):
            raise ValueError(f"parameters of {self.name!r} must be a JSON object schema")


@dataclass(frozen=True)
class ToolCallParams:
    """K2 tool calls valid by construction: once a tool-call section opens, each call is
    `functions.NAME:IDX` with NAME declared and IDX the running index (`call_index_start` + position),
    its arguments valid against NAME's schema, and the section closes.

    mode: `auto` text or calls; `required` at least one call; `named` exactly one call of
    `forced_name`; `none` no section at all. `is_parallel` False allows one call at most.
    """

    functions: tuple[ToolFunction, ...] = ()
    mode: ToolChoiceMode = "auto"
    forced_name: str | None = None
    is_parallel: bool = True
    call_index_start: int = 0
    max_calls: int = DEFAULT_MAX_TOOL_CALLS

    def __post_init__(self) -> None:
        names = [f.name for f in self.functions]
        if self.mode not in TOOL_CHOICE_MODES:
            raise ValueError(f"tool choice mode must be one of {TOOL_CHOICE_MODES}, got {self.mode!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be distinct, got {names}")
        if self.mode in ("required", "named") and not names:
            raise ValueError(f"tool choice {self.mode!r} needs at least one declared function")
        if (self.mode == "named") != (self.forced_name is not None):
            raise ValueError("forced_name is set exactly when the mode is 'named'")
        if self.forced_name is not None and self.forced_name not in names:
            raise ValueError(f"the forced function {self.forced_name!r} is not declared")
        if self.call_index_start < 0 or self.max_calls < 1:
            raise ValueError("call_index_start must be >= 0 and max_calls >= 1")

    @property
    def callable_functions(self) -> tuple[ToolFunction, ...]:
        if self.mode == "none":
            return ()
        if self.mode == "named":
            return tuple(f for f in self.functions if f.name == self.forced_name)
        return self.functions

    @property
    def num_call_positions(self) -> int:
        if self.mode == "named" or not self.is_parallel:
            return 1
        return self.max_calls


@dataclass(frozen=True)
class StructuredOutputParams:
    """Constrain the output: JSON content (any object with `json_object`, or one matching
    `json_schema`), K2 tool calls (`tool_calls`), or both (content is then that JSON or a section).

    `reasoning`: the output opens inside K2 Thinking's reasoning; the constraint starts where it ends,
    and it may end only through `</think>` (no stop token, no tool-call section inside it).
    `max_reasoning_tokens` then forces `</think>` after that many reasoning tokens, so the constrained
    part gets room; it is a per-request setting, not part of the grammar.
    `enforce_after_token_id`: constrain only the tokens after the first time this token is sampled
    (a raw trigger, exclusive with `reasoning`); None constrains from the first token.
    Once the grammar is complete the request finishes with a stop token.
    """

    json_object: bool = False
    json_schema: dict[str, Any] | None = None
    enforce_after_token_id: int | None = None
    tool_calls: ToolCallParams | None = None
    reasoning: bool = False
    max_reasoning_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.json_object and self.json_schema is not None:
            raise ValueError("structured output needs exactly one of json_object or json_schema")
        if not self.json_object and self.json_schema is None and self.tool_calls is None:
            raise ValueError("structured output needs exactly one of json_object or json_schema, or tool_calls")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema must be a JSON object, got {type(self.json_schema).__name__}")
        if self.enforce_after_token_id is not None and self.enforce_after_token_id < 0:
            raise ValueError(f"enforce_after_token_id must be a token id, got {self.enforce_after_token_id}")
        if self.reasoning and self.enforce_after_token_id is not None:
            raise ValueError("reasoning and enforce_after_token_id are exclusive")
        if self.max_reasoning_tokens is not None and (not self.reasoning or self.max_reasoning_tokens < 0):
            raise ValueError("max_reasoning_tokens needs reasoning and must be >= 0")

    @property
    def content_schema(self) -> dict[str, Any] | None:
        """The JSON schema the content must match; None when the content is free text."""
        return JSON_OBJECT_SCHEMA if self.json_object else self.json_schema

    @property
    def schema_key(self) -> str:
        """The grammar's specification as canonical JSON text: equal ones share one compiled grammar
        (`max_reasoning_tokens` and `enforce_after_token_id` act at run time, outside the grammar)."""
        spec: dict[str, Any] = {"content": self.content_schema}
        if self.tool_calls is not None:
            spec["tools"] = asdict(self.tool_calls)
        if self.reasoning:
            spec["reasoning"] = True
        return json.dumps(spec, sort_keys=True)


@dataclass
class SamplingParams:
    """How to sample one request, in vLLM's vocabulary.

    `temperature == 0` means greedy. `top_k` of None means no top-k cut; `logprobs` of None
    means no logprobs, an int N means the sampled token's logprob plus the top N alternatives.
    `priority` orders scheduling as in vLLM's priority policy: lower values are admitted and
    scheduled first and preempted last; equal priorities go by arrival.
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
    priority: int = 0

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
