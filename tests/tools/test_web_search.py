from __future__ import annotations

import asyncio

import pytest

from k2ray.tools import LocalSearchProvider, SearchResponse, SearchResult, WebSearch, WebSearchConfig

TIMEOUT_S = 0.2


class ScriptedProvider:
    """A provider whose search the test scripts: answer, hang or raise; it counts its calls."""

    name = "scripted"

    def __init__(self, behaviour: str = "answer") -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[str, int]] = []
        self.is_closed = False

    async def search(self, query: str, max_results: int) -> SearchResponse:
        self.calls.append((query, max_results))
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        if self.behaviour == "raise":
            raise RuntimeError("provider bug with a /secret/path in it")
        results = tuple(SearchResult(title=f"r{i}", url=f"local:{i}", snippet="s") for i in range(max_results))
        return SearchResponse(provider=self.name, query=query, results=results)

    async def aclose(self) -> None:
        self.is_closed = True


def _search(behaviour: str = "answer", **config) -> tuple[WebSearch, ScriptedProvider]:
    provider = ScriptedProvider(behaviour)
    return WebSearch(WebSearchConfig(**{"timeout_s": TIMEOUT_S, **config}), provider), provider


async def test_max_results_is_clamped_to_the_config():
    search, provider = _search(max_results=4)
    assert len((await search.search("q1")).results) == 4
    assert len((await search.search("q2", 100)).results) == 4
    assert len((await search.search("q3", 2)).results) == 2
    assert [n for _, n in provider.calls] == [4, 4, 2]


@pytest.mark.parametrize(("query", "kind"), [("", "invalid_query"), ("   \n", "invalid_query"),
                                             ("x" * 41, "query_too_long")])
async def test_bad_queries_never_reach_the_provider(query, kind):
    search, provider = _search(max_query_chars=40)
    response = await search.search(query)
    assert response.error is not None and response.error.kind == kind and provider.calls == []
    assert (await search.search("x" * 40)).is_ok


async def test_a_hanging_provider_times_out():
    search, _ = _search("hang")
    response = await search.search("anything")
    assert response.error is not None and response.error.kind == "timeout"
    assert f"{TIMEOUT_S:g} s" in response.error.message


async def test_a_provider_exception_becomes_an_error_without_its_details():
    search, _ = _search("raise")
    response = await search.search("anything")
    assert response.error is not None and response.error.kind == "unavailable"
    assert response.error.message == "the search failed (RuntimeError)"


async def test_cancellation_goes_through():
    search, _ = _search("hang", timeout_s=30.0)
    task = asyncio.ensure_future(search.search("anything"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(("arguments", "is_ok"), [
    ('{"query": "who wrote Hamlet"}', True),
    ({"query": "who wrote Hamlet"}, True),
    ("not json", False),
    ('["query"]', False),
    ('{"query": 3}', False),
    ("{}", False),
])
async def test_run_call_reads_the_models_arguments(arguments, is_ok):
    search, provider = _search()
    response = await search.run_call(arguments)
    assert response.is_ok is is_ok
    assert provider.calls == ([("who wrote Hamlet", 5)] if is_ok else [])
    if not is_ok:
        assert response.error.kind == "invalid_query"


async def test_cached_answers_skip_the_provider_and_close_closes_it():
    search, provider = _search()
    await search.search("Hamlet")
    assert (await search.search("hamlet")).is_cached and len(provider.calls) == 1
    await search.aclose()
    assert provider.is_closed


async def test_the_default_config_searches_the_embedded_index():
    search = WebSearch.from_config(WebSearchConfig())
    assert isinstance(search.provider, LocalSearchProvider)
    response = await search.run_call('{"query": "Who wrote War and Peace?"}')
    assert response.results[0].title == "War and Peace" and "Tolstoy" in response.results[0].content


def test_a_missing_local_index_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        WebSearch.from_config(WebSearchConfig(local={"index_path": str(tmp_path / "none.sqlite")}))
