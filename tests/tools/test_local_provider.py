from __future__ import annotations

import sqlite3

import pytest

from k2ray.tools import EMBEDDED_INDEX, LocalSearchProvider, build_index
from k2ray.tools.fts_query import match_expression, query_terms

WHO_WROTE = [
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice", "Jane Austen"),
    ("who wrote the novel 1984", "Nineteen Eighty-Four", "George Orwell"),
    ("Who is the author of Don Quixote", "Don Quixote", "Cervantes"),
    ("who wrote One Hundred Years of Solitude", "One Hundred Years of Solitude", "Garcia Marquez"),
    ("Who painted the Mona Lisa?", "Mona Lisa", "Leonardo da Vinci"),
    ("who created the Python programming language", "Python (programming language)", "Guido van Rossum"),
    ("first people to land on the Moon", "Apollo 11", "Neil Armstrong"),
]
# Each is FTS5 syntax that is an error or changes the query's meaning when passed to MATCH as it is.
INJECTIONS = [
    '"', 'hamlet"', 'title:hamlet', 'body:zzz OR hamlet', 'NEAR(hamlet denmark)', 'hamlet*', '^hamlet',
    'hamlet AND', 'NOT hamlet', '{title body}: hamlet', '-hamlet', "hamlet'); DROP TABLE documents; --",
    '(hamlet', 'hamlet + + +', 'documents_fts: hamlet',
]


@pytest.fixture(scope="module")
def provider() -> LocalSearchProvider:
    return LocalSearchProvider()


@pytest.mark.parametrize(("query", "title", "fact"), WHO_WROTE)
async def test_who_wrote_finds_the_right_document_first(provider, query, title, fact):
    response = await provider.search(query, 3)
    assert response.is_ok and response.results, response
    top = response.results[0]
    assert top.title == title and fact in top.content and fact.split()[-1] in top.snippet + top.content


async def test_max_results_bounds_the_answer_and_ranking_is_stable(provider):
    first = await provider.search("novel by an English author", 4)
    assert len(first.results) == 4
    assert first == await provider.search("novel by an English author", 4)
    assert (await provider.search("novel by an English author", 2)).results == first.results[:2]


def _document_count() -> int:
    db = sqlite3.connect(EMBEDDED_INDEX)
    try:
        return db.execute("SELECT count(*) FROM documents").fetchone()[0]
    finally:
        db.close()


def test_the_injection_strings_do_break_a_raw_match():
    db = sqlite3.connect(EMBEDDED_INDEX)
    num_errors = 0
    try:
        for query in INJECTIONS:
            try:
                db.execute("SELECT rowid FROM documents_fts WHERE documents_fts MATCH ?", (query,)).fetchall()
            except sqlite3.OperationalError:
                num_errors += 1
    finally:
        db.close()
    assert num_errors >= len(INJECTIONS) // 2


@pytest.mark.parametrize("query", INJECTIONS)
async def test_fts5_syntax_in_a_query_is_plain_words(provider, query):
    num_documents = _document_count()
    response = await provider.search(query, 5)
    assert response.is_ok, response.error
    if query != '"':
        assert response.results[0].title == "Hamlet"
    assert _document_count() == num_documents


def test_match_expression_quotes_words_only():
    assert match_expression('title:"x" NEAR(a b) OR *') == '"title" OR "x" OR "near" OR "b"'
    assert match_expression("who is it") == '"who" OR "is" OR "it"'  # only stop words: keep them
    assert match_expression(" ?!* ") is None
    assert len(query_terms(" ".join(f"w{i}" for i in range(100)))) == 32


async def test_a_query_with_no_words_has_no_results(provider):
    response = await provider.search('"*^:()', 5)
    assert response.is_ok and response.results == ()


def test_missing_or_foreign_index_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LocalSearchProvider(tmp_path / "missing.sqlite")
    foreign = tmp_path / "foreign.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ValueError, match="not a k2ray search index"):
        LocalSearchProvider(foreign)


async def test_a_custom_index_is_searched(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "k.md").write_text("# Kettle\nurl: https://example.org/kettle\n\nA kettle boils water.")
    (tmp_path / "docs" / "t.md").write_text("# Teapot\n\nA teapot steeps tea leaves.")
    build_index(tmp_path / "docs", tmp_path / "i.sqlite")
    response = await LocalSearchProvider(tmp_path / "i.sqlite").search("boil water", 5)
    assert [(r.title, r.url) for r in response.results] == [("Kettle", "https://example.org/kettle")]
