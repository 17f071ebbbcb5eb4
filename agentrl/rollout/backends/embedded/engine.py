"""The built-in PyTorch engine: continuous batching over a paged KV cache, on CPU or GPU.

It runs wherever SGLang and vLLM are not installed (CPU, tests, laptops) and is the baseline the
other backends are held to. The parts, each in its own module:

- `kv_cache.py`: the block pool, reference counts and the prefix cache of full blocks;
- `sequences.py` + `scheduler.py`: what a step is made of (a request's state, its chunk, the plan), and
  continuous batching under the KV budget (admission, preemption, shared prefixes, speculative steps);
- `step_inputs.py` + `model_runner.py` + `attention.py`: one forward pass over a flat batch of
  decode tokens and prefill chunks, writing and reading the paged cache;
- `architectures.py` + `model_weights.py` + `layer_ops.py`: the table of model families the
  forward pass implements (anything else is refused at load), their weights, their layers' parts;
- `sampling.py`: batched sampling with per-row parameters, logprobs in float32;
- `device_steps.py`: launching a step on the device, the speculative next step, reading tokens back;
- `sizing.py`: the defaults that depend on the device (KV-cache budget, tokens per step).

This module is the front: `generate` is a coroutine that hands the request to one background
thread, which runs model steps back to back while any request is in flight (requests join and
leave at every step) and resolves each request's future on its own event loop. The thread exits
when idle, so nothing lingers between `asyncio.run` calls, and tools keep running on the event
loop while the model computes.

Async steps (default on CUDA): after launching step t the thread launches step t+1 at once
(`Scheduler.speculate`: every sequence decodes one more token, fed on the device from step t's
sampled ids; long prompts go on with their next chunk and waiting requests are admitted) and only
then waits for step t's tokens, so stop checks, bookkeeping and the next launch run on the host
while the device computes. A row launched for a sequence that turned out to stop at step t is
dropped; seeded outputs are the same as one step at a time.

Partial rollouts: `abort()` ends every request in flight at the next step boundary; each returns
what it has (`finish_reason="abort"`, its tokens and logprobs). `update_weights()` copies new
weights in place between two steps and empties the prefix cache (its KV is stale); sequences in
flight go on with the new weights, and `EmbeddedGeneration.token_weight_versions` records which
version sampled each token. `sleep()` aborts what is in flight and frees the KV cache (level 2
also moves the weights to host memory on an accelerator); `generate()` while asleep raises
`EngineError` rather than silently retaking memory the trainer may be using; `wake()` undoes it.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded.architectures import check_model_type, resolve_architecture
from agentrl.rollout.backends.embedded.cuda_graphs import DecodeGraphs
from agentrl.rollout.backends.embedded.device_steps import DeviceSteps, InFlight
from agentrl.rollout.backends.embedded.kv_cache import BlockAllocator, PagedKVCache
from agentrl.rollout.backends.embedded.model_runner import ModelRunner
from agentrl.rollout.backends.embedded.sampling import StopStrings, validate
from agentrl.rollout.backends.embedded.scheduler import Scheduler
from agentrl.rollout.backends.embedded.sequences import Sequence as Seq
from agentrl.rollout.backends.embedded.sizing import default_kv_tokens, default_step_tokens, kv_bytes_per_token
from agentrl.rollout.engine import EngineStats, Generation, SamplingParams, check_prompt, load_tokenizer_or_none

# Engines whose thread ran; at exit each is closed, so no engine thread is still unwinding (and
# freeing tensors) while the interpreter finalizes, which aborts the process ("terminate called
# without an active exception", exit 134) after a run that had finished.
_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.abort()
        engine._join(timeout=10.0)


@dataclass(frozen=True)
class EmbeddedGeneration(Generation):
    """A `Generation` of this engine: `token_weight_versions` is always filled (they differ across an update)."""


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sampling: SamplingParams
    future: asyncio.Future
    stop_check: StopStrings | None
    epoch: int = 0
    cancelled: bool = False


def _resolve(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        (fut.set_exception if isinstance(value, BaseException) else fut.set_result)(value)


class EmbeddedEngine:
    """A pure-PyTorch engine with continuous batching and a paged, prefix-shared KV cache.

    Args:
        model: A path to a Hugging Face causal LM directory, or a loaded model, of a family in the
            architecture table (`architectures.py`, docs/architectures.md); any other architecture
            or config option the engine does not implement raises `EngineError` here, at load.
        device: Where to run (`cpu`, `cuda`).
        dtype: Weights dtype (float32 on CPU keeps logprobs exact).
        max_batch_size: Most sequences running at once.
        max_model_len: Longest prompt + response accepted.
        block_size: Tokens per KV block (the unit of sharing and of allocation).
        kv_cache_tokens: KV budget in tokens; default: 256 MiB worth on CPU, half the free memory on CUDA.
        max_step_tokens: Most tokens one step computes (long prompts are prefilled in chunks);
            default 16,384 on CUDA (on an H200 it beat 4,096 at every prompt length measured, 256 to
            32k tokens: +8% to +22% new tokens/s; docs/benchmarks.md), 4,096 on CPU.
        enable_prefix_caching: Share and reuse KV blocks of common prefixes (GRPO groups, later turns).
        tokenizer: For stop strings; loaded from `model` when it is a path.
        cuda_graphs: On CUDA, replay decode-only steps from CUDA graphs captured per batch-size
            bucket (see `cuda_graphs.py`; captured lazily, dropped by `sleep`). Ignored on CPU, and
            for families with layers outside the kernels (sliding window, soft-cap, MoE).
        async_steps: Launch decode step t+1 before step t's tokens reach the host, so the host's
            bookkeeping overlaps the device's compute (default: on for CUDA; on CPU the host is
            the device and it gains nothing). Outputs are the same either way for seeded requests.
        async_prefill: With async steps, the speculative step t+1 also carries what needs no token
            of step t: the next chunks of long prompts, and new requests' prefills (default: on
            with async steps). Off, a step that prefills waits for the step before it to be read
            back, leaving the device idle for the host's bookkeeping between chunks.
        admit_wait_steps: While every running sequence decodes, hold new requests back up to this
            many steps so they are prefilled together (`Scheduler`); default 8 when decode steps
            replay CUDA graphs, else 0. Seeded outputs do not depend on it.

    Example:
        >>> engine = EmbeddedEngine("runs/tiny-model")                            # doctest: +SKIP
        >>> gen = await engine.generate([1, 2, 3], SamplingParams(max_tokens=8))   # doctest: +SKIP
    """

    def __init__(self, model, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch_size: int = 256, max_model_len: int = 4096, *, block_size: int = 16,
                 kv_cache_tokens: int | None = None, max_step_tokens: int | None = None,
                 enable_prefix_caching: bool = True, tokenizer=None, cuda_graphs: bool = True,
                 async_steps: bool | None = None, async_prefill: bool | None = None,
                 admit_wait_steps: int | None = None):
        if isinstance(model, str):
            from transformers import AutoConfig, AutoModelForCausalLM

            check_model_type(AutoConfig.from_pretrained(model))  # refuse before reading any weight
            path, model = model, AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer_or_none(path)
        resolve_architecture(model, max_model_len)  # refuse before taking any accelerator memory
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # pin "cuda" to the GPU it means now
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        step_tokens = default_step_tokens(self.device) if max_step_tokens is None else max_step_tokens
        self.max_step_tokens = max(step_tokens, max_batch_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.async_steps = self.device.type == "cuda" if async_steps is None else async_steps
        self.async_prefill = self.async_steps if async_prefill is None else async_prefill
        self.runner = ModelRunner(self.model, max_model_len)
        # Families whose layers need the torch attention path or MoE routing replay no graphs (model_runner.py).
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.runner.graph_safe
        self.admit_wait_steps = (8 if self.cuda_graphs else 0) if admit_wait_steps is None else admit_wait_steps
        self.vocab_size = self.runner.embed.shape[0]
        self.kv_cache_tokens = kv_cache_tokens or default_kv_tokens(self.runner, self.device, max_model_len,
                                                                    max_batch_size)
        self._kv_tokens_per_gib = 2**30 // kv_bytes_per_token(self.runner)  # fixed for the engine: reported each step
        self.weight_version = 0
        self.stats = EngineStats()
        self._steps = DeviceSteps(self.runner, block_size, max_batch_size, self.cuda_graphs)
        self._sched = self._new_scheduler()
        self._lock = threading.Lock()  # held by a model step; weight updates and sleep wait for it
        self._cv = threading.Condition()  # guards the inbox, the abort epoch, the thread handle, sleep state
        self._inbox: list[_Request] = []  # requests the engine thread takes at its next step
        self._staged: list[_Request] = []  # submitted in the current event-loop iteration
        self._flush_scheduled = False
        self._abort_epoch = 0
        self._thread: threading.Thread | None = None
        self._last_thread: threading.Thread | None = None  # kept after `_run` returns, for `_join`
        self._asleep = 0
        self._cancels = 0  # generate() calls cancelled so far (the engine thread drops them)
        self._seen = (0, 0)  # (abort epoch, cancels) the engine thread has already acted on
        self._cached_prompt_tokens = 0
        self._pending: InFlight | None = None  # a launched step not yet finished on the host

    @property
    def _cache(self) -> PagedKVCache | None:
        return self._steps.cache

    @property
    def _graphs(self) -> DecodeGraphs | None:
        return self._steps.graphs

    # -- the Engine contract -----------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Generation:
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, sampling)
        stop_check = StopStrings(self.tokenizer, sampling.stop) if sampling.stop else None
        if sampling.max_tokens == 0:
            return EmbeddedGeneration((), (), "length", self.weight_version)
        loop = asyncio.get_running_loop()
        req = _Request(prompt, sampling, loop.create_future(), stop_check)
        with self._cv:
            if self._asleep:
                raise EngineError("the engine is asleep (sleep() was called); call wake() before generate()")
            req.epoch = self._abort_epoch
            self._staged.append(req)
            flush, self._flush_scheduled = not self._flush_scheduled, True
        if flush:  # after every coroutine ready now has submitted too, so a burst reaches the engine at once
            loop.call_soon(self._flush)
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True  # the engine drops it at the next step
            self._cancels += 1
            raise

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy new weights in place between two steps and drop the (now stale) prefix cache."""
        with self._lock, torch.no_grad():
            missing, unexpected = self.model.load_state_dict(dict(state_dict), strict=False)
            if unexpected or [k for k in missing if "rotary" not in k]:
                raise EngineError(f"weights do not match the engine's model: missing={missing[:5]} "
                                  f"unexpected={unexpected[:5]}")
            self.weight_version = version
            self._sched.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (between steps); later requests prefill from scratch."""
        with self._lock:
            self._sched.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Abort requests in flight and free the KV cache; level 2 also moves weights to host memory."""
        with self._cv:
            self._asleep = level
        self.abort()
        self._join()
        with self._lock:
            self._steps.release()
            self._sched = self._new_scheduler()
            if level >= 2 and self.device.type != "cpu":
                self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Undo `sleep`: weights back on the device; the KV cache is re-allocated by the next step."""
        with self._lock:
            if self._asleep >= 2 and self.device.type != "cpu":
                self.model.to(self.device)
                self.runner.bind()
        with self._cv:
            self._asleep = 0

    def abort(self) -> None:
        """End every request in flight at the next step; each returns its partial output (`abort`)."""
        with self._cv:
            self._abort_epoch += 1

    # -- requests ------------------------------------------------------------------------------
    def _validate(self, prompt: list[int], sampling: SamplingParams) -> None:
        check_prompt(prompt, self.max_model_len, self.vocab_size)
        validate(sampling)

    def _sequence(self, req: _Request) -> Seq:
        s = req.sampling
        room = min(self.max_model_len, (self._sched.alloc.capacity) * self.block_size) - len(req.prompt)
        return Seq(seq_id=id(req), tokens=list(req.prompt), max_new=max(1, min(s.max_tokens, room)),
                   stop_token_ids=frozenset(s.stop_token_ids), stop_check=req.stop_check, payload=req)

    def _account(self, seqs: list[Seq]) -> None:
        for seq in seqs:
            self.stats.requests += 1
            self.stats.prompt_tokens += seq.prompt_len
            self._cached_prompt_tokens += max(seq.cached_tokens, 0)

    def _deliver(self, seqs: list[Seq]) -> None:
        """Resolve the finished requests' futures (after the stats are up to date: callers read them)."""
        for seq in seqs:
            req: _Request = seq.payload
            gen = EmbeddedGeneration(tuple(seq.output), tuple(seq.logprobs), seq.finish_reason,
                                     seq.versions[0] if seq.versions else self.weight_version,
                                     max(seq.cached_tokens, 0), tuple(seq.versions))
            self._post(req, gen)

    @staticmethod
    def _post(req: _Request, value: object) -> None:
        try:
            req.future.get_loop().call_soon_threadsafe(_resolve, req.future, value)
        except RuntimeError:  # its event loop is gone; nobody is waiting
            pass

    # -- the engine thread ---------------------------------------------------------------------
    def _flush(self) -> None:
        with self._cv:
            self._inbox += self._staged
            self._staged, self._flush_scheduled = [], False
            if self._thread is None and self._inbox:
                self._thread = threading.Thread(target=self._run, name="agentrl-embedded-engine", daemon=True)
                self._last_thread = self._thread
                _LIVE_ENGINES.add(self)
                self._thread.start()

    def _join(self, timeout: float | None = None) -> None:
        """Wait until the engine thread has exited (not only said it will: `_run` clears `_thread`
        just before returning, and a thread still unwinding at interpreter exit aborts the process)."""
        with self._cv:
            thread = self._last_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close(self) -> None:
        """Abort what is in flight and wait for the engine thread to exit; the engine serves again on
        the next `generate`. Call it before the process exits (the driver does)."""
        self.abort()
        self._join()

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                # The current device is per thread: Triton kernels and graph captures use it, and a process
                # may hold the engine on another GPU than its trainer (rollout.device).
                torch.cuda.set_device(self.device)
        except Exception as exc:  # this thread cannot serve: fail what waits instead of leaving it waiting
            with self._cv:
                new, self._inbox = self._inbox, []
                self._thread = None
                self._cv.notify_all()
            err = EngineError(f"the engine thread cannot use {self.device}: {type(exc).__name__}: {exc}")
            for req in new:
                self._post(req, err)
            self._fail_all(err)
            return
        while True:
            with self._cv:
                new, self._inbox = self._inbox, []
                epoch = self._abort_epoch
                if not new and not self._sched.has_work and self._pending is None:
                    self._thread = None
                    self._cv.notify_all()
                    return
            try:
                self._step(new, epoch)
            except Exception as exc:  # a failed step fails its requests, not the engine
                self._fail_all(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _step(self, new: list[_Request], epoch: int) -> None:
        """One step: launch the scheduled (or already launched) step, maybe launch the next, finish the first."""
        with self._lock:
            t0 = time.perf_counter()
            for req in new:
                try:
                    self._sched.add(self._sequence(req))
                except EngineError as exc:
                    self._post(req, exc)
            done = self._abort_stale(new, epoch)
            steps, sched = self._steps, self._sched
            if self._pending is None and sched.has_work:
                steps.allocate(sched.alloc.num_blocks, sched.block_table.shape[1])
                plan = sched.schedule()
                if not plan.chunks:
                    raise EngineError("the scheduler found nothing to run while requests wait (scheduler bug)")
                self._pending = steps.launch(plan, sched, self.weight_version)
                self.stats.batches += plan.admitted > 0
            if self._pending is not None:
                current, self._pending = self._pending, None
                if self.async_steps and self._abort_seen():  # runs on the device while the host finishes `current`
                    self._pending = steps.speculate(current, sched, self.weight_version)
                    if self._pending is not None:
                        self.stats.batches += self._pending.plan.admitted > 0
                finished, kept = steps.complete(current, sched)
                self.stats.generated_tokens += kept
                done += finished
            self._account(done)
            self.stats.generate_seconds += time.perf_counter() - t0
            self._update_extra()
            self._deliver(done)

    def _abort_seen(self) -> bool:
        """True if no abort() or cancellation arrived that the engine thread has not acted on yet."""
        with self._cv:
            return self._seen == (self._abort_epoch, self._cancels)

    def _abort_stale(self, new: list[_Request], epoch: int) -> list[Seq]:
        """Abort what `abort()` or a cancellation ended; skips the scan of running sequences otherwise."""
        seen, self._seen = self._seen, (epoch, self._cancels)
        if seen == self._seen and all(r.epoch == epoch for r in new):
            return []
        return self._sched.abort_where(lambda s: s.payload.epoch < epoch or s.payload.cancelled)

    def _fail_all(self, exc: EngineError) -> None:
        with self._lock:
            seqs = [*self._sched.running, *self._sched.waiting]
            self._sched = self._new_scheduler()
            self._pending = None
        for seq in seqs:
            self._post(seq.payload, exc)

    # -- sizing and metrics --------------------------------------------------------------------
    def _new_scheduler(self) -> Scheduler:
        blocks = -(-self.kv_cache_tokens // self.block_size) + 1  # + the reserved null block
        alloc = BlockAllocator(blocks, self.block_size, self.enable_prefix_caching)
        return Scheduler(alloc, self.max_batch_size, self.max_step_tokens, self.max_model_len, self.admit_wait_steps,
                         prefill_speculation=self.async_prefill)

    def _update_extra(self) -> None:
        s, graphs = self._sched, self._steps.graphs
        self.stats.extra.update(
            **{k: float(v) for k, v in self._steps.counts.items()},
            graph_capture_seconds=graphs.capture_seconds if graphs is not None else 0.0,
            cached_prompt_tokens=float(self._cached_prompt_tokens),
            prefix_cache_hit_rate=self._cached_prompt_tokens / max(1, self.stats.prompt_tokens),
            kv_blocks=float(s.alloc.capacity), kv_block_size=float(self.block_size),
            kv_tokens_per_gib=float(self._kv_tokens_per_gib),
            kv_blocks_peak=float(max(s.alloc.peak_used, self.stats.extra.get("kv_blocks_peak", 0.0))),
            **{k: float(v) for k, v in s.counters.items()},
        )
