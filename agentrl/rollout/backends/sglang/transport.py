"""How the SGLang backend reaches its engine: `sglang.Engine` in this process, or a server over HTTP.

Both transports stream a request's outputs on one private event loop, run by a daemon thread
(`LoopThread`). agentrl callers each bring their own event loop (`asyncio.run` per rollout), but
SGLang's tokenizer manager binds its receive task and sockets to the first loop that uses it, and an
httpx client binds its connections the same way; one long-lived loop serves every caller. Control
calls (weights, cache, memory, abort) are blocking and come from the caller's thread.

`InProcessTransport` takes over the loop that `sglang.Engine` created, and calls the tokenizer
manager's coroutines with the request objects of `sglang.srt.managers.io_struct` (the same calls the
Engine's blocking methods make, which cannot run while the loop serves requests). Checked in the
SGLang 0.5.17 source (`srt/entrypoints/engine.py`, `srt/managers/tokenizer_*`).

`HttpTransport` speaks SGLang's native HTTP API (`srt/entrypoints/http_server.py`): `POST /generate`
(server-sent events: `data: {json}` lines, then `data: [DONE]`), `/abort_request`,
`/update_weights_from_disk`, `/update_weights_from_distributed`, `/init_weights_update_group`,
`/flush_cache`, `/release_memory_occupation`, `/resume_memory_occupation`. A request whose
connection fails has the server checked (`ManagedServer.ensure`, which restarts a crashed server
agentrl launched) and is sent once more; timeouts and error statuses raise `EngineError` with the
server's own message.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx

from agentrl.errors import EngineError

_CONTROL_TIMEOUT_S = 600.0  # weight loads of large models take minutes
_CRASHED = ("SGLang's scheduler process died (its output is above, on this process's stderr); an in-process engine "
            "cannot be restarted: create a new one, or run SGLang as a server (rollout.server.launch) to have "
            "agentrl restart it")


class LoopThread:
    """An asyncio event loop running in a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, name: str = "agentrl-sglang-loop"):
        self.loop = loop or asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro, timeout: float | None = _CONTROL_TIMEOUT_S):
        """Run `coro` on the loop and wait for its result (from another thread)."""
        if threading.current_thread() is self._thread:
            raise EngineError("a blocking SGLang call was made from the backend's own event loop (a bug)")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise EngineError(f"SGLang did not answer within {timeout:g} s") from None

    def soon(self, fn: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, grace_s: float = 5.0) -> None:
        """Cancel what still runs on the loop (each request's cleanup aborts it in SGLang), then stop it."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return
        if threading.current_thread() is not self._thread:
            with contextlib.suppress(EngineError, RuntimeError):
                self.call(_cancel_all(grace_s), timeout=grace_s + 5.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10.0)


async def _cancel_all(grace_s: float) -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=grace_s)


class InProcessTransport:
    """`sglang.Engine` in this process (its scheduler runs in subprocesses it spawns)."""

    def __init__(self, factory: Callable[..., Any], kwargs: Mapping[str, Any]):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:  # sglang.Engine would bind itself to the caller's loop, which this backend cannot run
            raise EngineError("create the in-process SGLang engine outside async code (no event loop may be running "
                              "in the thread that creates it), or run SGLang as a server (ServerSpec)")
        try:
            self.engine = factory(**kwargs)
        except (TypeError, ValueError) as exc:  # an option ServerArgs does not have, or a bad combination
            raise EngineError(f"SGLang refused the engine arguments: {type(exc).__name__}: {exc}") from exc
        # The Engine set its loop as this thread's current one; it now runs in our thread instead.
        asyncio.set_event_loop(None)
        self.tp_size = int(getattr(getattr(self.engine, "server_args", None), "tp_size", 1) or 1)
        self.loop = LoopThread(self.engine.loop)
        self._take_over_shutdown()

    @property
    def _tm(self):
        return self.engine.tokenizer_manager

    async def stream(self, request: Mapping[str, Any]) -> AsyncIterator[dict]:
        """The outputs of one streamed request; leaving early (or being cancelled) aborts it."""
        if self.crashed.is_set():
            raise EngineError(_CRASHED)
        task = asyncio.current_task()
        self._active.add(task)
        gen, done = None, False
        try:
            gen = await self.engine.async_generate(**request)
            async for out in gen:
                yield out
            done = True
        except ValueError as exc:  # SGLang's way of refusing a request (bad input, aborted while queued)
            done = True
            raise EngineError(f"SGLang refused the request: {exc}") from exc
        except asyncio.CancelledError:
            if self.crashed.is_set():
                raise EngineError(_CRASHED) from None
            raise
        finally:
            self._active.discard(task)
            if not done and not self.crashed.is_set():
                # Before the generator is closed: closing drops the request's state, after which
                # SGLang can no longer find it to abort, and its scheduler would run it to the end.
                self._abort(request["rid"])
            if gen is not None:
                await gen.aclose()

    def abort(self, rid: str | None = None) -> None:
        self.loop.soon(self._abort, rid)

    def _abort(self, rid: str | None) -> None:
        if self.engine is None:  # closed meanwhile
            return
        if rid is None:
            self._tm.abort_request(abort_all=True)
        else:
            self._tm.abort_request(rid=rid)

    # -- control: the tokenizer manager's coroutines with io_struct request objects -----------------
    def _control(self, method: str, req_class: str, **fields):
        from sglang.srt.managers import io_struct

        obj = getattr(io_struct, req_class)(**fields)
        return self.loop.call(getattr(self._tm, method)(obj, None))

    def update_from_tensors(self, named: Sequence[tuple[str, Any]], version: int) -> None:
        from sglang.srt.utils import MultiprocessingSerializer

        payload = [MultiprocessingSerializer.serialize(list(named)) for _ in range(self.tp_size)]
        _check(self._control("update_weights_from_tensor", "UpdateWeightsFromTensorReqInput",
                             serialized_named_tensors=payload, flush_cache=True, weight_version=str(version)),
               "update_weights_from_tensor")

    def update_from_disk(self, path: str, version: int) -> None:
        _check(self._control("update_weights_from_disk", "UpdateWeightFromDiskReqInput", model_path=path,
                             weight_version=str(version), flush_cache=True), "update_weights_from_disk")

    def init_weights_group(self, **fields) -> None:
        _check(self._control("init_weights_update_group", "InitWeightsUpdateGroupReqInput", **fields),
               "init_weights_update_group")

    def start_distributed_update(self, names, dtypes, shapes, group_name: str, version: int):
        """Ask the engine to receive broadcast weights; returns a future (the sender broadcasts meanwhile)."""
        from sglang.srt.managers import io_struct

        obj = io_struct.UpdateWeightsFromDistributedReqInput(names=list(names), dtypes=list(dtypes),
                                                             shapes=[list(s) for s in shapes], group_name=group_name,
                                                             flush_cache=True, weight_version=str(version))
        fut = self.loop.submit(self._tm.update_weights_from_distributed(obj, None))
        return lambda timeout: _check(fut.result(timeout), "update_weights_from_distributed")

    def flush_cache(self) -> None:
        out = self.loop.call(self._tm.flush_cache())
        if not getattr(out, "success", True):
            raise EngineError(f"SGLang could not flush its cache: {getattr(out, 'message', '')}")

    def release(self, tags: list[str]) -> None:
        self._control("release_memory_occupation", "ReleaseMemoryOccupationReqInput", tags=tags)

    def resume(self, tags: list[str]) -> None:
        self._control("resume_memory_occupation", "ResumeMemoryOccupationReqInput", tags=tags)

    # -- lifetime -----------------------------------------------------------------------------------
    def _take_over_shutdown(self) -> None:
        """SGLang's own exit path kills every child of this process (not only its own), and its
        SIGQUIT handler, which a dying scheduler triggers, kills this process. Here `close` stops
        only the engine's children, and a scheduler crash fails the requests in flight instead."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            atexit.unregister(shutdown)
        self.crashed = threading.Event()
        self._active: set[asyncio.Task] = set()  # tasks streaming a request (touched on the loop only)
        self._old_sigquit = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGQUIT"):
            self._old_sigquit = signal.signal(signal.SIGQUIT, self._on_sigquit)

    def _on_sigquit(self, *_) -> None:
        self.crashed.set()
        self.loop.soon(self._fail_active)

    def _fail_active(self) -> None:
        for task in list(self._active):
            task.cancel()

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is None:
            return
        watchdog = getattr(getattr(engine, "tokenizer_manager", None), "_subprocess_watchdog", None)
        if watchdog is not None:
            watchdog.stop()
        pids = list(engine.get_all_child_pids()) if hasattr(engine, "get_all_child_pids") else []
        self.loop.stop()
        if self._old_sigquit is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGQUIT, self._old_sigquit)
        if pids:
            from sglang.srt.utils import kill_process_tree

            for pid in pids:
                kill_process_tree(pid, include_parent=True, wait_timeout=60)


class HttpTransport:
    """SGLang's native HTTP API on a server (`ManagedServer`: launched by agentrl or at a URL)."""

    def __init__(self, server, request_timeout_s: float):
        self.server = server
        self.request_timeout_s = request_timeout_s
        self.loop = LoopThread(name="agentrl-sglang-http")
        self._trust_env = server.spec.url is not None  # a user's URL may need their proxy; 127.0.0.1 never does
        self._client: httpx.AsyncClient | None = None  # created on the loop thread, used only there
        self._sync = httpx.Client(trust_env=self._trust_env, timeout=_CONTROL_TIMEOUT_S)
        self._sync_lock = threading.Lock()

    async def stream(self, request: Mapping[str, Any]) -> AsyncIterator[dict]:
        retried = False
        while True:
            started = False
            try:
                async with contextlib.aclosing(self._stream_once(request)) as outs:
                    async for out in outs:
                        started = True
                        yield out
                return
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if retried or started:
                    raise EngineError(f"lost the SGLang server at {self.server.url} during a request: "
                                      f"{type(exc).__name__}: {exc}") from exc
                retried = True
                # Restarts a launched server that died (and re-syncs its weights); raises if it cannot.
                await asyncio.get_running_loop().run_in_executor(None, lambda: self.server.ensure(probe=True))

    async def _stream_once(self, request: Mapping[str, Any]) -> AsyncIterator[dict]:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=self._trust_env, timeout=self.request_timeout_s)
        done = False
        try:
            async with self._client.stream("POST", self.server.url + "/generate", json=dict(request)) as resp:
                if resp.status_code != 200:
                    done = True
                    body = (await resp.aread()).decode("utf-8", errors="replace")
                    raise EngineError(f"SGLang /generate answered {resp.status_code}: {_error_text(body)}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        return
                    yield json.loads(data)
            done = True
        except httpx.TimeoutException as exc:
            raise EngineError(f"SGLang /generate at {self.server.url} timed out after {self.request_timeout_s:g} s "
                              f"({type(exc).__name__}); raise request_timeout_s if responses are that long") from exc
        finally:
            if not done:  # left early or cancelled: the server would otherwise notice only at its next output
                with contextlib.suppress(httpx.HTTPError, RuntimeError):
                    await self._client.post(self.server.url + "/abort_request", json={"rid": request["rid"]},
                                            timeout=10.0)

    def server_info(self) -> dict:
        """`GET /server_info`: the server's resolved arguments ({} when it does not answer one)."""
        try:
            with self._sync_lock:
                resp = self._sync.get(self.server.url + "/server_info", timeout=30.0)
            return resp.json() if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}

    def abort(self, rid: str | None = None) -> None:
        body = {"abort_all": True} if rid is None else {"rid": rid}
        self._post("/abort_request", body, parse=False, ensure=False)  # a server that is down runs nothing

    def update_from_disk(self, path: str, version: int) -> None:
        self._post("/update_weights_from_disk", {"model_path": path, "weight_version": str(version),
                                                 "flush_cache": True})

    def init_weights_group(self, **fields) -> None:
        self._post("/init_weights_update_group", fields)

    def start_distributed_update(self, names, dtypes, shapes, group_name: str, version: int):
        body = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                "group_name": group_name, "flush_cache": True, "weight_version": str(version)}
        pool = concurrent.futures.ThreadPoolExecutor(1)
        fut = pool.submit(self._post, "/update_weights_from_distributed", body)
        pool.shutdown(wait=False)
        return lambda timeout: fut.result(timeout)

    def flush_cache(self) -> None:
        self._post("/flush_cache", None, parse=False)

    def release(self, tags: list[str]) -> None:
        self._post("/release_memory_occupation", {"tags": tags}, parse=False)

    def resume(self, tags: list[str]) -> None:
        self._post("/resume_memory_occupation", {"tags": tags}, parse=False)

    def _post(self, path: str, body: Mapping[str, Any] | None, *, parse: bool = True, ensure: bool = True) -> None:
        """POST a control call; its answer must be 200 (and `success: true` where SGLang says it)."""
        if ensure:
            self.server.ensure()
        try:
            with self._sync_lock:
                resp = self._sync.post(self.server.url + path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"SGLang {path} at {self.server.url} failed: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise EngineError(f"SGLang {path} answered {resp.status_code}: {_error_text(resp.text)}")
        if parse and resp.content:
            _check(resp.json(), path)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and not self.loop.loop.is_closed():
            try:
                self.loop.call(client.aclose(), timeout=10.0)
            except EngineError:
                pass
        self.loop.stop()
        self._sync.close()
        self.server.stop()


def _check(result: Any, what: str) -> None:
    """Raise EngineError for SGLang's failure answers: `(False, message, ...)` or `{"success": False, ...}`."""
    if isinstance(result, Mapping):
        ok, message = result.get("success", True), result.get("message", "")
    elif isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, message = result[0], result[1] if len(result) > 1 else ""
    else:
        ok, message = getattr(result, "success", True), getattr(result, "message", "")
    if not ok:
        raise EngineError(f"SGLang {what} failed: {message}")


def _error_text(body: str) -> str:
    """The message of an SGLang error body (`{"error": {"message": ...}}`, FastAPI's `{"detail": ...}`)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:2000] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)[:2000]
    return body.strip()[:2000]
