"""A vLLM 0.24 OpenAI-compatible server over HTTP: the same calls as `inprocess.py`, as requests.

Generation is `POST /v1/completions` with a token-id prompt and `stream: true` (the body is
`params.completion_body`): each server-sent `data:` chunk carries the new token ids and their
logprobs, the last one the prefix-cache hit. Streaming is what makes `abort` keep partial
output: closing the connection is how vLLM's server learns a request was abandoned (its
`with_cancellation` wrapper and the stream's generator abort it in the engine), and the tokens
already received are the partial response.

Control calls are vLLM's development endpoints (present only with `VLLM_SERVER_DEV_MODE=1`,
which agentrl sets on servers it launches): `/pause?mode=keep`, `/resume`, `/collective_rpc`
(the workers' `reload_weights`), `/reset_prefix_cache`, `/sleep?level=N`, `/wake_up?tags=...`,
and for NCCL `/get_world_size`, `/init_weight_transfer_engine`, `/start_weight_update`,
`/update_weights`, `/finish_weight_update` (`vllm/entrypoints/serve/dev/` in the 0.24 wheel).

Failures: a refused connection before any token arrived means the server is down, so
`ManagedServer.ensure` (restart a launched server, which re-syncs the weights) runs and the call
is retried once; a connection lost mid-response is an EngineError (the partial response came
from a server that is gone); an HTTP error is an EngineError carrying the server's message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping

import httpx

from agentrl.errors import EngineError
from agentrl.rollout.backends.managed import ManagedServer, free_port
from agentrl.rollout.backends.vllm.params import Delta, completion_body, error_text, parse_completion_chunk
from agentrl.rollout.backends.vllm.weights import nccl_update_info
from agentrl.rollout.engine import SamplingParams

_END, _ABORTED = object(), object()
_CONTROL_TIMEOUT_S = 600.0  # a weight reload or a wake-up of a large model is slow, but bounded


class ServerTransport:
    """One vLLM server (launched or at a URL) behind the calls the backend's front needs."""

    def __init__(self, server: ManagedServer, request_timeout_s: float):
        self.server = server
        self.request_timeout_s = request_timeout_s
        self.client: httpx.AsyncClient | None = None
        self._readers: dict[str, tuple[asyncio.Task, asyncio.Queue]] = {}  # request id -> (reader, its queue)
        self._nccl_group = None

    async def start(self) -> None:
        """Open the HTTP client on the current (the backend's) loop; the server is already up."""
        # One connection per response in flight (they stream), and as many as the agent loop sends at once.
        self.client = httpx.AsyncClient(trust_env=self.server.spec.mode == "url",
                                        timeout=httpx.Timeout(self.request_timeout_s, connect=30.0),
                                        limits=httpx.Limits(max_connections=4096, max_keepalive_connections=256))

    # -- generation ------------------------------------------------------------------------------
    async def stream(self, rid: str, prompt: list[int], sampling: SamplingParams) -> AsyncIterator[Delta]:
        """The response to `prompt` as it grows; the last Delta has a finish reason."""
        body = completion_body(prompt, sampling)
        for attempt in (0, 1):
            queue: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(self._read(body, queue))
            self._readers[rid] = (reader, queue)
            received, retry, final = False, False, None
            try:
                while True:
                    item = await queue.get()
                    if item is _END:
                        if final is None:
                            raise EngineError("the vLLM server ended the stream without a finish reason")
                        yield final
                        return
                    if item is _ABORTED:  # a response that had completed keeps its last tokens and reason
                        yield final if final is not None else Delta(finish_reason="abort")
                        return
                    if isinstance(item, BaseException):
                        if final is not None:  # the connection went after the response was complete
                            yield final
                            return
                        retry = await self._failed(item, received, attempt)
                        break
                    if final is not None:  # the usage chunk after the last one: the prefix-cache hit
                        final = dataclasses.replace(final, cached_tokens=item.cached_tokens)
                    elif item.finish_reason is not None:
                        final = item  # held back until the usage chunk (or the end) arrives
                    else:
                        received = received or bool(item.token_ids)
                        yield item
            finally:
                reader.cancel()
                self._readers.pop(rid, None)
            if not retry:
                return

    async def _read(self, body: dict, queue: asyncio.Queue) -> None:
        """Read the server-sent events of one request into `queue`; cancelled = the request is abandoned
        (leaving the `stream` context closes the connection, which makes vLLM abort it)."""
        try:
            async with self.client.stream("POST", self.server.url + "/v1/completions", json=body) as resp:
                if resp.status_code >= 400:
                    raise EngineError(f"vLLM refused the completion request: "
                                      f"{error_text(resp.status_code, await resp.aread())}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    queue.put_nowait(parse_completion_chunk(json.loads(data)))
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            queue.put_nowait(_ABORTED)
            raise
        except Exception as exc:  # handed to the consumer, which decides (retry, EngineError)
            queue.put_nowait(exc)

    async def _failed(self, exc: BaseException, received: bool, attempt: int) -> bool:
        """Decide on a failed request: True = retry it (the server was down before it answered)."""
        if isinstance(exc, EngineError):
            raise exc
        if isinstance(exc, json.JSONDecodeError):
            raise EngineError(f"the vLLM server sent a chunk that is not JSON: {exc}") from exc
        if isinstance(exc, httpx.TimeoutException):
            await asyncio.to_thread(self.server.ensure, probe=True)
            raise EngineError(f"the vLLM server at {self.server.url} did not answer within "
                              f"request_timeout_s={self.request_timeout_s:g} s") from exc
        if isinstance(exc, httpx.TransportError):
            restarted = await asyncio.to_thread(self.server.ensure, probe=True)
            if attempt == 0 and not received:
                return True
            raise EngineError(f"lost the connection to the vLLM server at {self.server.url} mid-response "
                              f"({type(exc).__name__}: {exc}){'; it was restarted' if restarted else ''}") from exc
        raise EngineError(f"request to the vLLM server failed: {type(exc).__name__}: {exc}") from exc

    async def abort(self, rids: list[str]) -> None:
        """End these requests with what they have: the consumer gets `_ABORTED` after the chunks already
        queued, and the reader is cancelled (closing the connection, which makes vLLM abort the request).
        `_ABORTED` is queued here, not only by the reader: a reader cancelled before its first step never
        runs its handler, and the consumer would wait forever."""
        for rid in rids:
            entry = self._readers.get(rid)
            if entry is not None:
                reader, queue = entry
                queue.put_nowait(_ABORTED)
                reader.cancel()

    # -- control ---------------------------------------------------------------------------------
    async def _post(self, path: str, *, params: Mapping | list | None = None, body: dict | None = None) -> httpx.Response:
        for attempt in (0, 1):
            try:
                resp = await self.client.post(self.server.url + path, params=params, json=body,
                                              timeout=_CONTROL_TIMEOUT_S)
            except httpx.TransportError as exc:
                await asyncio.to_thread(self.server.ensure, probe=True)
                if attempt == 0 and isinstance(exc, httpx.ConnectError):
                    continue
                raise EngineError(f"POST {path} to the vLLM server at {self.server.url} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
            check_response(path, resp.status_code, resp.content)
            return resp
        raise AssertionError("unreachable")

    async def pause(self) -> None:
        await self._post("/pause", params={"mode": "keep", "clear_cache": "false"})

    async def resume(self) -> None:
        await self._post("/resume")

    async def reload_weights(self, path: str) -> None:
        await self._post("/collective_rpc", body=reload_body(path))

    async def reset_prefix_cache(self, running: bool) -> None:
        await self._post("/reset_prefix_cache", params={"reset_running_requests": str(running).lower()})

    async def sleep(self, level: int) -> None:
        await self._post("/sleep", params={"level": str(level)})

    async def wake(self, tags: list[str] | None) -> None:
        await self._post("/wake_up", params=[("tags", t) for t in tags] if tags else None)

    def resync(self, path: str) -> None:
        """Load the weights at `path` into a freshly restarted server (a blocking call, from `ensure`)."""
        with httpx.Client(trust_env=self.server.spec.mode == "url", timeout=_CONTROL_TIMEOUT_S) as client:
            resp = client.post(self.server.url + "/collective_rpc", json=reload_body(path))
            check_response("/collective_rpc", resp.status_code, resp.content)
        self._nccl_group = None  # the restarted server's workers are not in the old NCCL group

    # -- NCCL weight transfer (written from vLLM 0.24's source; not run on this project's machines) --
    async def nccl_update(self, tensors: Mapping[str, object], address: str, port: int | None) -> None:
        """Broadcast `tensors` (CUDA, this process's current device) to the server's workers."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        if self._nccl_group is None:
            world = (await self.client.get(self.server.url + "/get_world_size")).json()["world_size"] + 1
            info = {"master_address": address, "master_port": port or free_port(), "world_size": world}
            joined = asyncio.to_thread(NCCLWeightTransferEngine.trainer_init, info)
            self._nccl_group, _ = await asyncio.gather(
                joined, self._post("/init_weight_transfer_engine", body={"init_info": {**info, "rank_offset": 1}}))
        await self._post("/start_weight_update", body={"is_checkpoint_format": True})
        send = asyncio.to_thread(NCCLWeightTransferEngine.trainer_send_weights, iter(tensors.items()),
                                 {"group": self._nccl_group, "packed": True})
        await asyncio.gather(self._post("/update_weights", body={"update_info": nccl_update_info(tensors)}), send)
        await self._post("/finish_weight_update")

    async def close(self) -> None:
        """Close the client; stop the server if agentrl launched it (a URL server keeps running)."""
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        await asyncio.to_thread(self.server.stop)


def reload_body(path: str) -> dict:
    """`/collective_rpc` body running every worker's `reload_weights(weights_path=path)`."""
    return {"method": "reload_weights", "kwargs": {"weights_path": path, "is_checkpoint_format": True}}


def check_response(path: str, status: int, content: bytes) -> None:
    """EngineError for an HTTP error from a control endpoint, naming dev mode where it is the cause."""
    if status == 404:
        raise EngineError(f"the vLLM server has no {path} endpoint: agentrl needs vLLM's development endpoints; "
                          "start the server with VLLM_SERVER_DEV_MODE=1 (agentrl sets it on servers it launches)")
    if status >= 400:
        raise EngineError(f"vLLM refused {path}: {error_text(status, content)}")
