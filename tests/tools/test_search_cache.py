from __future__ import annotations

from k2ray.tools import SearchCache, SearchResponse, SearchResult, normalize_query

TTL_S = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _response(query: str, num_results: int, provider: str = "local") -> SearchResponse:
    results = tuple(SearchResult(title=f"t{i}", url=f"local:{i}", snippet="s") for i in range(num_results))
    return SearchResponse(provider=provider, query=query, results=results)


def test_hit_until_the_ttl_then_miss():
    clock = FakeClock()
    cache = SearchCache(8, TTL_S, clock=clock)
    cache.put(_response("Who wrote Hamlet", 3), 3)
    clock.now += TTL_S - 1
    hit = cache.get("local", "who  wrote\thamlet", 3)
    assert hit is not None and hit.is_cached and hit.query == "who  wrote\thamlet" and len(hit.results) == 3
    clock.now += 1
    assert cache.get("local", "who wrote hamlet", 3) is None
    assert len(cache) == 0


def test_keyed_by_provider_and_normalized_query():
    cache = SearchCache(8, TTL_S, clock=FakeClock())
    cache.put(_response("ＡＢＣ  def", 2), 2)  # full-width letters: NFKC folds them
    assert normalize_query("ＡＢＣ  def") == "abc def"
    assert cache.get("local", "abc DEF", 2) is not None
    assert cache.get("searxng", "abc def", 2) is None
    assert cache.get("local", "abc", 2) is None


def test_fewer_results_are_served_from_a_bigger_search_more_only_if_it_was_complete():
    cache = SearchCache(8, TTL_S, clock=FakeClock())
    cache.put(_response("full", 5), 5)  # cut at 5: there may be more
    assert len(cache.get("local", "full", 2).results) == 2
    assert cache.get("local", "full", 6) is None
    cache.put(_response("rare", 2), 5)  # only 2 of 5 asked for: that is all there is
    assert len(cache.get("local", "rare", 10).results) == 2


def test_least_recently_used_is_evicted_and_failures_are_not_cached():
    cache = SearchCache(2, TTL_S, clock=FakeClock())
    cache.put(_response("a", 1), 1)
    cache.put(_response("b", 1), 1)
    assert cache.get("local", "a", 1) is not None  # a is now the most recent
    cache.put(_response("c", 1), 1)
    assert cache.get("local", "b", 1) is None and cache.get("local", "a", 1) is not None
    cache.put(SearchResponse.failed("local", "d", "timeout", "slow"), 1)
    assert cache.get("local", "d", 1) is None and len(cache) == 2


def test_zero_entries_disables_it():
    cache = SearchCache(0, TTL_S, clock=FakeClock())
    cache.put(_response("a", 1), 1)
    assert cache.get("local", "a", 1) is None
