"""The search tool as the model sees it, and its call's arguments -> the query to run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .search_result import SearchError

# What the router declares to the model for `$web_search` (Moonshot) and `web_search_20250305` (Anthropic).
WEB_SEARCH_DESCRIPTION = (
    "Search the web. Use it for facts you are unsure of or that may have changed; the results come back as "
    "this tool's output, each with a title, a URL and an excerpt."
)
WEB_SEARCH_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "what to search for, as keywords or a question"}},
    "required": ["query"],
    "additionalProperties": False,
}
QUERY_ARGUMENT = "query"


def parse_search_arguments(arguments: str | Mapping[str, Any]) -> str | SearchError:
    """The query in a search call's arguments (a JSON object string, or the object), or why there is none."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return SearchError("invalid_query", "the search call's arguments are not a JSON object")
    query = arguments.get(QUERY_ARGUMENT) if isinstance(arguments, Mapping) else None
    if not isinstance(query, str):
        return SearchError("invalid_query", f"the search call needs a string {QUERY_ARGUMENT!r} argument")
    return query
