"""Search responses -> what the model reads (bounded tool-result text) and Anthropic's result blocks.

The text goes into the prompt as a tool result, which the chat template encodes as plain text, so result
content cannot open a turn. Anthropic's `encrypted_content` is opaque to clients and comes back in later
turns; ours is the model's text as base64url JSON (readable, not secret), so a later turn can render it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .config import AnthropicResultConfig, WebSearchConfig
from .search_result import SearchErrorKind, SearchResponse, SearchResult

ELLIPSIS = "…"
ENCRYPTED_CONTENT_VERSION = 1
# Anthropic's web_search_tool_result_error codes for our error kinds.
ANTHROPIC_ERROR_CODES: dict[SearchErrorKind, str] = {
    "invalid_query": "invalid_tool_input",
    "query_too_long": "query_too_long",
    "timeout": "unavailable",
    "http_error": "unavailable",
    "bad_response": "unavailable",
    "response_too_large": "unavailable",
    "unavailable": "unavailable",
}
MAX_USES_EXCEEDED = "max_uses_exceeded"  # the router's own error: the request's max_uses is spent


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - len(ELLIPSIS))] + ELLIPSIS


def result_text(result: SearchResult, max_chars: int) -> str:
    """The excerpt the model reads for one result: the whole document if the provider has it."""
    return truncate(" ".join((result.content or result.snippet).split()), max_chars)


def _result_block(number: int, result: SearchResult, max_chars: int) -> str:
    lines = [f"[{number}] {result.title}", f"URL: {result.url}"]
    if result.page_age:
        lines.append(f"Published: {result.page_age}")
    lines.append(result_text(result, max_chars))
    return "\n".join(lines)


def format_tool_text(response: SearchResponse, config: WebSearchConfig) -> str:
    """The tool output the model receives for one search, at most `config.max_tool_result_chars`."""
    query = truncate(response.query, config.max_query_chars)
    if response.error is not None:
        text = (f"Web search failed ({response.error.kind}): {response.error.message}. "
                "Answer from what you know, or search again with a different query.")
    elif not response.results:
        text = f'No web search results for "{query}".'
    else:
        blocks = [f'Web search results for "{query}":']
        blocks += [_result_block(i + 1, r, config.max_result_chars) for i, r in enumerate(response.results)]
        text = "\n\n".join(blocks)
    return truncate(text, config.max_tool_result_chars)


def encode_encrypted_content(text: str) -> str:
    payload = json.dumps({"v": ENCRYPTED_CONTENT_VERSION, "text": text}, ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode("ascii")


def decode_encrypted_content(value: str) -> str | None:
    """The text inside our `encrypted_content`; None for anything we did not write (or an empty value)."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(value.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        return None
    if not isinstance(payload, dict) or payload.get("v") != ENCRYPTED_CONTENT_VERSION:
        return None
    text = payload.get("text")
    return text if isinstance(text, str) else None


def anthropic_result_content(response: SearchResponse, config: WebSearchConfig) -> list[dict[str, Any]] | dict[str, Any]:
    """The `content` of a `web_search_tool_result` block: the result list, or the error object."""
    if response.error is not None:
        return anthropic_error_content(ANTHROPIC_ERROR_CODES[response.error.kind])
    shape: AnthropicResultConfig = config.anthropic
    content = []
    for result in response.results:
        text = result_text(result, config.max_result_chars)
        block: dict[str, Any] = {"type": "web_search_result", "title": result.title, "url": result.url,
                                 "encrypted_content": encode_encrypted_content(text)
                                 if shape.encrypted_content == "text" else ""}
        if shape.include_page_age and result.page_age:
            block["page_age"] = result.page_age
        content.append(block)
    return content


def anthropic_error_content(error_code: str) -> dict[str, Any]:
    return {"type": "web_search_tool_result_error", "error_code": error_code}


def anthropic_tool_result_block(tool_use_id: str, response: SearchResponse, config: WebSearchConfig) -> dict[str, Any]:
    return {"type": "web_search_tool_result", "tool_use_id": tool_use_id,
            "content": anthropic_result_content(response, config)}


def response_from_anthropic_content(query: str, content: Any, provider: str = "anthropic") -> SearchResponse:
    """A client's echoed `web_search_tool_result` content -> a response to render into the prompt again
    (with `format_tool_text`); results we cannot read keep their title and url with an empty excerpt."""
    if isinstance(content, dict):
        code = content.get("error_code")
        return SearchResponse.failed(provider, query, "unavailable", f"the search failed ({code})")
    results = []
    for item in content if isinstance(content, list) else []:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            text = decode_encrypted_content(item.get("encrypted_content") or "") or ""
            page_age = item.get("page_age")
            results.append(SearchResult(title=str(item.get("title") or item["url"]), url=item["url"], snippet=text,
                                        page_age=page_age if isinstance(page_age, str) else None))
    return SearchResponse(provider=provider, query=query, results=tuple(results))
