"""A bounded LRU of successful searches with a time-to-live, keyed by provider and normalized query.

Used on one event loop (no lock). Failures are never cached, so a provider that recovers is asked again.
"""

from __future__ import annotations

import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from .search_result import SearchResponse


def normalize_query(query: str) -> str:
    """Queries that differ only in case, Unicode form or whitespace share an entry."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


@dataclass(frozen=True, slots=True)
class _Entry:
    expires_at: float
    num_requested: int  # max_results of the search that filled it
    response: SearchResponse


class SearchCache:
    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, provider: str, query: str, max_results: int) -> SearchResponse | None:
        """The cached response (marked `is_cached`, cut to `max_results`), or None on a miss or expiry. An
        entry filled with fewer requested results serves a bigger request only if it was not cut short."""
        key = (provider, normalize_query(query))
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            del self._entries[key]
            return None
        is_complete = len(entry.response.results) < entry.num_requested
        if max_results > entry.num_requested and not is_complete:
            return None
        self._entries.move_to_end(key)
        return replace(entry.response, query=query, results=entry.response.results[:max_results], is_cached=True)

    def put(self, response: SearchResponse, max_results: int) -> None:
        if not response.is_ok or self.max_entries == 0:
            return
        key = (response.provider, normalize_query(response.query))
        self._entries[key] = _Entry(self._clock() + self.ttl_s, max_results, response)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
