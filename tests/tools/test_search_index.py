from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from k2ray.cli import main
from k2ray.tools import EMBEDDED_DOCUMENTS, EMBEDDED_INDEX, build_index
from k2ray.tools.search_index import LOCAL_URL_SCHEME, parse_document, read_documents


def _rows(index: Path) -> tuple[list, list]:
    db = sqlite3.connect(index)
    try:
        return (db.execute("SELECT * FROM meta ORDER BY key").fetchall(),
                db.execute("SELECT doc_id, path, title, url, body FROM documents ORDER BY doc_id").fetchall())
    finally:
        db.close()


def test_build_is_deterministic_whatever_order_the_files_were_written(tmp_path):
    forward, backward = tmp_path / "forward", tmp_path / "backward"
    forward.mkdir()
    backward.mkdir()
    docs = sorted(EMBEDDED_DOCUMENTS.glob("*.md"))
    for doc in docs:
        shutil.copy(doc, forward / doc.name)
    for doc in reversed(docs):
        shutil.copy(doc, backward / doc.name)
    assert build_index(forward, tmp_path / "a.sqlite") == len(docs)
    build_index(backward, tmp_path / "b.sqlite")
    build_index(forward, tmp_path / "c.sqlite")
    first = (tmp_path / "a.sqlite").read_bytes()
    assert first == (tmp_path / "b.sqlite").read_bytes() == (tmp_path / "c.sqlite").read_bytes()


def test_shipped_index_is_the_build_of_the_shipped_documents(tmp_path):
    # Compared by content, not bytes: another SQLite version may lay out the same rows differently.
    build_index(EMBEDDED_DOCUMENTS, tmp_path / "fresh.sqlite")
    assert _rows(EMBEDDED_INDEX) == _rows(tmp_path / "fresh.sqlite")
    meta, documents = _rows(EMBEDDED_INDEX)
    assert 30 <= len(documents) <= 60 and ("num_documents", str(len(documents))) in meta


def test_documents_parse_title_optional_url_and_body():
    doc = parse_document("a/b.md", "\n# Title here \nurl: https://example.org/x\n\nBody line one.\nTwo.\n")
    assert (doc.title, doc.url, doc.body) == ("Title here", "https://example.org/x", "Body line one.\nTwo.")
    plain = parse_document("c.txt", "Plain title\r\nSome text\r\n")
    assert (plain.title, plain.url, plain.body) == ("Plain title", f"{LOCAL_URL_SCHEME}c.txt", "Some text")
    for bad in ("", "   \n\n", "#\nbody"):
        with pytest.raises(ValueError, match="x.md"):
            parse_document("x.md", bad)


def test_read_documents_recurses_sorted_and_skips_hidden_and_other_files(tmp_path):
    (tmp_path / "z.md").write_text("Z\nz")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("A\na")
    (tmp_path / ".hidden.md").write_text("H\nh")
    (tmp_path / "notes.rst").write_text("R\nr")
    assert [d.path for d in read_documents(tmp_path)] == ["sub/a.txt", "z.md"]


def test_cli_builds_an_index_and_reports_bad_input(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.md").write_text("# One\n\nThe first document.")
    out = tmp_path / "out" / "index.sqlite"
    main(["search-index", str(tmp_path / "docs"), "--out", str(out)])
    assert "indexed 1 documents" in capsys.readouterr().out
    assert _rows(out)[1] == [(1, "one.md", "One", "local:one.md", "The first document.")]
    with pytest.raises(SystemExit, match="not a directory"):
        main(["search-index", str(tmp_path / "missing"), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .md/.txt documents"):
        main(["search-index", str(tmp_path / "empty"), "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.sqlite"]  # no temp file left behind
