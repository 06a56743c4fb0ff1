"""Kimi K2 Thinking chat template: a checkpoint's chat_template.jinja, or the same layout in Python."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from k2ray.api.prompt_segments import (
    PromptSegment,
    check_no_markers,
    joined_text,
    mark_template_literals,
    merge_segments,
    split_marked,
    trusted,
    untrusted,
)

TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
MEDIA_PLACEHOLDER = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
EMPTY_THINK = THINK_BEGIN + THINK_END
ROLE_TAGS = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}
OTHER_ROLE_TAG = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"
GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
TOOL_RESULT_PREFIX = "## Return of "
# The HF file declares tools with `tojson(separators=(',', ':'))`; llama.cpp's copy uses json's default.
K2_TOOLS_JSON_SEPARATORS = (",", ":")


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: Sequence[str] | None = None, sort_keys: bool = False) -> str:
    """transformers' chat-template `tojson`: plain json.dumps, no HTML escaping, keys in given order."""
    seps = tuple(separators) if separators is not None else None
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=seps, sort_keys=sort_keys)


def deep_sort_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: deep_sort_keys(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [deep_sort_keys(v) for v in value]
    return value


@dataclass(frozen=True)
class ChatTemplateOptions:
    # Separators of the tool_declare JSON; the HF template is compact, llama.cpp's copy uses ", " / ": ".
    tools_json_separators: tuple[str, str] = K2_TOOLS_JSON_SEPARATORS
    # tokenization_kimi.py's apply_chat_template deep-sorts tool dict keys before rendering.
    sort_tool_keys: bool = True


def _content_segments(content: Any) -> list[PromptSegment]:
    if content is None:
        return []
    if isinstance(content, str):
        return [untrusted(content)]
    segments = []
    for part in content:
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            segments.append(trusted(MEDIA_PLACEHOLDER))
        else:
            segments.append(untrusted(part.get("text") or ""))
    return segments


def _tool_calls_segments(tool_calls: list[dict]) -> list[PromptSegment]:
    segments = [trusted(TOOL_CALLS_SECTION_BEGIN)]
    for call in tool_calls:
        args = call["function"]["arguments"]
        args_text = args if isinstance(args, str) else tojson(args)
        segments += [trusted(TOOL_CALL_BEGIN), untrusted(call.get("id") or ""), trusted(TOOL_CALL_ARGUMENT_BEGIN),
                     untrusted(args_text), trusted(TOOL_CALL_END)]
    return segments + [trusted(TOOL_CALLS_SECTION_END)]


def _message_segments(message: Mapping, keep_reasoning: bool) -> list[PromptSegment]:
    role = message["role"]
    segments = [trusted(ROLE_TAGS.get(role, OTHER_ROLE_TAG)), untrusted(message.get("name") or role),
                trusted(IM_MIDDLE)]
    content = _content_segments(message.get("content"))
    if role == "assistant":
        reasoning = (message.get("reasoning_content") or "") if keep_reasoning else ""
        segments += [trusted(THINK_BEGIN), untrusted(reasoning), trusted(THINK_END), *content]
        if message.get("tool_calls"):
            segments += _tool_calls_segments(message["tool_calls"])
    elif role == "tool":
        segments += [trusted(TOOL_RESULT_PREFIX), untrusted(message.get("tool_call_id") or ""), trusted("\n"),
                     *content]
    else:
        segments += content
    return segments


def is_partial(messages: Sequence[Mapping]) -> bool:
    return bool(messages) and messages[-1]["role"] == "assistant" and bool(messages[-1].get("partial"))


def render_builtin_segments(messages: Sequence[Mapping], tools: list | None = None, add_generation_prompt: bool = True,
                            thinking: bool = True,
                            tools_json_separators: Sequence[str] = K2_TOOLS_JSON_SEPARATORS) -> list[PromptSegment]:
    """K2 Thinking's chat_template.jinja in Python, with k2ray's `thinking` and `partial` additions."""
    partial = is_partial(messages)
    body = messages[:-1] if partial else messages
    # Reasoning survives only after the last assistant message without tool calls (the current turn).
    split = max((i + 1 for i, m in enumerate(body) if m["role"] == "assistant" and not m.get("tool_calls")),
                default=0)
    out = []
    if tools:
        out += [trusted(f"{OTHER_ROLE_TAG}tool_declare{IM_MIDDLE}"),
                untrusted(tojson(tools, separators=tools_json_separators)), trusted(IM_END)]
    if not messages or messages[0]["role"] != "system":
        out.append(trusted(f"{OTHER_ROLE_TAG}system{IM_MIDDLE}{DEFAULT_SYSTEM_PROMPT}{IM_END}"))
    for i, message in enumerate(body):
        out += _message_segments(message, keep_reasoning=i >= split) + [trusted(IM_END)]
    if partial:
        out += _message_segments(messages[-1], keep_reasoning=True)
    elif add_generation_prompt:
        out.append(trusted(GENERATION_PROMPT if thinking else GENERATION_PROMPT + EMPTY_THINK))
    return merge_segments(out)


def render_builtin(messages: Sequence[Mapping], tools: list | None = None, add_generation_prompt: bool = True,
                   thinking: bool = True, tools_json_separators: Sequence[str] = K2_TOOLS_JSON_SEPARATORS) -> str:
    return joined_text(render_builtin_segments(messages, tools, add_generation_prompt, thinking, tools_json_separators))


def _raise_exception(message: str) -> None:
    raise ValueError(message)


class ChatTemplate:
    """Renders OpenAI-shaped messages into a K2 prompt, as text or as trusted/untrusted segments.

    With `source` (a chat_template.jinja), renders it in a jinja2 sandbox set up like transformers'
    apply_chat_template; without, uses `render_builtin_segments`. Both give identical text for K2's
    template; in both, only the template's own literals are trusted segments.
    """

    def __init__(self, source: str | None = None, options: ChatTemplateOptions | None = None) -> None:
        self.options = options or ChatTemplateOptions()
        self.source = source
        self._template = None
        self._template_handles_thinking = True
        if source is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = _raise_exception
            parsed = env.parse(source)
            self._template_handles_thinking = "thinking" in meta.find_undeclared_variables(parsed)
            self._template = env.from_string(mark_template_literals(parsed))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, options: ChatTemplateOptions | None = None) -> ChatTemplate:
        path = Path(checkpoint_dir) / TEMPLATE_FILE
        source = path.read_text(encoding="utf-8") if path.exists() else None
        return cls(source, options)

    def render(self, messages: Sequence[Mapping], tools: list | None = None, add_generation_prompt: bool = True,
               thinking: bool = True, **template_kwargs: Any) -> str:
        return joined_text(self.render_segments(messages, tools, add_generation_prompt, thinking, **template_kwargs))

    def render_segments(self, messages: Sequence[Mapping], tools: list | None = None,
                        add_generation_prompt: bool = True, thinking: bool = True,
                        **template_kwargs: Any) -> list[PromptSegment]:
        """The prompt as segments; raises ValueError on a malformed conversation."""
        check_no_markers(messages, "messages")
        check_no_markers(tools, "tools")
        check_no_markers(template_kwargs, "chat_template_kwargs")
        if tools and self.options.sort_tool_keys:
            tools = deep_sort_keys(tools)
        seps = self.options.tools_json_separators
        if self._template is None:
            return render_builtin_segments(messages, tools, add_generation_prompt, thinking, seps)
        text = self._template.render(messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                                     thinking=thinking, tools_json_separators=seps, **template_kwargs)
        segments = split_marked(text)
        # A checkpoint template that ignores `thinking` (e.g. K2's own file) still gets thinking=False.
        if not (thinking or self._template_handles_thinking) and add_generation_prompt and not is_partial(messages):
            segments = merge_segments([*segments, trusted(EMPTY_THINK)])
        return segments
