from __future__ import annotations

import pytest

from k2ray.tools import (
    SearchResponse,
    SearchResult,
    WebSearchConfig,
    anthropic_tool_result_block,
    decode_encrypted_content,
    format_tool_text,
    response_from_anthropic_content,
)

LONG = "word " * 2000


def _response(num_results: int, content: str | None = LONG) -> SearchResponse:
    results = tuple(SearchResult(title=f"Title {i}", url=f"https://example.org/{i}", snippet=f"snippet {i}",
                                 content=content, page_age="2025-01-02" if i == 0 else None)
                    for i in range(num_results))
    return SearchResponse(provider="local", query="who wrote it", results=results)


def test_tool_text_numbers_results_and_stays_within_its_bounds():
    config = WebSearchConfig(max_result_chars=100, max_tool_result_chars=700)
    text = format_tool_text(_response(20), config)
    assert len(text) <= 700 and text.startswith('Web search results for "who wrote it":')
    assert "[1] Title 0\nURL: https://example.org/0\nPublished: 2025-01-02\nword word" in text
    first_excerpt = text.split("\n\n")[1].split("\n")[-1]
    assert len(first_excerpt) == 100 and first_excerpt.endswith("…")


def test_tool_text_uses_the_snippet_without_content():
    text = format_tool_text(_response(2, content=None), WebSearchConfig())
    assert "URL: https://example.org/1\nsnippet 1" in text


def test_tool_text_for_no_results_and_for_errors():
    config = WebSearchConfig()
    assert format_tool_text(_response(0), config) == 'No web search results for "who wrote it".'
    failed = SearchResponse.failed("searxng", "q", "timeout", "the search provider did not answer within 5 s")
    text = format_tool_text(failed, config)
    assert text.startswith("Web search failed (timeout): the search provider did not answer within 5 s.")


def test_anthropic_block_has_the_sdks_shape_and_round_trips():
    anthropic_types = pytest.importorskip("anthropic.types")
    config = WebSearchConfig(max_result_chars=50)
    block = anthropic_tool_result_block("srvtoolu_1", _response(2), config)
    parsed = anthropic_types.WebSearchToolResultBlock.model_validate(block)
    assert [(r.title, r.url, r.page_age) for r in parsed.content] == [
        ("Title 0", "https://example.org/0", "2025-01-02"), ("Title 1", "https://example.org/1", None)]
    assert "page_age" not in block["content"][1]
    texts = [decode_encrypted_content(r["encrypted_content"]) for r in block["content"]]
    assert all(t is not None and len(t) == 50 and t.startswith("word word") for t in texts)
    echoed = response_from_anthropic_content("who wrote it", block["content"])
    assert [(r.title, r.url, r.snippet, r.page_age) for r in echoed.results] == [
        ("Title 0", "https://example.org/0", texts[0], "2025-01-02"), ("Title 1", "https://example.org/1", texts[1], None)]


@pytest.mark.parametrize(("kind", "code"), [("timeout", "unavailable"), ("invalid_query", "invalid_tool_input"),
                                            ("query_too_long", "query_too_long")])
def test_anthropic_errors_use_its_error_codes(kind, code):
    anthropic_types = pytest.importorskip("anthropic.types")
    block = anthropic_tool_result_block("srvtoolu_2", SearchResponse.failed("local", "q", kind, "m"), WebSearchConfig())
    assert block["content"] == {"type": "web_search_tool_result_error", "error_code": code}
    anthropic_types.WebSearchToolResultBlock.model_validate(block)
    assert response_from_anthropic_content("q", block["content"]).error.kind == "unavailable"


def test_encrypted_content_can_be_left_empty_and_foreign_values_decode_to_none():
    config = WebSearchConfig(anthropic={"encrypted_content": "empty", "include_page_age": False})
    block = anthropic_tool_result_block("srvtoolu_3", _response(1), config)
    assert block["content"][0]["encrypted_content"] == "" and "page_age" not in block["content"][0]
    for foreign in ("", "EqA3CioIBxgCIiQ0", "not base64 at all!", "eyJ2IjoyfQ=="):
        assert decode_encrypted_content(foreign) is None
