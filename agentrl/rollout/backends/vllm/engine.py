"""`VLLMEngine`: agentrl's `Engine` contract on vLLM 0.24, in-process or against its server.

The front is the same for both ways of running vLLM; a transport does the talking
(`inprocess.InProcessTransport`: `AsyncLLM`; `server.ServerTransport`: HTTP). Every transport call
runs on the backend's own event loop (`loop_thread.py`), so callers may come from any loop or
thread. The front owns what vLLM cannot do for agentrl:

- the logprob contract (`params.check_logprob_contract`): requests whose logprobs vLLM would
  report differently are refused, not served;
- stop strings, matched on the token stream with the model's tokenizer (vLLM has none here): the
  response ends at the token that completes one, and vLLM is told to stop (the stream is closed);
- weight versions: each token is stamped with the version the backend held when the token
  arrived. A weight update pauses vLLM between two steps (`pause_generation(mode="keep")`),
  waits `_DRAIN_S` for the outputs of the last step before the pause to arrive, loads the
  weights, drops the prefix cache (requests in flight are preempted and their KV recomputed with
  the new weights), switches the version and resumes. So a token is stamped with the version that
  sampled it unless vLLM's output of the step just before an update arrives more than `_DRAIN_S`
  late, in which case it carries the newer version;
- sleep: an update that arrives while asleep is kept and applied at `wake()` (weights first,
  then the KV cache), as vLLM's memory is not there to copy into; after a level-2 sleep (vLLM
  drops the weights) the current weights are reloaded at wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import types
import uuid
from collections.abc import Mapping, Sequence

import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.sampling import StopStrings, validate
from agentrl.rollout.backends.managed import ManagedServer, ServerSpec
from agentrl.rollout.backends.vllm import launch, weights
from agentrl.rollout.backends.vllm.loop_thread import LoopThread
from agentrl.rollout.backends.vllm.params import Delta, check_logprob_contract
from agentrl.rollout.engine import EngineStats, Generation, SamplingParams, check_prompt, load_tokenizer_or_none

_DRAIN_S = 0.05  # after a pause: time for the last step's outputs to reach the front (see the docstring)
_CONTROL_TIMEOUT_S = 1800.0  # a reload, sleep or wake of a large model is slow, but bounded


@dataclasses.dataclass
class Response:
    """One response as it arrives: tokens, logprobs, the version of each token, how it ended."""

    stop: StopStrings | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0

    def add(self, delta: Delta, version: int) -> int:
        """Take `delta` (its tokens sampled under `version`); returns how many tokens were kept.

        A stop string ends the response at the token that completes it (the rest is dropped).
        """
        kept = 0
        if delta.cached_tokens is not None:
            self.cached_tokens = max(self.cached_tokens, delta.cached_tokens)
        for tok, lp in zip(delta.token_ids, delta.logprobs):
            self.token_ids.append(tok)
            self.logprobs.append(lp)
            self.versions.append(version)
            kept += 1
            if self.stop is not None and self.stop(types.SimpleNamespace(tokens=self.token_ids, prompt_len=0)):
                self.finish_reason = "stop"
                return kept
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        return kept

    def generation(self, version: int) -> Generation:
        return Generation(tuple(self.token_ids), tuple(self.logprobs), self.finish_reason or "abort",
                          self.versions[0] if self.versions else version, self.cached_tokens, tuple(self.versions))


class VLLMEngine:
    """vLLM 0.24 as an agentrl engine: `AsyncLLM` in this process, or a vLLM server.

    Args:
        model_path: A Hugging Face model directory (or, with `server.url`, the model the server serves;
            read here for its tokenizer and vocabulary when it is a local directory).
        device: In-process: must be a CUDA device (vLLM picks GPUs by CUDA_VISIBLE_DEVICES). Ignored
            for a server, which has its own.
        dtype: Weights dtype for vLLM (`torch.bfloat16`, `torch.float16`, `torch.float32`).
        max_model_len: Longest prompt + response.
        server: `ServerSpec(url=...)` for a running server, `ServerSpec(launch=True)` to have agentrl
            start one (`python -m vllm.entrypoints.openai.api_server`), None to run in-process.
        tokenizer: For stop strings; loaded from `model_path` when None.
        vllm_api: The vLLM classes the in-process engine uses (default: imported from vllm).
        **options: `rollout.engine_options`: the backend's own (`launch.BackendOptions`:
            logprobs_mode, enable_sleep_mode, weight_sync, staging_dir, launcher, ...) and vLLM
            engine arguments passed through (gpu_memory_utilization, enforce_eager, ...).

    Example:
        >>> engine = VLLMEngine("runs/model", gpu_memory_utilization=0.5)         # doctest: +SKIP
        >>> gen = await engine.generate([1, 2, 3], SamplingParams(max_tokens=8))   # doctest: +SKIP
    """

    def __init__(self, model_path: str, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 max_model_len: int = 4096, server: ServerSpec | None = None, tokenizer=None,
                 vllm_api: types.SimpleNamespace | None = None, **options):
        self.opts, passthrough = launch.BackendOptions.split(options)
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer_or_none(model_path)
        self.vocab_size = _vocab_size(model_path)
        self.weight_version = 0
        self.stats = EngineStats()
        self._current: str | None = None  # the staged directory holding the current weights (None: model_path)
        self._pending: tuple[str, int] | None = None  # (weights dir, version) that arrived while asleep
        self._asleep = 0
        self._abort_epoch = 0
        self._inflight: dict[str, int] = {}  # request id -> abort epoch at submission
        self._cached_prompt_tokens = 0
        self._control = asyncio.Lock()  # one update, sleep or wake at a time (they pause and resume vLLM)
        kwargs = launch.engine_kwargs(model_path, dtype, max_model_len, self.opts, passthrough)
        self._loop = LoopThread("agentrl-vllm")
        self.transport = None
        try:
            self.transport = self._open(server, device, kwargs, vllm_api)
            self._loop.run(self.transport.start(), timeout=None)
        except BaseException:
            if self.transport is not None:  # a launched server must not outlive a failed constructor
                with contextlib.suppress(Exception):
                    self._loop.run(self.transport.close(), timeout=120.0)
            self._loop.close()
            raise

    def _open(self, server: ServerSpec | None, device: str, kwargs: dict, vllm_api):
        if server is None or server.mode == "in_process":
            if self.opts.weight_sync == "nccl":
                raise EngineError("weight_sync='nccl' is for a vLLM server on other GPUs; in-process vLLM shares "
                                  "this process's GPU: use the default weight_sync='disk'")
            if str(device) not in ("cuda", "cuda:0"):
                raise EngineError(f"in-process vLLM runs on CUDA and picks its GPU by CUDA_VISIBLE_DEVICES; got device="
                                  f"{device!r}. Use device 'cuda' (set CUDA_VISIBLE_DEVICES), a vLLM server "
                                  "(rollout.server), or the embedded engine on the CPU")
            from agentrl.rollout.backends.vllm.inprocess import InProcessTransport

            return InProcessTransport(kwargs, vllm_api)
        from agentrl.rollout.backends.vllm.server import ServerTransport

        spec = dataclasses.replace(server, env={**launch.SERVER_ENV, **server.env})
        managed = ManagedServer("vllm", lambda port: launch.server_argv(port, kwargs, self.opts), spec,
                                on_restart=self._resync)
        managed.start()
        return ServerTransport(managed, self.opts.request_timeout_s)

    # -- the Engine contract ---------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Generation:
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, sampling)
        stop = StopStrings(self.tokenizer, sampling.stop) if sampling.stop else None
        if sampling.max_tokens == 0:
            return Generation((), (), "length", self.weight_version)
        if self._asleep:
            raise EngineError("the engine is asleep (sleep() was called); call wake() before generate()")
        return await self._loop.wrap(self._generate(prompt, sampling, stop, self._abort_epoch))

    async def _generate(self, prompt: list[int], sampling: SamplingParams, stop, epoch: int) -> Generation:
        rid = uuid.uuid4().hex
        resp = Response(stop)
        self._inflight[rid] = epoch
        aborting = False
        try:
            if epoch < self._abort_epoch:  # abort() came between generate() and this coroutine
                return resp.generation(self.weight_version)
            async with contextlib.aclosing(self.transport.stream(rid, prompt, sampling)) as stream:
                async for delta in stream:
                    self.stats.generated_tokens += resp.add(delta, self.weight_version)
                    if resp.finish_reason is not None:
                        break  # closing the stream stops vLLM (a stop string), or it had finished
                    if not aborting and epoch < self._abort_epoch:  # an abort() raced this request's start
                        aborting = True
                        await self.transport.abort([rid])
        finally:
            del self._inflight[rid]
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        self._cached_prompt_tokens += resp.cached_tokens
        self._update_extra()
        return resp.generation(self.weight_version)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load new weights between two steps (see the module docstring); in-flight requests go on
        with them. With weight_sync='disk' they pass through `staging_dir` (weights.py)."""
        if self.opts.weight_sync == "nccl":
            self._call(self._locked(self._apply_nccl, state_dict, version))
            return
        path = weights.stage_weights(state_dict, self.opts.staging_dir)
        try:
            self._call(self._locked(self._apply, path, version))
        except BaseException:
            weights.discard(path)
            raise

    def update_weights_from_disk(self, path: str, version: int) -> None:
        """Load the weights of the model directory `path` (as saved by `save_pretrained`)."""
        weights.check_weights_dir(path)
        self._call(self._locked(self._apply, path, version))

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (call it between plays; refused while requests run)."""
        self._call(self.transport.reset_prefix_cache(running=False))

    def sleep(self, level: int = 1) -> None:
        """Abort requests in flight and free vLLM's KV cache (level 1 also moves the weights to host
        memory; level 2 drops them, and `wake` reloads the current ones)."""
        self._asleep = level  # from now on generate() is refused
        try:
            self.abort()
            self._call(self._locked(self.transport.sleep, level))
        except BaseException:
            self._asleep = 0  # vLLM did not go to sleep: it still serves
            raise

    def wake(self) -> None:
        """Undo `sleep`; weights that arrived while asleep are loaded first."""
        self._call(self._locked(self._wake))
        self._asleep = 0

    def abort(self) -> None:
        """End every request in flight; each returns what it has (`finish_reason="abort"`)."""
        self._abort_epoch += 1
        if self._loop.alive:
            self._call(self._abort_inflight(), timeout=60.0)

    def close(self) -> None:
        """Abort what is in flight, stop vLLM (or a launched server) and the backend's loop. Idempotent."""
        if not self._loop.alive:
            return
        with contextlib.suppress(Exception):
            self.abort()
        with contextlib.suppress(Exception):
            self._call(self.transport.close(), timeout=120.0)
        self._loop.close()
        weights.discard(self._current)
        if self._pending is not None:
            weights.discard(self._pending[0])

    # -- internals -------------------------------------------------------------------------------
    def _call(self, coro, timeout: float | None = _CONTROL_TIMEOUT_S):
        if not self._loop.alive:
            coro.close()
            raise EngineError("the vllm engine is closed")
        return self._loop.run(coro, timeout)

    async def _locked(self, fn, *args):
        """`await fn(*args)`, one such call at a time (updates, sleep and wake pause and resume vLLM)."""
        async with self._control:
            return await fn(*args)

    async def _abort_inflight(self) -> None:
        await self.transport.abort([rid for rid, epoch in self._inflight.items() if epoch < self._abort_epoch])

    async def _apply(self, path: str, version: int) -> None:
        if self._asleep:
            if self._pending is not None and self._pending[0] != path:
                weights.discard(self._pending[0])
            self._pending = (path, version)
            return
        t0 = time.perf_counter()
        await self.transport.pause()
        try:
            await asyncio.sleep(_DRAIN_S)
            await self.transport.reload_weights(path)
            await self.transport.reset_prefix_cache(running=True)
            self._now_holding(path, version)
        finally:
            await self.transport.resume()
        self._count_update(time.perf_counter() - t0)

    async def _apply_nccl(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        if self._asleep:
            raise EngineError("weight_sync='nccl' cannot update a sleeping engine (its GPU memory is released); "
                              "wake() it first")
        tensors = {k: (t if t.is_cuda else t.cuda()) for k, t in weights.unique_tensors(state_dict).items()}
        t0 = time.perf_counter()
        await self.transport.pause()
        try:
            await asyncio.sleep(_DRAIN_S)
            await self.transport.nccl_update(tensors, self.opts.nccl_master_address, self.opts.nccl_master_port)
            await self.transport.reset_prefix_cache(running=True)
            self.weight_version = version
        finally:
            await self.transport.resume()
        self._count_update(time.perf_counter() - t0)

    async def _wake(self) -> None:
        if not self._asleep:
            return
        if self._pending is None and self._asleep < 2:
            await self.transport.wake(None)
            return
        path, version = self._pending or (self._current or self.model_path, self.weight_version)
        await self.transport.wake(["weights"])
        await self.transport.reload_weights(path)
        await self.transport.wake(["kv_cache"])
        await self.transport.reset_prefix_cache(running=False)
        self._pending = None
        self._now_holding(path, version)

    def _now_holding(self, path: str, version: int) -> None:
        """`path` now holds the engine's weights as `version`; the previous staged copy is dropped."""
        if self._current != path:
            weights.discard(self._current)
        self._current = path if path != self.model_path else None
        self.weight_version = version

    def _resync(self) -> None:
        """A launched server restarted with the model's original weights: give it the current ones."""
        if self._current is not None:
            self.transport.resync(self._current)

    def _validate(self, prompt: list[int], sampling: SamplingParams) -> None:
        check_prompt(prompt, self.max_model_len, self.vocab_size)
        validate(sampling)
        check_logprob_contract(sampling, self.opts.logprobs_mode)

    def _count_update(self, seconds: float) -> None:
        self.stats.extra["weight_updates"] = self.stats.extra.get("weight_updates", 0.0) + 1
        self.stats.extra["weight_update_seconds"] = self.stats.extra.get("weight_update_seconds", 0.0) + seconds

    def _update_extra(self) -> None:
        self.stats.extra.update(cached_prompt_tokens=float(self._cached_prompt_tokens),
                                prefix_cache_hit_rate=self._cached_prompt_tokens / max(1, self.stats.prompt_tokens))


def _vocab_size(path: str) -> int | None:
    """The model's vocabulary size from its config (None when `path` is not a readable model directory)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    text = getattr(config, "get_text_config", lambda: config)()
    return getattr(text, "vocab_size", None)
