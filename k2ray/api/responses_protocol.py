"""OpenAI Responses API request models, and their translation into the chat request the router serves.

k2ray keeps no responses: `store: true`, `previous_response_id`, `conversation` and `background` are
refused by the handler, so a conversation travels whole in `input`. Input items map onto chat messages
(instructions and system/developer messages -> system, reasoning items -> the next assistant turn's
reasoning_content, function_call items -> that turn's tool_calls, function_call_output -> tool messages);
tools are Responses' flat function shape. Pure pydantic: no torch, no ray.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from k2ray.api.json_schema import check_json_schema
from k2ray.api.openai_protocol import ChatCompletionRequest, ThinkingSwitch

# Content part types that carry text; images, files and audio have no place in a text-only model.
TEXT_PART_TYPES = ("input_text", "output_text", "text", "reasoning_text", "summary_text", "refusal")
NO_REASONING_EFFORT = "none"


class _Model(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Model):
    type: str
    text: str | None = None
    refusal: str | None = None


def parts_text(content: str | list[ContentPart], where: str) -> str:
    """The text of a content field; ValueError naming `where` for a part that is not text."""
    if isinstance(content, str):
        return content
    for i, part in enumerate(content):
        if part.type not in TEXT_PART_TYPES:
            raise ValueError(f"{where}[{i}]: content parts of type {part.type!r} are not supported "
                             f"(this model reads text only)")
    return "".join(part.text or part.refusal or "" for part in content)


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = ""


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    summary: list[ContentPart] = Field(default_factory=list)
    content: list[ContentPart] | None = None


def _item_type(value: Any) -> str:
    # An "easy" input message may leave out its type.
    raw = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return raw if isinstance(raw, str) else "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments are grammar-constrained either way

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_json_schema(value)


class NamedFunctionChoice(_Model):
    type: Literal["function"]
    name: str


class TextFormat(_Model):
    """`text.format`: json_schema is flat here (name, schema, strict beside the type)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> TextFormat:
        if self.type == "json_schema":
            if self.name is None or self.json_schema is None:
                raise ValueError("text.format of type json_schema needs a name and a schema")
            check_json_schema(self.json_schema)
        return self


class TextConfig(_Model):
    format: TextFormat | None = None


class ReasoningConfig(_Model):
    effort: str | None = None  # "none" turns K2's thinking off; any other effort keeps it on
    summary: str | None = None


class ResponsesRequest(_Model):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = Field(default=None, ge=1)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    thinking: ThinkingSwitch | None = None  # Moonshot's switch, as on chat completions
    seed: int | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    k2ray_test: dict[str, Any] | None = None  # test-only hook, as in openai_protocol

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be empty")
        if isinstance(self.tool_choice, NamedFunctionChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError("tool_choice requires tools")
        if isinstance(self.tool_choice, NamedFunctionChoice):
            if self.tool_choice.name not in {t.name for t in self.tools or []}:
                raise ValueError(f"tool_choice names unknown function {self.tool_choice.name!r}")
        return self

    @property
    def is_thinking(self) -> bool:
        if self.thinking is not None:
            return self.thinking.type == "enabled"
        return self.reasoning is None or self.reasoning.effort != NO_REASONING_EFFORT

    @property
    def max_calls(self) -> int | None:
        """How many calls the response may hold (None: no limit)."""
        return 1 if not self.parallel_tool_calls else self.max_tool_calls


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """`instructions` + `input` as chat messages; ValueError (naming the item) for what has no chat form."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    reasoning = ""
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if isinstance(item, ReasoningItem):
            reasoning += parts_text(item.content or item.summary, f"{where}.content")
            continue
        if isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": parts_text(item.output, f"{where}.output")})
            continue
        last = messages[-1] if messages else None
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if last is not None and last["role"] == "assistant" and not reasoning:
                last.setdefault("tool_calls", []).append(call)  # parallel calls of one assistant turn
                continue
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": parts_text(item.content, f"{where}.content")})
        if reasoning and messages[-1]["role"] == "assistant":
            messages[-1]["reasoning_content"], reasoning = reasoning, ""
    return messages


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completions request this Responses request means (ValueError where there is none)."""
    body: dict[str, Any] = {
        "model": req.model, "messages": input_messages(req), "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stream": req.stream,
        "parallel_tool_calls": req.parallel_tool_calls, "thinking": {"type": "enabled" if req.is_thinking
                                                                     else "disabled"},
    }
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(include={"name", "description", "parameters"},
                                                                      exclude_none=True)} for t in req.tools]
    if isinstance(req.tool_choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "description": fmt.description, "schema": fmt.json_schema, "strict": fmt.strict}}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    return ChatCompletionRequest.model_validate(body)
