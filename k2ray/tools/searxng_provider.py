"""`searxng`: a self-hosted SearXNG's JSON API (`GET {base_url}/search?q=...&format=json`) over httpx.

Only the configured base URL is ever requested (the query is a parameter, redirects are not followed); the
whole exchange is bounded by `timeout_s` and the body by `max_response_bytes`. SearXNG answers 403 to
`format=json` unless its settings list `json` under `search.formats`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from .search_result import SearchResponse, SearchResult

SEARCH_PATH = "/search"
HTTP_OK = 200
HTTP_FORBIDDEN = 403


def parse_searxng(provider: str, query: str, body: bytes, max_results: int) -> SearchResponse:
    """SearXNG's JSON body -> results; entries without a string url and title are skipped."""
    try:
        payload: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return SearchResponse.failed(provider, query, "bad_response", "the search provider's answer is not JSON")
    items = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        return SearchResponse.failed(provider, query, "bad_response",
                                     "the search provider's answer has no results list")
    results = []
    for item in items:
        if len(results) == max_results:
            break
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        title, content, published = item.get("title"), item.get("content"), item.get("publishedDate")
        results.append(SearchResult(
            title=title.strip() if isinstance(title, str) and title.strip() else item["url"],
            url=item["url"],
            snippet=content.strip() if isinstance(content, str) else "",
            page_age=published if isinstance(published, str) and published else None,
        ))
    return SearchResponse(provider=provider, query=query, results=tuple(results))


class SearxngProvider:
    name = "searxng"

    def __init__(self, base_url: str, *, timeout_s: float, max_response_bytes: int, language: str | None = None,
                 safesearch: int | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.search_url = base_url.rstrip("/") + SEARCH_PATH
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self._extra_params = {k: str(v) for k, v in (("language", language), ("safesearch", safesearch))
                              if v is not None}
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                                         headers={"Accept": "application/json"}, transport=transport)

    async def search(self, query: str, max_results: int) -> SearchResponse:
        try:
            # httpx's time-out is per read; wait_for bounds a server that trickles its body too.
            return await asyncio.wait_for(self._fetch(query, max_results), self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return SearchResponse.failed(self.name, query, "timeout",
                                         f"the search provider did not answer within {self.timeout_s:g} s")
        except httpx.HTTPError as e:
            return SearchResponse.failed(self.name, query, "unavailable",
                                         f"the search provider cannot be reached ({type(e).__name__})")

    async def _fetch(self, query: str, max_results: int) -> SearchResponse:
        params = {"q": query, "format": "json", **self._extra_params}
        async with self._client.stream("GET", self.search_url, params=params) as response:
            if response.status_code != HTTP_OK:
                hint = " (is json enabled in SearXNG's search.formats?)" if response.status_code == HTTP_FORBIDDEN else ""
                return SearchResponse.failed(self.name, query, "http_error",
                                             f"the search provider answered HTTP {response.status_code}{hint}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_response_bytes:
                    return SearchResponse.failed(self.name, query, "response_too_large",
                                                 f"the search provider's answer is over {self.max_response_bytes} bytes")
        return parse_searxng(self.name, query, bytes(body), max_results)

    async def aclose(self) -> None:
        await self._client.aclose()
