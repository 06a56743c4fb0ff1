"""`WebSearch`: what the router calls to run one search: bounds, cache, time-out, and no exception through.

Async API: call it from the router's event loop; the local provider moves its SQLite work to a thread and
SearXNG is async httpx, so a search never blocks the loop. Every call of `search` or `run_call` is one search
run; the router counts runs for billing (Moonshot bills each `$web_search` call, whatever it returns).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from .config import WebSearchConfig
from .local_provider import LocalSearchProvider
from .search_cache import SearchCache
from .search_call import parse_search_arguments
from .search_result import SearchError, SearchProvider, SearchResponse


def build_provider(config: WebSearchConfig) -> SearchProvider:
    """The configured provider; a missing or unreadable local index is a ValueError (fail at start-up)."""
    if config.provider == "searxng":
        from .searxng_provider import SearxngProvider  # httpx only where SearXNG is used

        assert config.searxng.base_url is not None  # WebSearchConfig's validator
        return SearxngProvider(config.searxng.base_url, timeout_s=config.timeout_s,
                               max_response_bytes=config.searxng.max_response_bytes,
                               language=config.searxng.language, safesearch=config.searxng.safesearch)
    return LocalSearchProvider(config.local.index_path, snippet_tokens=config.local.snippet_tokens)


class WebSearch:
    def __init__(self, config: WebSearchConfig, provider: SearchProvider,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.provider = provider
        self.cache = SearchCache(config.cache_max_entries, config.cache_ttl_s, clock=clock)

    @classmethod
    def from_config(cls, config: WebSearchConfig) -> WebSearch:
        return cls(config, build_provider(config))

    async def run_call(self, arguments: str | Mapping[str, Any]) -> SearchResponse:
        """Run the search a model's tool call asks for (its `arguments` JSON); bad arguments are an error
        response, like any failure."""
        query = parse_search_arguments(arguments)
        if isinstance(query, SearchError):
            return SearchResponse(provider=self.provider.name, query="", error=query)
        return await self.search(query)

    async def search(self, query: str, max_results: int | None = None) -> SearchResponse:
        """Up to `max_results` (at most `config.max_results`) results; never raises but on cancellation."""
        query = query.strip()
        name = self.provider.name
        if not query:
            return SearchResponse.failed(name, query, "invalid_query", "the search query is empty")
        if len(query) > self.config.max_query_chars:
            return SearchResponse.failed(name, query[: self.config.max_query_chars], "query_too_long",
                                         f"the search query is over {self.config.max_query_chars} characters")
        num_results = max(1, min(max_results or self.config.max_results, self.config.max_results))
        cached = self.cache.get(name, query, num_results)
        if cached is not None:
            return cached
        try:
            response = await asyncio.wait_for(self.provider.search(query, num_results), self.config.timeout_s)
        except asyncio.TimeoutError:
            return SearchResponse.failed(name, query, "timeout",
                                         f"the search provider did not answer within {self.config.timeout_s:g} s")
        except Exception as e:  # a provider bug must reach the model as a failed search, not fail the request
            return SearchResponse.failed(name, query, "unavailable", f"the search failed ({type(e).__name__})")
        self.cache.put(response, num_results)
        return response

    async def aclose(self) -> None:
        await self.provider.aclose()
