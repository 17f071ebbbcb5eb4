"""A stand-in for vLLM 0.24's OpenAI-compatible server, for CPU tests of the vllm backend's HTTP client.

It is a PROTOCOL TEST, not vLLM: a real HTTP server on 127.0.0.1 that takes and returns what vLLM
0.24's server does (request and response shapes read from `vllm/entrypoints/openai/completion/
protocol.py` and `serving.py`, and the development endpoints of `vllm/entrypoints/serve/dev/`), with
agentrl's embedded engine on the tiny model computing the tokens. What it follows:

- `POST /v1/completions`: a token-id `prompt`, the sampling fields, `logprobs`, `return_token_ids`,
  `return_tokens_as_token_ids`, `stream` with `stream_options.include_usage`; server-sent `data:`
  chunks of `CompletionStreamResponse` (`choices[0].token_ids`, `logprobs.token_logprobs`,
  `logprobs.tokens` as `token_id:N`, `finish_reason`, `stop_reason`), a last `usage` chunk with
  `prompt_tokens_details.cached_tokens` only under `--enable-prompt-tokens-details`, then
  `data: [DONE]`; errors as `{"error": {"message", "type", "param", "code"}}` with HTTP 400. As
  vLLM with `--skip-tokenizer-init`, logprobs without `return_tokens_as_token_ids` and stop strings
  are refused; without `ignore_eos` the model's EOS ends a response. A client that disconnects
  abandons its request (vLLM aborts it; here generation stops at the next chunk).
- The development endpoints, only when `VLLM_SERVER_DEV_MODE=1` (else 404, as in vLLM):
  `/pause?mode=keep|abort`, `/resume`, `/is_paused`, `/collective_rpc` (method `reload_weights`,
  kwargs `weights_path`), `/reset_prefix_cache`, `/sleep?level=N`, `/wake_up?tags=...`,
  `/is_sleeping`; `GET /health`.

Where it differs inside: vLLM streams every step; this server generates in chunks of
`--stream-interval` tokens (each a request to the embedded engine with the response so far
appended, seeded per chunk), which is what vLLM's own `--stream-interval` looks like on the wire.

Run: python vllm_protocol_server.py --model DIR --port N [--dtype float32] [--max-model-len N]
     [--enable-prompt-tokens-details] [--skip-tokenizer-init] [--stream-interval K]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch

if __name__ == "__main__":  # run as a script: the repository root is two folders up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from agentrl.errors import EngineError  # noqa: E402
from agentrl.rollout.backends.embedded import EmbeddedEngine  # noqa: E402
from agentrl.rollout.backends.vllm.loop_thread import LoopThread  # noqa: E402
from agentrl.rollout.engine import SamplingParams  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BadRequest(Exception):
    """A request vLLM's server would answer with HTTP 400."""


class State:
    """The engine and the flags the development endpoints flip."""

    def __init__(self, args):
        self.args = args
        self.engine = EmbeddedEngine(args.model, device="cpu", dtype=DTYPES[args.dtype],
                                     max_model_len=args.max_model_len)
        self.loop = LoopThread("protocol-server")
        self.running = threading.Event()  # cleared while paused or asleep: requests wait between chunks
        self.running.set()
        self.paused = False
        self.asleep_tags: set[str] = set()
        self.dev = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
        self.eos = config.eos_token_id
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def generate(self, prompt: list[int], sp: SamplingParams):
        return self.loop.run(self.engine.generate(prompt, sp))

    def sync_running(self) -> None:
        (self.running.clear if self.paused or self.asleep_tags else self.running.set)()


STATE: State | None = None


def completion_request(body: dict, skip_tokenizer: bool, max_model_len: int) -> tuple[list[int], dict]:
    """Validate a `/v1/completions` body the way vLLM 0.24's server does (the subset agentrl uses)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        if skip_tokenizer:
            raise BadRequest("Tokenizer not available when `skip_tokenizer_init=True`")
    if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt)):
        raise BadRequest("Either prompt or prompt_embeds must be provided and non-empty.")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else float(temperature)
    if not 0.0 <= temperature <= 2.0:
        raise BadRequest(f"temperature must be in [0, 2], got {temperature}.")
    top_p = 1.0 if body.get("top_p") is None else float(body["top_p"])
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs < 0:
        raise BadRequest("`logprobs` must be a positive value.")
    if logprobs is not None and skip_tokenizer and not body.get("return_tokens_as_token_ids"):
        raise BadRequest("Unable to get tokenizer because `skip_tokenizer_init=True`")
    if body.get("stop") and skip_tokenizer:
        raise BadRequest("stop strings are only supported when detokenize is True. Set detokenize=True to use stop.")
    if len(prompt) >= max_model_len:
        raise BadRequest(f"This model's maximum context length is {max_model_len} tokens. However, your request "
                         f"has {len(prompt)} input tokens.")
    max_tokens = body.get("max_tokens")
    max_tokens = min(16 if max_tokens is None else int(max_tokens), max_model_len - len(prompt))
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}.")
    return prompt, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        top_k=max(0, int(body.get("top_k") or 0)), min_p=float(body.get("min_p") or 0.0),
                        seed=body.get("seed"), stop_token_ids=tuple(body.get("stop_token_ids") or ()),
                        ignore_eos=bool(body.get("ignore_eos")), logprobs=logprobs)


def chunks(state: State, prompt: list[int], req: dict):
    """The response in chunks of `--stream-interval` tokens: (token ids, logprobs, finish, cached)."""
    interval = state.args.stream_interval
    stops = req["stop_token_ids"] + ((state.eos,) if state.eos is not None and not req["ignore_eos"] else ())
    out: list[int] = []
    k = 0
    while True:
        state.running.wait()
        n = min(interval, req["max_tokens"] - len(out))
        seed = None if req["seed"] is None else (int(req["seed"]) + 1_000_003 * k) % 2**63
        sp = SamplingParams(temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"],
                            min_p=req["min_p"], max_tokens=n, stop_token_ids=stops, seed=seed)
        gen = state.generate(prompt + out, sp)
        out += gen.token_ids
        if gen.finish_reason == "abort":
            finish = "abort"
        elif gen.finish_reason == "stop":
            finish = "stop"
        else:
            finish = "length" if len(out) >= req["max_tokens"] else None
        yield list(gen.token_ids), list(gen.logprobs), finish, (gen.prompt_cached_tokens if k == 0 else None)
        if finish is not None:
            return
        k += 1


def logprobs_json(ids: list[int], lps: list[float]) -> dict:
    """`CompletionLogProbs` with tokens as `token_id:N` (return_tokens_as_token_ids)."""
    tokens = [f"token_id:{t}" for t in ids]
    return {"text_offset": [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))],
            "token_logprobs": [max(lp, -9999.0) for lp in lps], "tokens": tokens,
            "top_logprobs": [{tok: max(lp, -9999.0)} for tok, lp in zip(tokens, lps)]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request is noise in the test logs
        pass

    def _send(self, status: int, body: object = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path == "/health":
            return self._send(200)
        if STATE.dev and path == "/is_sleeping":
            return self._send(200, {"is_sleeping": bool(STATE.asleep_tags)})
        if STATE.dev and path == "/is_paused":
            return self._send(200, {"is_paused": STATE.paused})
        self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return self._error(400, "JSON decode error")
        if path == "/v1/completions":
            return self._completions(body)
        dev = {"/pause": self._pause, "/resume": self._resume, "/collective_rpc": self._collective_rpc,
               "/reset_prefix_cache": self._reset, "/sleep": self._sleep, "/wake_up": self._wake_up}
        if not STATE.dev or path not in dev:
            return self._send(404, {"detail": "Not Found"})
        dev[path](body)

    # -- /v1/completions ---------------------------------------------------------------------------
    def _completions(self, body: dict) -> None:
        a = STATE.args
        try:
            prompt, req = completion_request(body, a.skip_tokenizer_init, a.max_model_len)
        except BadRequest as exc:
            return self._error(400, str(exc))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": a.model}
        if body.get("stream"):
            return self._stream(prompt, req, body, head)
        ids, lps, finish, cached = [], [], None, 0
        for c_ids, c_lps, finish, c_cached in chunks(STATE, prompt, req):
            ids, lps, cached = ids + c_ids, lps + c_lps, cached if c_cached is None else c_cached
        choice = {"index": 0, "text": "", "finish_reason": finish, "stop_reason": self._stop_reason(ids, finish, req),
                  "logprobs": logprobs_json(ids, lps) if req["logprobs"] is not None else None,
                  "token_ids": ids if body.get("return_token_ids") else None,
                  "prompt_token_ids": prompt if body.get("return_token_ids") else None}
        self._send(200, {**head, "choices": [choice], "usage": self._usage(prompt, len(ids), cached)})

    def _stream(self, prompt: list[int], req: dict, body: dict, head: dict) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        total, cached, first = 0, 0, True
        try:
            for ids, lps, finish, c_cached in chunks(STATE, prompt, req):
                cached = cached if c_cached is None else c_cached
                total += len(ids)
                choice = {"index": 0, "text": "", "finish_reason": finish,
                          "stop_reason": self._stop_reason(ids, finish, req),
                          "logprobs": logprobs_json(ids, lps) if req["logprobs"] is not None else None,
                          "token_ids": ids if body.get("return_token_ids") else None}
                if first and body.get("return_token_ids"):
                    choice["prompt_token_ids"] = prompt
                first = False
                self._event({**head, "choices": [choice]})
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event({**head, "choices": [], "usage": self._usage(prompt, total, cached)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: vLLM aborts the request; here the generator is simply dropped
        except EngineError as exc:
            self._event({"error": {"message": str(exc), "type": "InternalServerError", "param": None, "code": 500}})

    def _event(self, obj: dict) -> None:
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    @staticmethod
    def _stop_reason(ids: list[int], finish: str | None, req: dict):
        return ids[-1] if finish == "stop" and ids and ids[-1] in req["stop_token_ids"] else None

    @staticmethod
    def _usage(prompt: list[int], completion: int, cached: int) -> dict:
        usage = {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}
        if STATE.args.enable_prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    # -- development endpoints -----------------------------------------------------------------------
    def _pause(self, body: dict) -> None:
        mode = (self._query().get("mode") or ["abort"])[0]
        if mode not in ("abort", "wait", "keep"):
            return self._error(400, f"Invalid pause mode: {mode}")
        STATE.paused = True
        STATE.sync_running()
        if mode == "abort":
            STATE.engine.abort()
        self._send(200, {"status": "paused"})

    def _resume(self, body: dict) -> None:
        STATE.paused = False
        STATE.sync_running()
        self._send(200, {"status": "resumed"})

    def _collective_rpc(self, body: dict) -> None:
        method = body.get("method")
        if method is None:
            return self._error(400, "Missing 'method' in request body")
        if method != "reload_weights":
            return self._error(500, f"Method {method!r} is not implemented.", "InternalServerError")
        path = (body.get("kwargs") or {}).get("weights_path") or STATE.args.model
        try:
            STATE.engine.update_weights(load_weights(path, STATE.tied), STATE.engine.weight_version)
        except (OSError, EngineError) as exc:
            return self._error(500, f"reload_weights failed: {exc}", "InternalServerError")
        self._send(200, {"results": [None]})

    def _reset(self, body: dict) -> None:
        STATE.engine.reset_prefix_cache()
        self._send(200)

    def _sleep(self, body: dict) -> None:
        level = int((self._query().get("level") or ["1"])[0])
        STATE.asleep_tags = {"weights", "kv_cache"}
        STATE.sync_running()
        STATE.engine.sleep(level)
        self._send(200)

    def _wake_up(self, body: dict) -> None:
        tags = self._query().get("tags")
        STATE.asleep_tags -= set(tags) if tags else set(STATE.asleep_tags)
        if not STATE.asleep_tags:
            STATE.engine.wake()
        STATE.sync_running()
        self._send(200)


def load_weights(path: str, tied: bool) -> dict[str, torch.Tensor]:
    """Every `*.safetensors` file of `path`, as one state dict (the tied LM head filled in)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise OSError(f"no *.safetensors files in {path}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def main(argv: list[str] | None = None) -> None:
    global STATE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--stream-interval", type=int, default=4)
    ap.add_argument("--enable-prompt-tokens-details", action="store_true")
    ap.add_argument("--skip-tokenizer-init", action="store_true")
    args, rest = ap.parse_known_args(argv)
    STATE = State(args)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"vllm protocol server (a test stand-in, not vLLM) on {args.host}:{args.port}; other args: {rest}",
          flush=True)
    server.serve_forever()


def protocol_engine(model_dir: str, **options):
    """A `VLLMEngine` in server mode whose launched server is this stand-in (a protocol test, not vLLM)."""
    from agentrl.rollout.backends.managed import ServerSpec
    from agentrl.rollout.backends.vllm import VLLMEngine

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    spec = ServerSpec(launch=True, startup_timeout_s=180, env=env)
    return VLLMEngine(model_dir, device="cpu", dtype=torch.float32, server=spec,
                      launcher=(sys.executable, os.path.abspath(__file__)), **options)


if __name__ == "__main__":
    main()
