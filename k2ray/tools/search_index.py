"""`k2ray search-index DIR --out FILE`: a folder of documents -> an SQLite FTS5 index, byte for byte the same
for the same folder and SQLite version (sorted paths, no timestamps, one merged FTS segment, VACUUMed).

A document is a UTF-8 `.md` or `.txt` file: its first non-empty line is the title (a leading `#` is
dropped), an optional `url: ...` line may follow, and the rest is the body. Without a url line the result's
url is `local:<path relative to DIR>`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

INDEX_FORMAT_VERSION = 1
DOCUMENT_SUFFIXES = (".md", ".txt")
LOCAL_URL_SCHEME = "local:"
URL_LINE = re.compile(r"^url:\s*(\S+)\s*$", re.IGNORECASE)
PAGE_SIZE = 4096
# Title hits count ten times body hits in bm25 (the weights follow the column order below).
TITLE_WEIGHT = 10.0
BODY_WEIGHT = 1.0

SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE documents (doc_id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, title TEXT NOT NULL,"
    " url TEXT NOT NULL, body TEXT NOT NULL)",
    "CREATE VIRTUAL TABLE documents_fts USING fts5(title, body, content='documents', content_rowid='doc_id',"
    " tokenize='porter unicode61 remove_diacritics 2')",
)


@dataclass(frozen=True, slots=True)
class Document:
    path: str  # relative to the indexed folder, POSIX separators
    title: str
    url: str
    body: str


def parse_document(path: str, text: str) -> Document:
    lines = text.replace("\r\n", "\n").split("\n")
    nonempty = [i for i, line in enumerate(lines) if line.strip()]
    if not nonempty:
        raise ValueError(f"{path}: empty document (the first line must be its title)")
    title = lines[nonempty[0]].strip().lstrip("#").strip()
    if not title:
        raise ValueError(f"{path}: the title line has no text")
    rest = lines[nonempty[0] + 1:]
    url = f"{LOCAL_URL_SCHEME}{path}"
    first = next((i for i, line in enumerate(rest) if line.strip()), None)
    if first is not None and (match := URL_LINE.match(rest[first].strip())):
        url, rest = match.group(1), rest[first + 1:]
    return Document(path=path, title=title, url=url, body="\n".join(rest).strip())


def read_documents(folder: Path) -> list[Document]:
    """Every document under `folder` (recursively, hidden files skipped), sorted by relative path."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    paths = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and p.suffix in DOCUMENT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not paths:
        raise ValueError(f"{folder}: no {'/'.join(DOCUMENT_SUFFIXES)} documents")
    return [parse_document(rel, (folder / rel).read_text(encoding="utf-8")) for rel in paths]


def _write_index(db: sqlite3.Connection, documents: list[Document]) -> None:
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    db.execute("PRAGMA journal_mode = DELETE")
    for statement in SCHEMA:
        db.execute(statement)
    db.executemany("INSERT INTO meta VALUES (?, ?)",
                   [("format_version", str(INDEX_FORMAT_VERSION)), ("num_documents", str(len(documents)))])
    rows = [(i + 1, d.path, d.title, d.url, d.body) for i, d in enumerate(documents)]
    db.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)", rows)
    db.executemany("INSERT INTO documents_fts (rowid, title, body) VALUES (?, ?, ?)",
                   [(doc_id, title, body) for doc_id, _, title, _, body in rows])
    db.execute("INSERT INTO documents_fts (documents_fts) VALUES ('optimize')")
    db.commit()
    db.execute("VACUUM")


def build_index(folder: str | Path, out: str | Path) -> int:
    """Index the documents under `folder` into the SQLite file `out` (replaced atomically); returns their count."""
    documents = read_documents(Path(folder))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        Path(tmp).unlink()  # sqlite3 creates the file itself, with the page size set before the first write
        db = sqlite3.connect(tmp)
        try:
            _write_index(db, documents)
        finally:
            db.close()
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return len(documents)


def search_index_command(folder: str, out: str) -> str:
    """`k2ray search-index DIR --out FILE`: builds the index; bad input exits with its message."""
    try:
        num_documents = build_index(folder, out)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"k2ray search-index: {e}") from e
    return f"indexed {num_documents} documents from {folder} into {out}"
