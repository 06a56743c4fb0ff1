"""`$web_search` (Moonshot's builtin, OpenAI chat) and `web_search_20250305` (Anthropic Messages) as the model
sees them: the function declared in the search tool's place, one request's search limit, one search's
outcome in each API's shape, and searches a client echoes back in later turns rendered into the prompt.

The model calls the search like any function (`functions.NAME:IDX`, NAME `$web_search` or the Anthropic
tool's name), so its calls are grammar-valid and its ids are K2's own; Anthropic's `server_tool_use` blocks
carry those ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from k2ray.api.anthropic_protocol import (
    WEB_SEARCH_TOOL_TYPE,
    ServerToolUseBlock,
    ToolSpec,
    WebSearchToolResultBlock,
)
from k2ray.api.openai_protocol import ToolDef
from k2ray.api.tool_call_parser import ToolCall
from k2ray.serve.http.errors import invalid_request
from k2ray.tools import (
    MAX_USES_EXCEEDED,
    WEB_SEARCH_DESCRIPTION,
    WEB_SEARCH_PARAMETERS,
    SearchResponse,
    WebSearch,
    WebSearchConfig,
    anthropic_error_content,
    anthropic_result_content,
    format_tool_text,
    parse_search_arguments,
    response_from_anthropic_content,
)

OPENAI_BUILTIN_TYPE = "builtin_function"
OPENAI_SEARCH_NAME = "$web_search"


@dataclass(frozen=True)
class SearchTool:
    """The search tool one request declared."""

    name: str  # the function name the model calls
    max_searches: int  # search runs one request may make (`max_rounds`, or Anthropic's `max_uses` below it)


def search_function(name: str) -> dict[str, Any]:
    return {"type": "function",
            "function": {"name": name, "description": WEB_SEARCH_DESCRIPTION, "parameters": WEB_SEARCH_PARAMETERS}}


def openai_declared_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Client tools as the model sees them: `$web_search` becomes its function; another builtin is a 400."""
    if not tools:
        return tools
    declared = []
    for tool in tools:
        if tool.get("type") != OPENAI_BUILTIN_TYPE:
            declared.append(tool)
        elif tool["function"]["name"] == OPENAI_SEARCH_NAME:
            declared.append(search_function(OPENAI_SEARCH_NAME))
        else:
            raise invalid_request(f"Unknown builtin_function {tool['function']['name']!r}: only "
                                  f"{OPENAI_SEARCH_NAME!r} is served", param="tools")
    return declared


def openai_search_tool(tools: list[ToolDef] | None, web_search: WebSearch | None) -> SearchTool | None:
    names = [t.function.name for t in tools or [] if t.type == OPENAI_BUILTIN_TYPE]
    if OPENAI_SEARCH_NAME not in names:
        return None
    return SearchTool(OPENAI_SEARCH_NAME, _available(web_search).config.max_rounds)


def anthropic_search_tool(tools: list[ToolSpec] | None, web_search: WebSearch | None) -> SearchTool | None:
    searches = [t for t in tools or [] if t.type == WEB_SEARCH_TOOL_TYPE]
    if not searches:
        return None
    if len(searches) > 1:
        raise invalid_request(f"Only one {WEB_SEARCH_TOOL_TYPE} tool may be declared", param="tools")
    max_rounds = _available(web_search).config.max_rounds
    max_uses = searches[0].max_uses
    return SearchTool(searches[0].name, max_rounds if max_uses is None else min(max_uses, max_rounds))


def anthropic_function(tool: ToolSpec) -> dict[str, Any]:
    if tool.type == WEB_SEARCH_TOOL_TYPE:
        return search_function(tool.name)
    return {"type": "function",
            "function": {"name": tool.name, "description": tool.description or "", "parameters": tool.input_schema}}


def _available(web_search: WebSearch | None) -> WebSearch:
    if web_search is None:
        raise invalid_request("Web search is not enabled on this deployment", param="tools")
    return web_search


@dataclass(frozen=True)
class SearchOutcome:
    """One search call of the model and what came of it: the tool text the model reads next, Anthropic's
    result content, and whether it is billed (a search that ran and succeeded)."""

    call_id: str
    name: str
    query: str
    text: str
    anthropic_content: list[dict[str, Any]] | dict[str, Any]
    is_billed: bool

    def tool_message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.call_id, "name": self.name, "content": self.text}

    def server_tool_use_block(self) -> dict[str, Any]:
        return {"type": "server_tool_use", "id": self.call_id, "name": self.name, "input": {"query": self.query}}

    def result_block(self) -> dict[str, Any]:
        return {"type": "web_search_tool_result", "tool_use_id": self.call_id, "content": self.anthropic_content}


def searched(call: ToolCall, response: SearchResponse, config: WebSearchConfig) -> SearchOutcome:
    return SearchOutcome(call.id, call.name, response.query, format_tool_text(response, config),
                         anthropic_result_content(response, config), is_billed=response.is_ok)


def over_limit(call: ToolCall, max_searches: int) -> SearchOutcome:
    """A call beyond the request's search limit: not run, not billed; the model is told to answer."""
    query = parse_search_arguments(call.arguments)
    text = (f"Web search not run: this request's {max_searches} searches are used up. "
            "Answer from the results you already have.")
    return SearchOutcome(call.id, call.name, query if isinstance(query, str) else "", text,
                         anthropic_error_content(MAX_USES_EXCEEDED), is_billed=False)


def anthropic_assistant_turns(blocks: list[Any], assistant_message: Callable[[list[Any]], dict[str, Any]],
                              config: WebSearchConfig) -> list[dict[str, Any]]:
    """An echoed assistant message holding searches -> K2 messages: the assistant's part up to its
    `server_tool_use` calls, a tool message per `web_search_tool_result` (its text as the model read it),
    and the rest of the assistant's output."""
    messages: list[dict[str, Any]] = []
    segment: list[Any] = []
    queries: dict[str, str] = {}
    for block in blocks:
        if isinstance(block, WebSearchToolResultBlock):
            if segment:
                messages.append(assistant_message(segment))
                segment = []
            response = response_from_anthropic_content(queries.get(block.tool_use_id, ""), block.content)
            messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                             "content": format_tool_text(response, config)})
            continue
        if isinstance(block, ServerToolUseBlock):
            queries[block.id] = str(block.input.get("query", ""))
        segment.append(block)
    if segment or not messages:
        messages.append(assistant_message(segment))
    return messages


def call_arguments(block: ServerToolUseBlock) -> str:
    return json.dumps(block.input, ensure_ascii=False)

