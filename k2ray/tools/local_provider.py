"""`local`: bm25 search over an index built by `k2ray search-index` (by default the embedded one).

Each search opens its own read-only connection on a worker thread (`asyncio.to_thread`), so the event loop
never waits on SQLite and no connection is shared between threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from .fts_query import match_expression
from .search_index import BODY_WEIGHT, INDEX_FORMAT_VERSION, TITLE_WEIGHT
from .search_result import SearchResponse, SearchResult

EMBEDDED_INDEX = Path(__file__).resolve().parent.parent / "assets" / "search-index.sqlite"
EMBEDDED_DOCUMENTS = Path(__file__).resolve().parent.parent / "assets" / "search-docs"
SNIPPET_ELLIPSIS = "…"
BODY_COLUMN = 1

_QUERY = (
    "SELECT d.title, d.url, snippet(documents_fts, ?, '', '', ?, ?), d.body"
    " FROM documents_fts JOIN documents AS d ON d.doc_id = documents_fts.rowid"
    " WHERE documents_fts MATCH ? ORDER BY bm25(documents_fts, ?, ?), d.doc_id LIMIT ?"
)


def _connect(index_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{index_path.resolve().as_uri()}?mode=ro", uri=True)


class LocalSearchProvider:
    name = "local"

    def __init__(self, index_path: str | Path | None = None, *, snippet_tokens: int = 32) -> None:
        """Opens the index once to check it; a missing or foreign file is a ValueError (a config error)."""
        self.index_path = Path(index_path) if index_path is not None else EMBEDDED_INDEX
        self.snippet_tokens = snippet_tokens
        if not self.index_path.is_file():
            raise ValueError(f"search index {self.index_path} does not exist (build it with k2ray search-index)")
        try:
            db = _connect(self.index_path)
            try:
                (version,) = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
            finally:
                db.close()
        except (sqlite3.Error, TypeError) as e:
            raise ValueError(f"{self.index_path} is not a k2ray search index: {e}") from e
        if version != str(INDEX_FORMAT_VERSION):
            raise ValueError(f"{self.index_path}: index format {version}, this k2ray reads "
                             f"{INDEX_FORMAT_VERSION}; rebuild it with k2ray search-index")

    async def search(self, query: str, max_results: int) -> SearchResponse:
        return await asyncio.to_thread(self.search_blocking, query, max_results)

    def search_blocking(self, query: str, max_results: int) -> SearchResponse:
        """The same search on the calling thread (for callers without an event loop)."""
        expression = match_expression(query)
        if expression is None:
            return SearchResponse(provider=self.name, query=query)
        try:
            db = _connect(self.index_path)
            try:
                rows = db.execute(_QUERY, (BODY_COLUMN, SNIPPET_ELLIPSIS, self.snippet_tokens, expression,
                                           TITLE_WEIGHT, BODY_WEIGHT, max_results)).fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            return SearchResponse.failed(self.name, query, "unavailable", f"the local search index failed: {e}")
        results = tuple(SearchResult(title=title, url=url, snippet=snippet, content=body)
                        for title, url, snippet, body in rows)
        return SearchResponse(provider=self.name, query=query, results=results)

    async def aclose(self) -> None:
        return None
