"""Anthropic Messages API request, response, stream-event and error models. Pure pydantic."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from k2ray.api.json_schema import check_json_schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Model):
    type: Literal["text"]
    text: str


class ThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)


class ServerToolUseBlock(_Model):
    """A search the server ran (`web_search_20250305`); clients echo it back in later turns."""

    type: Literal["server_tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class WebSearchToolResultBlock(_Model):
    """The results of a `server_tool_use` search: `web_search_result` blocks, or one error object."""

    type: Literal["web_search_tool_result"]
    tool_use_id: str
    content: list[dict[str, Any]] | dict[str, Any]


InputBlock = Annotated[
    TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock | ServerToolUseBlock
    | WebSearchToolResultBlock,
    Field(discriminator="type"),
]


class InputMessage(_Model):
    role: Literal["user", "assistant"]
    content: str | list[InputBlock]


WEB_SEARCH_TOOL_TYPE = "web_search_20250305"


class ToolSpec(_Model):
    # None or "custom": a client tool; WEB_SEARCH_TOOL_TYPE: the server's web search (input_schema unused).
    type: Literal["custom", "web_search_20250305"] | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    max_uses: int | None = Field(default=None, ge=1)  # searches one request may run (server tool only)
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})

    @field_validator("input_schema")
    @classmethod
    def _check_input_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_json_schema(value)


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class MessagesPrompt(_Model):
    """What decides a Messages prompt: the body of /v1/messages/count_tokens, and the part of a
    /v1/messages body that both endpoints render the same way."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> MessagesPrompt:
        if self.tool_choice and self.tool_choice.type in ("any", "tool") and not self.tools:
            raise ValueError("tool_choice requires tools")
        if self.tool_choice and self.tool_choice.type == "tool":
            names = {t.name for t in self.tools or []}
            if self.tool_choice.name not in names:
                raise ValueError(f"tool_choice names unknown tool {self.tool_choice.name!r}")
        return self

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "".join(block.text for block in self.system)

    @property
    def is_thinking(self) -> bool:
        # K2 Thinking thinks unless told not to; an absent `thinking` keeps the model's default.
        return self.thinking is None or self.thinking.type != "disabled"

    @property
    def max_tool_calls(self) -> int | None:
        """`disable_parallel_tool_use` allows at most one tool_use block; None means no limit."""
        if self.tool_choice is not None and self.tool_choice.disable_parallel_tool_use:
            return 1
        return None


class MessagesRequest(MessagesPrompt):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    k2ray_test: dict[str, Any] | None = None  # test-only hook, as in openai_protocol


class MessageTokensCount(BaseModel):
    input_tokens: int  # the whole prompt /v1/messages would send, cache hits or not


class ServerToolUsage(BaseModel):
    web_search_requests: int = 0


class AnthropicUsage(BaseModel):
    input_tokens: int  # excludes cache reads, unlike OpenAI's prompt_tokens
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    server_tool_use: ServerToolUsage | None = None  # only when the request declared a server tool

    @model_serializer(mode="wrap")
    def _without_absent_server_tools(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("server_tool_use") is None:
            data.pop("server_tool_use", None)
        return data


OutputBlock = TextBlock | ThinkingBlock | ToolUseBlock | ServerToolUseBlock | WebSearchToolResultBlock

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessagesResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutputBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
