"""The provider contract: `SearchProvider.search(query, max_results) -> SearchResponse`, and its result types.

Providers are async and never block the event loop (the local index runs its SQLite query on a worker
thread). A failure is data, not an exception: `SearchResponse.error` carries a `SearchError` whose message
is safe to show the model (no URLs of internal hosts, no stack traces), so the router can hand it over as
the tool's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

SearchErrorKind = Literal[
    "invalid_query",       # empty, or arguments that are not a search call
    "query_too_long",      # over `max_query_chars`
    "timeout",             # the provider did not answer within `timeout_s`
    "http_error",          # the provider answered with a non-2xx status
    "bad_response",        # the provider's body is not the JSON shape it documents
    "response_too_large",  # the provider's body is over `max_response_bytes`
    "unavailable",         # could not connect, or the index cannot be opened
]


@dataclass(frozen=True, slots=True)
class SearchResult:
    title: str
    url: str
    snippet: str  # a short excerpt around the matched terms
    content: str | None = None  # the whole document when the provider has it (local index)
    page_age: str | None = None  # publication date as the provider reports it, if any


@dataclass(frozen=True, slots=True)
class SearchError:
    kind: SearchErrorKind
    message: str  # shown to the model verbatim


@dataclass(frozen=True, slots=True)
class SearchResponse:
    """What one search run returned. Exactly one of `results` (possibly empty) and `error` is meaningful."""

    provider: str
    query: str
    results: tuple[SearchResult, ...] = ()
    error: SearchError | None = None
    is_cached: bool = False

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, provider: str, query: str, kind: SearchErrorKind, message: str) -> SearchResponse:
        return cls(provider=provider, query=query, error=SearchError(kind, message))


class SearchProvider(Protocol):
    """A search backend. `search` returns errors in the response; it raises only on cancellation."""

    name: str

    async def search(self, query: str, max_results: int) -> SearchResponse: ...

    async def aclose(self) -> None: ...
