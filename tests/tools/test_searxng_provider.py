from __future__ import annotations

import socket

import pytest

from k2ray.tools import WebSearch, WebSearchConfig
from k2ray.tools.searxng_provider import SearxngProvider, parse_searxng

from .searxng_server import HUGE_BODY_BYTES, searxng_server

TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def server():
    with searxng_server() as (base_url, state):
        yield base_url, state


@pytest.fixture
async def provider(server):
    p = SearxngProvider(server[0], timeout_s=TIMEOUT_S, max_response_bytes=HUGE_BODY_BYTES // 2,
                        language="en", safesearch=1)
    yield p
    await p.aclose()


async def test_results_are_parsed_and_bad_entries_skipped(provider, server):
    response = await provider.search("who wrote gatsby", 5)
    assert response.is_ok and response.provider == "searxng"
    assert [(r.title, r.url, r.snippet, r.page_age) for r in response.results] == [
        ("The Great Gatsby", "https://example.org/gatsby", "A 1925 novel by F. Scott Fitzgerald.",
         "2024-05-01T00:00:00"),
        ("https://example.org/no-title", "https://example.org/no-title", "an entry without a title", None),
        ("Third", "https://example.org/third", "", None),
    ]
    sent = server[1].queries[-1]
    assert sent == {"q": ["who wrote gatsby"], "format": ["json"], "language": ["en"], "safesearch": ["1"]}
    assert len((await provider.search("who wrote gatsby", 1)).results) == 1


@pytest.mark.parametrize(("query", "kind", "words"), [
    ("slow", "timeout", f"within {TIMEOUT_S:g} s"),
    ("http-503", "http_error", "HTTP 503"),
    ("forbidden", "http_error", "search.formats"),
    ("malformed", "bad_response", "not JSON"),
    ("no-results-list", "bad_response", "no results list"),
    ("huge", "response_too_large", f"over {HUGE_BODY_BYTES // 2} bytes"),
])
async def test_failures_come_back_as_errors(provider, server, query, kind, words):
    response = await provider.search(query, 5)
    assert response.error is not None and response.results == ()
    assert response.error.kind == kind and words in response.error.message
    assert server[0] not in response.error.message  # the provider's address is not shown to the model


async def test_a_provider_that_is_down_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    p = SearxngProvider(f"http://127.0.0.1:{port}", timeout_s=TIMEOUT_S, max_response_bytes=1024)
    try:
        response = await p.search("anything", 5)
    finally:
        await p.aclose()
    assert response.error is not None and response.error.kind == "unavailable"


async def test_web_search_over_searxng_caches_successes_only(server):
    base_url, state = server
    config = WebSearchConfig.model_validate(
        {"provider": "searxng", "timeout_s": TIMEOUT_S, "searxng": {"base_url": base_url + "/"}})
    search = WebSearch.from_config(config)
    try:
        num_before = len(state.queries)
        first = await search.search("Gatsby author")
        again = await search.search("  gatsby   AUTHOR ")
        assert first.is_ok and not first.is_cached and again.is_cached and again.results == first.results
        assert len(state.queries) == num_before + 1
        await search.search("http-503")
        assert (await search.search("http-503")).error.kind == "http_error"
        assert len(state.queries) == num_before + 3
    finally:
        await search.aclose()


def test_parse_rejects_non_object_json():
    assert parse_searxng("s", "q", b"[1, 2]", 5).error.kind == "bad_response"
    assert parse_searxng("s", "q", b"\xff\xfe", 5).error.kind == "bad_response"
