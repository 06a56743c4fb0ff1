"""User text -> an FTS5 MATCH expression that can only mean "any of these words".

The model's query is untrusted: FTS5 syntax in it (quotes, `col:` filters, `NEAR(...)`, `*`, `^`, AND/OR/NOT)
must not change the query's meaning or make it fail to parse. Only word characters survive; each word becomes
a quoted string (FTS5 has no escapes inside one, and a word holds no `"`), joined with OR so bm25 ranks
documents by how many rare terms they share with the question.
"""

from __future__ import annotations

import re
import unicodedata

WORD = re.compile(r"\w+")
MAX_QUERY_TERMS = 32
MAX_TERM_CHARS = 64
# Question words and glue that match nearly every document; kept when nothing else is left.
STOP_WORDS = frozenset(
    "a an and are as at be by did do does for from how in is it of on or the to was were what when where "
    "which who whom whose why with wrote written write writes".split()
)


def query_terms(text: str) -> list[str]:
    """The distinct words of `text`, case-folded, in order, stop words dropped unless they are all it has."""
    words = WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    distinct = list(dict.fromkeys(w[:MAX_TERM_CHARS] for w in words))
    content = [w for w in distinct if w not in STOP_WORDS]
    return (content or distinct)[:MAX_QUERY_TERMS]


def match_expression(text: str) -> str | None:
    """The MATCH string for `text`; None when it has no words (nothing can match)."""
    terms = query_terms(text)
    return " OR ".join(f'"{t}"' for t in terms) if terms else None
