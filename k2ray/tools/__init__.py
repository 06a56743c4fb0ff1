"""Server-side tools (pure Python): `$web_search` providers, the result cache, and result formatting.

The router builds one `WebSearch.from_config(config.tools.web_search)` per replica and awaits
`run_call(arguments)` / `search(query)`; each call is one billed search. Failures come back as
`SearchResponse.error`, rendered for the model by `format_tool_text`. (httpx is imported only when the
searxng provider is built: `k2ray.tools.searxng_provider`.)
"""

from .config import AnthropicResultConfig, LocalIndexConfig, SearxngConfig, ToolsConfig, WebSearchConfig
from .local_provider import EMBEDDED_DOCUMENTS, EMBEDDED_INDEX, LocalSearchProvider
from .result_format import (
    MAX_USES_EXCEEDED,
    anthropic_error_content,
    anthropic_result_content,
    anthropic_tool_result_block,
    decode_encrypted_content,
    format_tool_text,
    response_from_anthropic_content,
)
from .search_cache import SearchCache, normalize_query
from .search_call import WEB_SEARCH_DESCRIPTION, WEB_SEARCH_PARAMETERS, parse_search_arguments
from .search_index import build_index
from .search_result import SearchError, SearchErrorKind, SearchProvider, SearchResponse, SearchResult
from .web_search import WebSearch, build_provider

__all__ = [
    "EMBEDDED_DOCUMENTS", "EMBEDDED_INDEX", "MAX_USES_EXCEEDED", "WEB_SEARCH_DESCRIPTION", "WEB_SEARCH_PARAMETERS",
    "AnthropicResultConfig", "LocalIndexConfig", "LocalSearchProvider", "SearchCache", "SearchError",
    "SearchErrorKind", "SearchProvider", "SearchResponse", "SearchResult", "SearxngConfig",
    "ToolsConfig", "WebSearch", "WebSearchConfig", "anthropic_error_content", "anthropic_result_content",
    "anthropic_tool_result_block", "build_index", "build_provider", "decode_encrypted_content",
    "format_tool_text", "normalize_query", "parse_search_arguments", "response_from_anthropic_content",
]
