"""A stand-in engine server for the managed-server tests: a real HTTP server on 127.0.0.1 that can
be told (by flags, or by requests once it runs) to misbehave the ways engine servers do.

Run: python standin_server.py --port N [--delay S] [--crash-at-start] [--crash-at-start-if FILE]
     [--hang] [--spawn-child] [--ignore-term]
Endpoints: /health (200 "ok"), /info (JSON: pid, child_pid, marker from $STANDIN_MARKER),
/crash (exits with code 7 at once), /exit (exits cleanly, code 0), /freeze (from then on
/health never answers, while the process stays alive).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FROZEN = threading.Event()
CHILD_PID: int | None = None


def say(text: str) -> None:
    print(f"standin[{os.getpid()}]: {text}", flush=True)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            if FROZEN.is_set():
                time.sleep(3600)  # a wedged server: the connection is open, no answer comes
            return self._send(200, b"ok")
        if self.path == "/info":
            body = {"pid": os.getpid(), "child_pid": CHILD_PID, "marker": os.environ.get("STANDIN_MARKER")}
            return self._send(200, json.dumps(body).encode())
        if self.path == "/crash":
            say("crashing on request")
            os._exit(7)
        if self.path == "/exit":
            say("exiting cleanly on request")
            self._send(200, b"bye")
            threading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()
            return
        if self.path == "/freeze":
            FROZEN.set()
            return self._send(200, b"frozen")
        self._send(404, b"no such path")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep the log to what the tests read
        pass


def main() -> None:
    global CHILD_PID
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the port is bound")
    parser.add_argument("--crash-at-start", action="store_true")
    parser.add_argument("--crash-at-start-if", default=None, help="crash at start when this file exists")
    parser.add_argument("--hang", action="store_true", help="accept connections, never answer")
    parser.add_argument("--spawn-child", action="store_true", help="start a child that ignores SIGTERM")
    parser.add_argument("--ignore-term", action="store_true")
    args = parser.parse_args()
    say(f"starting on port {args.port}")
    if args.crash_at_start or (args.crash_at_start_if and os.path.exists(args.crash_at_start_if)):
        say("boom: crashing at start")
        sys.exit(3)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, lambda *_: say("got SIGTERM, ignoring it"))
    else:
        signal.signal(signal.SIGTERM, lambda *_: (say("got SIGTERM, exiting"), os._exit(0)))
    if args.spawn_child:
        # Like an engine's scheduler subprocess: same process group, and it does not stop on SIGTERM.
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
        CHILD_PID = subprocess.Popen([sys.executable, "-c", code]).pid
        say(f"spawned child {CHILD_PID}")
    time.sleep(args.delay)
    if args.hang:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(64)  # the kernel completes handshakes; nobody ever reads a request
        say("listening, never answering")
        time.sleep(3600)
        return
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    say("ready")
    server.serve_forever()


if __name__ == "__main__":
    main()
