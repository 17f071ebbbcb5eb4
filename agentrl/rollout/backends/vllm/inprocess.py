"""vLLM 0.24's `AsyncLLM` (the v1 engine) in agentrl's process, driven on the backend's own loop.

Every call below is one of `AsyncLLM`'s public methods in `vllm/v1/engine/async_llm.py` of 0.24:
`from_engine_args`, `generate` (an async iterator of `RequestOutput`), `abort(request_ids)`,
`pause_generation(mode="keep")` / `resume_generation`, `collective_rpc("reload_weights", ...)`
(the worker's `reload_weights(weights_path=...)`), `reset_prefix_cache(reset_running_requests=...)`,
`sleep(level)` / `wake_up(tags)`, `shutdown`. Outputs are asked for as `CUMULATIVE`: each step's
`RequestOutput` holds the response so far (its lists are vLLM's own, grown in place, so nothing is
copied), which lets the backend count tokens as they come, match stop strings, and stamp each token
with the weight version that sampled it. `abort` makes vLLM send a last output with
`finish_reason="abort"` and every token so far.

The vLLM names come in through `api` (default: imported from vllm), so the argument mapping is
tested on machines without vLLM (tests/rollout/test_vllm_inprocess.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from collections.abc import AsyncIterator, Mapping

from agentrl.errors import EngineError
from agentrl.rollout.backends.vllm.launch import check_engine_kwargs
from agentrl.rollout.backends.vllm.params import Delta, finish_reason, vllm_sampling_kwargs
from agentrl.rollout.engine import SamplingParams


def vllm_api() -> types.SimpleNamespace:
    """The vLLM 0.24 classes the in-process engine uses (imported here, never at agentrl's import)."""
    try:
        from vllm import AsyncEngineArgs, SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise EngineError(f"rollout.engine 'vllm' needs the vllm package ({exc}); install it with "
                          "`pip install agentrl[vllm]` (vllm 0.24), or give rollout.server.url of a running "
                          "vLLM server") from exc
    return types.SimpleNamespace(AsyncEngineArgs=AsyncEngineArgs, AsyncLLM=AsyncLLM, SamplingParams=SamplingParams,
                                 TokensPrompt=TokensPrompt, RequestOutputKind=RequestOutputKind, UsageContext=UsageContext)


class InProcessTransport:
    """`AsyncLLM` behind the small set of calls the backend's front needs (all on one event loop)."""

    def __init__(self, engine_kwargs: Mapping[str, object], api: types.SimpleNamespace | None = None):
        self.api = api if api is not None else vllm_api()
        if dataclasses.is_dataclass(self.api.AsyncEngineArgs):
            check_engine_kwargs(engine_kwargs, {f.name for f in dataclasses.fields(self.api.AsyncEngineArgs)})
        self.engine_kwargs = dict(engine_kwargs)
        self.llm = None

    async def start(self) -> None:
        # vLLM forks its engine-core process unless it sees CUDA initialised here; on the H200 a second engine
        # in one process (the conformance suite) was forked after CUDA was in use without vLLM noticing, and
        # its core died with "CUDA error: initialization error". agentrl's trainer initialises CUDA before a
        # colocated engine starts, so spawn always (the user's own VLLM_WORKER_MULTIPROC_METHOD still wins).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # vLLM sizes its batch by who starts it: `AsyncLLM.from_engine_args` alone gets the generic 128
        # sequences and 2,048 tokens per step (on the H200 the 256-prompt benchmark ran in two waves), `vllm
        # serve` 1,024 and 8,192 on a large GPU, the offline `LLM` 1,024 and 16,384. A rollout engine is an
        # offline batch job, so it asks for the offline defaults; engine_options max_num_seqs and
        # max_num_batched_tokens still win.
        try:
            self.llm = self.api.AsyncLLM.from_engine_args(self.api.AsyncEngineArgs(**self.engine_kwargs),
                                                          usage_context=self.api.UsageContext.LLM_CLASS)
        except (ValueError, TypeError, RuntimeError) as exc:  # vLLM's config checks raise ValueError
            raise EngineError(f"vLLM could not start on {self.engine_kwargs.get('model')!r}: "
                              f"{type(exc).__name__}: {exc}") from exc

    async def stream(self, rid: str, prompt: list[int], sampling: SamplingParams) -> AsyncIterator[Delta]:
        """The response to `prompt` as it grows; the last Delta has a finish reason."""
        api = self.api
        params = api.SamplingParams(**vllm_sampling_kwargs(sampling), output_kind=api.RequestOutputKind.CUMULATIVE)
        seen = 0
        # Closing this generator early (a stop string, a cancelled caller) closes vLLM's, which aborts the request.
        async with contextlib.aclosing(self.llm.generate(api.TokensPrompt(prompt_token_ids=prompt), params, rid)) as outs:
            while True:
                try:
                    out = await anext(outs)
                except StopAsyncIteration:
                    return
                except Exception as exc:  # vLLM's request errors (ValueError, EngineDeadError, ...)
                    raise EngineError(f"vLLM failed the request: {type(exc).__name__}: {exc}") from exc
                c = out.outputs[0]
                ids = tuple(c.token_ids[seen:])
                # Each position's dict holds the sampled token's Logprob (logprobs=0 asks for no others).
                lps = tuple(c.logprobs[i][t].logprob for i, t in enumerate(ids, seen)) if ids else ()
                seen += len(ids)
                yield Delta(ids, lps, finish_reason(c.finish_reason), out.num_cached_tokens)

    async def abort(self, rids: list[str]) -> None:
        if rids:
            await self.llm.abort(rids)

    async def pause(self) -> None:
        """Stop scheduling between two steps; requests in flight stay where they are."""
        await self.llm.pause_generation(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await self.llm.resume_generation()

    async def reload_weights(self, path: str) -> None:
        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True})

    async def reset_prefix_cache(self, running: bool) -> None:
        """Forget cached prefixes; `running`: also preempt requests in flight (their KV is recomputed)."""
        if not await self.llm.reset_prefix_cache(reset_running_requests=running) and not running:
            raise EngineError("vLLM did not reset its prefix cache: requests were running; reset it between plays")

    async def sleep(self, level: int) -> None:
        await self.llm.sleep(level)

    async def wake(self, tags: list[str] | None) -> None:
        await self.llm.wake_up(tags)

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
