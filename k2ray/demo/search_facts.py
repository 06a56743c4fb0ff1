"""The `$web_search` questions the demo model learns: one subject per document of the local index, and the
exact tool text the server would put in the prompt for a search of it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from k2ray.tools import EMBEDDED_DOCUMENTS, LocalSearchProvider, WebSearchConfig, format_tool_text

# Documents whose first sentence names a maker ("... by X"), so "who wrote/made" questions fit them.
_BY_MAKER = re.compile(r"\b(?:by|attributed to) (?:the )?(?:[a-z]+ ){0,2}[A-Z]")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)])\.(?:\s|$)")
_TOP_RESULT_TITLE = re.compile(r"^\[1\] (.*)$", re.MULTILINE)
MIN_SENTENCE_CHARS = 24  # skips abbreviations such as "No." at the start


@dataclass(frozen=True)
class SearchFact:
    subject: str  # what the user asks about and the model searches for
    title: str
    first_sentence: str  # what the answer quotes
    has_maker: bool


def _subject(title: str) -> str:
    return re.sub(r"\s*\(.*\)$", "", title).strip()


def _first_sentence(body: str) -> str:
    match = _SENTENCE_END.search(body, MIN_SENTENCE_CHARS)
    return body[: match.start() + 1] if match else body


@cache
def search_facts() -> tuple[SearchFact, ...]:
    facts = []
    for path in sorted(EMBEDDED_DOCUMENTS.glob("*.md")):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        title, body = lines[0].lstrip("# ").strip(), " ".join(lines[1:])
        sentence = _first_sentence(body)
        subject = _subject(title)
        if _TOP_RESULT_TITLE.search(search_tool_text(subject)).group(1) != title:
            continue  # the answer quotes the top result: keep subjects whose own document comes first
        facts.append(SearchFact(subject, title, sentence, bool(_BY_MAKER.search(sentence))))
    return tuple(facts)


@cache
def search_tool_text(query: str) -> str:
    """What the model reads after searching `query`, exactly as the server formats it (default config)."""
    config = WebSearchConfig()
    response = LocalSearchProvider().search_blocking(query, config.max_results)
    return format_tool_text(response, config)
