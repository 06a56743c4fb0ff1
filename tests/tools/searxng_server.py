"""A SearXNG-shaped HTTP server on 127.0.0.1 for the tests: `/search?q=...&format=json`, whose behaviour the
query picks (`slow`, `http-503`, `forbidden`, `malformed`, `huge`, `no-results-list`; anything else answers)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HUGE_BODY_BYTES = 64 * 1024
SLOW_HANDLER_LIMIT_S = 30.0  # a slow handler waits for the server's shutdown, never longer than this


@dataclass
class ServerState:
    release: threading.Event = field(default_factory=threading.Event)
    queries: list[dict[str, list[str]]] = field(default_factory=list)


def results_for(query: str) -> dict:
    return {
        "query": query,
        "number_of_results": 3,
        "results": [
            {"url": "https://example.org/gatsby", "title": "The Great Gatsby", "engine": "wikipedia",
             "content": "A 1925 novel by F. Scott Fitzgerald.", "publishedDate": "2024-05-01T00:00:00"},
            {"url": "https://example.org/no-title", "content": "an entry without a title"},
            {"title": "no url: skipped", "content": "x"},
            "not an object: skipped",
            {"url": "https://example.org/third", "title": "  Third  ", "content": None},
        ],
        "answers": [], "suggestions": [], "unresponsive_engines": [],
    }


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            params = parse_qs(url.query)
            state.queries.append(params)
            query = params.get("q", [""])[0]
            if url.path != "/search":
                self._send(404, b"{}")
            elif query == "slow":
                state.release.wait(SLOW_HANDLER_LIMIT_S)
                self._send(200, json.dumps(results_for(query)).encode())
            elif query == "http-503":
                self._send(503, b"<html>busy</html>", "text/html")
            elif query == "forbidden":
                self._send(403, b"Forbidden", "text/plain")
            elif query == "malformed":
                self._send(200, b'{"results": [{"url": ')
            elif query == "no-results-list":
                self._send(200, b'{"results": "none"}')
            elif query == "huge":
                filler = "x" * HUGE_BODY_BYTES
                self._send(200, json.dumps({"results": [], "filler": filler}).encode())
            else:
                self._send(200, json.dumps(results_for(query)).encode())

    return Handler


@contextmanager
def searxng_server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join()
