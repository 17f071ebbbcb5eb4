"""The SGLang backend's front: agentrl's `Engine` contract on SGLang 0.5.17, in-process or over HTTP.

Modes, by `server` (a `ServerSpec`): neither url nor launch runs `sglang.Engine` in this process
(`InProcessTransport`); `launch` starts `python -m sglang.launch_server` under a `ManagedServer`
and `url` connects to a running server (`HttpTransport`). Token ids in and out: the engine starts
with `skip_tokenizer_init`.

How each part of the contract is met (details in docs/backends.md):

- Logprobs: SGLang reports `log_softmax(logits / T)` of the sampled token before truncation, which
  is agentrl's contract (see `protocol.py` for where in its sampler; the one environment variable
  that changes it is refused).
- Seeds: SGLang honours per-request seeds only with `enable_deterministic_inference`, which is on
  by default here (it also makes results independent of what shares a batch, given that every
  untruncated request is sent through SGLang's sorted sampler: `protocol.sampling_params`). Unseeded requests
  get a fresh random seed; without deterministic mode a seeded request is refused unless
  `allow_unseeded=True`.
- Stop tokens: SGLang also stops at the model's own EOS ids; a response that stops at one the
  request did not list is continued from where it stopped (same seed, same positions, so the same
  tokens as one uninterrupted response; the prefix is served from SGLang's radix cache).
- Stop strings: matched here on the streamed tokens with the model's tokenizer (the engine has
  none); the request is aborted at the first match and cut after the token that completes it.
- Abort: `abort()` aborts every request in flight in SGLang and ends the ones still on their way;
  each returns its partial tokens and logprobs with finish reason `abort`.
- Prefix reuse: SGLang's radix cache reuses earlier turns by itself (`prompt_cached_tokens` is its
  `cached_tokens`; `stats.extra` keeps the hit rate). Copies of one prompt that arrive together
  would be prefilled side by side and share nothing, so the first goes ahead and the others are sent
  once its first token is out (its prompt is in the cache then); `share_identical_prefills=False`
  turns that off.
- Weights: in-process from tensors (`update_weights_from_tensor`); to a server through a
  safetensors folder and `update_weights_from_disk` (a server in another process cannot take this
  process's tensors without CUDA IPC); both flush the radix cache. A restarted server gets the
  current weights again. The NCCL path is `init_weights_group` + `update_weights_distributed`.
- Sleep / wake: `release_memory_occupation` / `resume_memory_occupation`, which free memory only
  when SGLang started with `enable_memory_saver=True` (the torch-memory-saver package); without it
  `sleep()` is refused rather than pretending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.managed import ManagedServer, ServerSpec
from agentrl.rollout.backends.sglang import protocol as P
from agentrl.rollout.backends.sglang.transport import HttpTransport, InProcessTransport
from agentrl.rollout.backends.sglang.weights import WeightFolder, run_alongside, tensors_for_engine
from agentrl.rollout.engine import EngineStats, Generation, SamplingParams, check_prompt, load_tokenizer_or_none

logger = logging.getLogger(__name__)

_DRAIN_S = 60.0  # how long sleep() waits for aborted requests to return


def _sglang_engine(**kwargs):
    try:
        import sglang
    except ImportError as exc:
        raise EngineError(f"the sglang backend needs the sglang package ({exc}): "
                          "pip install 'agentrl[sglang]'") from exc
    return sglang.Engine(**kwargs)


class SGLangEngine:
    """agentrl's `Engine` on SGLang 0.5.17.

    Args:
        model_path: A Hugging Face model directory SGLang can load (config.json + safetensors).
        device: `cuda`, `cuda:N` (SGLang's `base_gpu_id`) or `cpu` (SGLang's CPU build).
        dtype: Weights dtype (torch.bfloat16, torch.float16, torch.float32, or their names).
        max_model_len: Longest prompt + response (SGLang's `context_length`).
        server: Where SGLang runs (`ServerSpec`); None or neither url nor launch: in this process.
        seed: SGLang's `random_seed`.
        allow_unseeded: Without deterministic inference, sample seeded requests without their seed
            instead of refusing them.
        share_identical_prefills: Send the first of identical concurrent prompts ahead (see above).
        weights_dir: Where weights for a server are written (kept); default: a `sglang-weights-*`
            folder in the server's log folder (the run directory's `servers/` under the driver), else
            in the temporary folder, deleted by `close()` either way.
        request_timeout_s: Bound on one HTTP request to a server.
        tokenizer: For stop strings; default: loaded from `model_path` when first needed.
        engine_factory: What builds the in-process engine from its keyword arguments (default
            `sglang.Engine`).
        **options: Further SGLang engine arguments (`ServerArgs` fields, e.g. mem_fraction_static,
            attention_backend, enable_memory_saver); for a launched server they become its flags.

    Example:
        >>> engine = SGLangEngine("runs/model", mem_fraction_static=0.5)   # doctest: +SKIP
        >>> gen = await engine.generate([1, 2, 3], SamplingParams(max_tokens=8))   # doctest: +SKIP
    """

    def __init__(self, model_path: str, *, device: str = "cuda", dtype: torch.dtype | str = torch.bfloat16,
                 max_model_len: int = 4096, server: ServerSpec | None = None, seed: int = 0,
                 allow_unseeded: bool = False, share_identical_prefills: bool = True, weights_dir: str | None = None,
                 request_timeout_s: float = 3600.0, tokenizer=None,
                 engine_factory: Callable[..., Any] | None = None, **options):
        spec = server if server is not None else ServerSpec()
        P.check_environment({**os.environ, **spec.env})
        self._vocab_size, positions = _model_limits(str(model_path))
        if positions is not None and max_model_len > positions:
            # SGLang refuses a context_length above the model's (its rotary tables end there); the
            # built-in engine's callers ask for more freely, so the longest response is cut there.
            logger.info("sglang: max_model_len %d is beyond the model's %d positions; using %d",
                        max_model_len, positions, positions)
            max_model_len = positions
        args = P.engine_arguments(model_path, dtype=dtype, max_model_len=max_model_len, device=device, seed=seed,
                                  options=options)
        self.model_path, self.max_model_len, self.mode = str(model_path), int(max_model_len), spec.mode
        self.deterministic = bool(args.get("enable_deterministic_inference"))
        self.memory_saver = bool(args.get("enable_memory_saver"))
        self.weights_cpu_backup = bool(args.get("enable_weights_cpu_backup"))
        self.allow_unseeded, self.share_identical_prefills = allow_unseeded, share_identical_prefills
        self.weight_version = 0
        self.stats = EngineStats()
        self._counts = {"cached_prompt_tokens": 0, "gated_requests": 0, "eos_continuations": 0, "stop_string_cuts": 0}
        self._tokenizer, self._tokenizer_tried = tokenizer, tokenizer is not None
        self._rng = random.Random()  # seeds for unseeded requests: fresh each run
        self._abort_epoch = 0
        self._asleep = False
        self._slept_level = 1
        self._in_flight = 0
        self._idle = threading.Condition()
        self._prefilling: dict[tuple[int, ...], asyncio.Event] = {}  # prompt -> its leader's first-token event
        self._busy_since = 0.0
        self._serving = 0  # requests inside _serve (touched on the transport's loop thread only)
        self._weights = WeightFolder(weights_dir, self.model_path, default_parent=spec.log_dir)
        if spec.mode == "in_process":
            self._transport = InProcessTransport(engine_factory or _sglang_engine, args)
        else:
            self._server = ManagedServer("sglang", P.server_command(args, python=sys.executable), spec,
                                         on_restart=self._resync)
            self._server.start()
            self._transport = HttpTransport(self._server, request_timeout_s)
            if spec.mode == "url":
                self._adopt(self._transport.server_info())
        self._finalizer = weakref.finalize(self, self._transport.close)

    # -- the Engine contract -------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Generation:
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, sampling)
        if self._asleep:
            raise EngineError("the engine is asleep (sleep() was called); call wake() before generate()")
        if sampling.max_tokens == 0:
            return Generation((), (), "length", self.weight_version)
        with self._idle:
            self._in_flight += 1
        try:
            fut = self._transport.loop.submit(self._serve(prompt, sampling, self._abort_epoch))
            try:
                return await asyncio.wrap_future(fut)
            except asyncio.CancelledError:
                fut.cancel()  # the request is aborted in SGLang (transport.stream's cleanup)
                raise
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """New weights into SGLang (which waits for requests in flight, then flushes its radix cache)."""
        if isinstance(self._transport, InProcessTransport):
            self._transport.update_from_tensors(tensors_for_engine(state_dict), version)
        else:
            path = self._weights.write(state_dict, version)
            self._transport.update_from_disk(path, version)
            self._weights.keep_only(path)
        self.weight_version = version

    def update_weights_from_disk(self, path: str, version: int) -> None:
        """Load a checkpoint folder (config + safetensors) the engine can read into SGLang."""
        self._transport.update_from_disk(str(path), version)
        self.weight_version = version

    def reset_prefix_cache(self) -> None:
        """Empty SGLang's radix cache (refused by SGLang while requests run)."""
        self._transport.flush_cache()

    def sleep(self, level: int = 1) -> None:
        """Abort requests in flight and free accelerator memory: level 1 the KV cache and CUDA graph
        buffers, level 2 the weights too (kept in host memory: needs `enable_weights_cpu_backup`)."""
        if not self.memory_saver:
            raise EngineError("sleep() frees memory only when SGLang runs with enable_memory_saver=True (needs the "
                              "torch-memory-saver package); pass it in the engine options, or do not colocate")
        if level >= 2 and not self.weights_cpu_backup:
            raise EngineError("sleep(level=2) releases the weights, and SGLang brings them back only with "
                              "enable_weights_cpu_backup=True; pass it in the engine options, or use level 1")
        self._asleep = True
        self.abort()
        with self._idle:  # SGLang refuses to release memory while it still has requests
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=_DRAIN_S):
                raise EngineError(f"{self._in_flight} requests did not return within {_DRAIN_S:g} s of abort()")
        self._transport.release(self._tags(level))
        self._slept_level = level

    def wake(self) -> None:
        if self._asleep:
            self._transport.resume(self._tags(self._slept_level))
        self._asleep = False

    def abort(self) -> None:
        """End every request in flight; each returns its partial output (finish reason `abort`)."""
        self._abort_epoch += 1
        self._transport.abort(None)

    def close(self) -> None:
        """Abort what is in flight and stop SGLang (its subprocesses, or the launched server)."""
        if self._finalizer.alive:
            with contextlib.suppress(EngineError):
                self.abort()
        self._finalizer()
        self._weights.cleanup()

    # -- the NCCL path (trainer broadcasts, engine receives) -------------------------------------
    def init_weights_group(self, master_address: str, master_port: int, world_size: int, *, rank_offset: int = 1,
                           group_name: str = "agentrl-weights", backend: str = "nccl",
                           join: Callable[[], Any] | None = None) -> Any:
        """Have SGLang's ranks join a process group with the trainer (rank 0, `weights_group`).

        Both sides must rendezvous at once: `join` (e.g. `lambda: weights_group(addr, port, world)`)
        runs here while SGLang joins, and its result is returned. Written from SGLang 0.5.17's source;
        not run on this project's hardware (docs/backends.md).
        """
        fields = dict(master_address=master_address, master_port=int(master_port), rank_offset=int(rank_offset),
                      world_size=int(world_size), group_name=group_name, backend=backend)
        return run_alongside(lambda: self._transport.init_weights_group(**fields), join)

    def update_weights_distributed(self, named_shapes: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                                   version: int, broadcast: Callable[[], Any], *,
                                   group_name: str = "agentrl-weights", timeout_s: float = 600.0) -> None:
        """SGLang receives `named_shapes` from rank 0 of the group while `broadcast()` sends them (in
        that order), then loads them and flushes its cache. Not run on this project's hardware."""
        names = [n for n, _, _ in named_shapes]
        dtypes = [str(d).removeprefix("torch.") for _, d, _ in named_shapes]
        shapes = [list(s) for _, _, s in named_shapes]
        wait = self._transport.start_distributed_update(names, dtypes, shapes, group_name, version)
        broadcast()
        wait(timeout_s)
        self.weight_version = version

    # -- serving one request (on the transport's event loop) -------------------------------------
    async def _serve(self, prompt: list[int], s: SamplingParams, epoch: int) -> Generation:
        key = tuple(prompt) if self.share_identical_prefills else None
        leader = self._prefilling.get(key) if key is not None else None
        if leader is not None:  # the same prompt is being prefilled: wait for its KV to be in the cache
            self._counts["gated_requests"] += 1
            await leader.wait()
        if self._abort_epoch != epoch:
            return Generation((), (), "abort", self.weight_version)
        own = None
        if key is not None and key not in self._prefilling:
            own = self._prefilling[key] = asyncio.Event()

        def opened() -> None:
            if own is not None and not own.is_set():
                if self._prefilling.get(key) is own:
                    del self._prefilling[key]
                own.set()

        if not self._serving:
            self._busy_since = time.perf_counter()
        self._serving += 1
        try:
            return await self._respond(prompt, s, epoch, opened)
        finally:
            opened()
            self._serving -= 1
            if not self._serving:  # wall time with a request in SGLang, like the built-in engine's busy time
                self.stats.generate_seconds += time.perf_counter() - self._busy_since

    async def _respond(self, prompt: list[int], s: SamplingParams, epoch: int,
                       opened: Callable[[], None]) -> Generation:
        """Stream the request; continue past EOS ids it did not ask for; cut at stop strings."""
        seed = P.resolve_seed(s.seed, deterministic=self.deterministic, allow_unseeded=self.allow_unseeded,
                              rng=self._rng)
        scanner = P.StopStringScanner(self._stop_tokenizer(), s.stop) if s.stop else None
        interval = P.STOP_STRING_STREAM_INTERVAL if scanner else P.STREAM_INTERVAL
        budget = max(1, min(s.max_tokens, self.max_model_len - len(prompt)))
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        cached, counted = None, 0
        while True:
            params = P.sampling_params(s, max_new_tokens=budget - len(tokens), sampling_seed=seed,
                                       deterministic=self.deterministic, stream_interval=interval)
            piece, last, cut = P.Progress([], []), None, None
            request = P.generate_request(prompt + tokens, params, uuid.uuid4().hex)
            async with contextlib.aclosing(self._transport.stream(request)) as outs:
                async for out in outs:
                    last = P.parse_chunk(out)
                    added = piece.add(last)
                    counted += added
                    self.stats.generated_tokens += added  # progress is visible while a request runs
                    if cached is None and last.cached_tokens is not None:
                        cached = last.cached_tokens
                    opened()
                    if scanner is not None:
                        cut = scanner.find(tokens + piece.token_ids)
                    if cut is not None or self._abort_epoch != epoch:
                        break  # leaving the stream aborts the request in SGLang
            version = P.weight_version_number(last.weight_version if last else None, self.weight_version)
            tokens += piece.token_ids
            logprobs += piece.logprobs
            versions += [version] * len(piece.token_ids)
            if cut is not None:
                self._counts["stop_string_cuts"] += 1
                del tokens[cut:], logprobs[cut:], versions[cut:]
                finish = "stop"
                break
            if self._abort_epoch != epoch:
                finish = "abort"
                break
            if last is None or last.finish is None:
                raise EngineError("SGLang's stream for a request ended without a finish reason")
            finish = P.finish_kind(last.finish, s.stop_token_ids)
            if finish != "continue":
                break
            if len(tokens) >= budget:
                finish = "length"
                break
            self._counts["eos_continuations"] += 1
        if len(logprobs) != len(tokens):
            raise EngineError(f"SGLang returned {len(tokens)} tokens but {len(logprobs)} logprobs")
        self._account(len(prompt), cached or 0, len(tokens) - counted)
        first = versions[0] if versions else self.weight_version
        per_token = tuple(versions) if any(v != first for v in versions) else ()
        return Generation(tuple(tokens), tuple(logprobs), finish, first, cached or 0, per_token)

    # -- helpers --------------------------------------------------------------------------------
    def _account(self, prompt_len: int, cached: int, correction: int) -> None:
        self.stats.requests += 1
        self.stats.prompt_tokens += prompt_len
        self.stats.generated_tokens += correction  # tokens streamed past a stop string are not kept
        self._counts["cached_prompt_tokens"] += cached
        hit_rate = self._counts["cached_prompt_tokens"] / max(1, self.stats.prompt_tokens)
        self.stats.extra.update({k: float(v) for k, v in self._counts.items()}, prefix_cache_hit_rate=hit_rate)

    def _validate(self, prompt: list[int], s: SamplingParams) -> None:
        check_prompt(prompt, self.max_model_len, self._vocab_size)
        P.sampling_params(s, max_new_tokens=1, sampling_seed=None, deterministic=self.deterministic)  # refuse early
        P.resolve_seed(s.seed, deterministic=self.deterministic, allow_unseeded=self.allow_unseeded, rng=self._rng)

    def _stop_tokenizer(self):
        if not self._tokenizer_tried:
            self._tokenizer_tried = True
            self._tokenizer = load_tokenizer_or_none(self.model_path)
        return self._tokenizer

    @staticmethod
    def _tags(level: int) -> list[str]:
        return ["kv_cache", "cuda_graph"] + (["weights"] if level >= 2 else [])

    def _adopt(self, info: Mapping[str, Any]) -> None:
        """A server agentrl did not start: take its settings (they decide seeds, sleep and versions)."""
        self.deterministic = bool(info.get("enable_deterministic_inference", self.deterministic))
        self.memory_saver = bool(info.get("enable_memory_saver", self.memory_saver))
        self.weights_cpu_backup = bool(info.get("enable_weights_cpu_backup", self.weights_cpu_backup))
        self.max_model_len = int(info.get("context_length") or self.max_model_len)
        self.weight_version = P.weight_version_number(info.get("weight_version"), 0)

    def _resync(self) -> None:
        """After a launched server restarted: it loaded the weights on disk at `model_path`; give it
        ours, and put it to sleep again if the engine is asleep (so that wake() finds it released)."""
        path = self._weights.current
        if path is not None:
            self._transport.update_from_disk(path, self.weight_version)
        if self._asleep:
            self._transport.release(self._tags(self._slept_level))


def _model_limits(model_path: str) -> tuple[int | None, int | None]:
    """(vocabulary size, max positions) from the model's config; positions only without rope
    scaling (SGLang derives a longer context then); Nones when the path is not readable here."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None, None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None)
    positions = None if scaled else getattr(text, "max_position_embeddings", None)
    return getattr(text, "vocab_size", None), positions
