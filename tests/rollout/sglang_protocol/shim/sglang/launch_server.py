"""`python -m sglang.launch_server` for the CPU tests: a real HTTP server on 127.0.0.1 that answers
SGLang 0.5.17's native endpoints (`/health`, `/server_info`, `/generate` with server-sent events,
`/abort_request`, `/update_weights_from_disk`, `/flush_cache`, `/release_memory_occupation`,
`/resume_memory_occupation`) from the stand-in in ../../standin.py. Not SGLang.

It takes the flags the backend passes and refuses any other, so a flag the client starts sending
shows up here; its error bodies have SGLang's shape (`{"error": {"message": ...}}`, status 400).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from safetensors.torch import load_file

from sglang_protocol.standin import StandinSGLang


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser("sglang.launch_server (protocol stand-in)")
    for flag in ("--model-path", "--dtype", "--device", "--weight-version", "--host"):
        ap.add_argument(flag, required=flag in ("--model-path", "--host"))
    for flag in ("--context-length", "--random-seed", "--port", "--base-gpu-id"):
        ap.add_argument(flag, type=int)
    for flag in ("--skip-tokenizer-init", "--enable-deterministic-inference", "--enable-memory-saver"):
        ap.add_argument(flag, action="store_true")
    ap.add_argument("--mem-fraction-static", type=float)
    return ap.parse_args(argv)


class Server:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        kwargs = {k: v for k, v in vars(args).items() if v is not None and k not in ("host", "port")}
        self.sglang = StandinSGLang(**kwargs)
        self.loop = self.sglang.loop
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def handler(server: Server):
    sg = server.sglang

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test logs short
            pass

        def _send(self, status: int, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"null") or {}

        def do_GET(self):
            if self.path in ("/health", "/health_generate"):
                self._send(200, b"", "text/plain")
            elif self.path == "/server_info":
                self._send(200, {**{k: v for k, v in vars(server.args).items()},
                                 "context_length": server.args.context_length, "weight_version": sg.weight_version,
                                 "version": "protocol-standin"})
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            body = self._body()
            try:
                if self.path == "/generate":
                    return self._generate(body)
                if self.path == "/abort_request":
                    server.loop.call_soon_threadsafe(lambda: sg.tokenizer_manager.abort_request(
                        rid=body.get("rid") or "", abort_all=bool(body.get("abort_all"))))
                    return self._send(200, b"", "text/plain")
                if self.path == "/update_weights_from_disk":
                    path = os.path.join(body["model_path"], "model.safetensors")
                    sg.load_weights(load_file(path), str(body.get("weight_version") or "default"))
                    return self._send(200, {"success": True, "message": "Succeeded to update model weights.",
                                            "num_paused_requests": 0})
                if self.path == "/flush_cache":
                    sg.engine.reset_prefix_cache()
                    return self._send(200, b"Cache flushed.\n", "text/plain")
                if self.path == "/release_memory_occupation":
                    sg.engine.sleep()
                    return self._send(200, b"null")
                if self.path == "/resume_memory_occupation":
                    sg.engine.wake()
                    return self._send(200, b"null")
                self._send(404, {"detail": "Not Found"})
            except (ValueError, KeyError, OSError) as exc:
                self._send(400, {"error": {"message": f"{type(exc).__name__}: {exc}"}})

        def _generate(self, body: dict):
            stream = bool(body.get("stream"))
            try:
                outs = server.run(sg.async_generate(**body))
                first = server.run(outs.__anext__()) if stream else outs
            except ValueError as exc:  # SGLang: a 400 body, or for a stream an error event
                error = {"error": {"message": str(exc), "type": "invalid_request_error", "code": 400}}
                if not stream:
                    return self._send(400, error)
                first, outs = error, _empty()
            if not stream:
                return self._send(200, first)
            # SGLang answers streams as server-sent events, each chunk as it comes; HTTP/1.0 ends
            # the body by closing the connection.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            out = first
            while out is not None:
                self.wfile.write(b"data: " + json.dumps(out).encode() + b"\n\n")
                self.wfile.flush()
                out = server.run(_next(outs))
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


async def _empty():
    return
    yield


async def _next(outs):
    try:
        return await outs.__anext__()
    except StopAsyncIteration:
        return None


def main() -> None:
    args = parse(sys.argv[1:])
    server = Server(args)
    httpd = ThreadingHTTPServer((args.host, args.port), handler(server))
    httpd.daemon_threads = True
    httpd.serve_forever()


if __name__ == "__main__":
    main()
