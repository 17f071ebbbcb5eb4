"""The local document server and the BM25 index behind `search-qa-v0`'s tools.

The server is a real HTTP server on 127.0.0.1 (an ephemeral port) that serves each document's text
at `/docs/<id>`. It runs on a thread of the process: the envs of a process share one, started by
the first env and stopped (socket closed, thread joined) when the last one closes, so nothing is
left running. The index is `bm25s`'s BM25 over the documents' titles and texts, built once per process.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from urllib.parse import unquote

from agentrl_search_qa.corpus import Document, build

MAX_QUERY_CHARS = 500


class _Handler(http.server.BaseHTTPRequestHandler):
    docs: dict[str, Document] = {}

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        prefix = "/docs/"
        doc = self.docs.get(unquote(self.path[len(prefix):])) if self.path.startswith(prefix) else None
        body = (doc.text if doc else f"no document {self.path[len(prefix):][:80]!r}").encode()
        self.send_response(200 if doc else 404)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the run's console clean
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that hung up (a fetch past its deadline, under load) is not the server's error:
        say nothing; anything else is printed as `socketserver` does."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class DocServer:
    """One HTTP server on 127.0.0.1, serving the collection (use `acquire`/`release`)."""

    def __init__(self):
        docs, _ = build()
        handler = type("Handler", (_Handler,), {"docs": {d.id: d for d in docs}})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="search-qa-docs",
                                       daemon=True)  # a short poll: shutdown() waits for one
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


_LOCK = threading.Lock()
_SERVER: list = [None, 0]  # the shared server and how many envs hold it


def acquire() -> DocServer:
    with _LOCK:
        if _SERVER[0] is None:
            _SERVER[0] = DocServer()
        _SERVER[1] += 1
        return _SERVER[0]


def release() -> None:
    with _LOCK:
        _SERVER[1] -= 1
        if _SERVER[1] > 0:
            return
        server, _SERVER[0] = _SERVER[0], None
    server.stop()


def running() -> bool:
    """Whether the shared server is up (for tests)."""
    return _SERVER[0] is not None


@functools.cache
def _index():
    import bm25s

    docs, _ = build()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([f"{d.title}. {d.text}" for d in docs], show_progress=False), show_progress=False)
    return retriever, docs


def search(query: str, k: int = 3) -> list[Document]:
    """The `k` documents BM25 ranks highest for `query` (those with a positive score only)."""
    import bm25s

    retriever, docs = _index()
    tokens = bm25s.tokenize([query[:MAX_QUERY_CHARS]], show_progress=False)
    if not any(len(ids) for ids in tokens.ids):
        return []
    hits, scores = retriever.retrieve(tokens, k=min(k, len(docs)), show_progress=False)
    return [docs[int(i)] for i, s in zip(hits[0], scores[0]) if s > 0]
