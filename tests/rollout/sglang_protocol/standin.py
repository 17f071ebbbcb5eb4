"""A stand-in for SGLang 0.5.17 that speaks its request and response shapes, backed by agentrl's own
built-in engine on the tiny model. It is a protocol test, not SGLang: it checks that the sglang
backend sends what SGLang documents and reads what SGLang answers; SGLang's own kernels, scheduler
and radix cache run only on the GPU machine (bench/sglang_gpu.py).

What it follows, from the SGLang source: `GenerateReqInput` fields (`input_ids`, `sampling_params`,
`return_logprob`, `logprob_start_len`, `stream`, `rid`); `SamplingParams` semantics (temperature
below 1e-6 is greedy, `top_k=-1` is the whole vocabulary, the model's EOS ids stop a request unless
`ignore_eos`, `sampling_seed`, defaults such as `max_new_tokens=128`); outputs `{"output_ids",
"meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
"weight_version", "output_token_logprobs": [(logprob, id, None), ...]}}` with the stop token kept;
non-incremental streaming (every chunk cumulative; the first token comes at once); `abort_request`
by rid or for all, aborted requests returning their partial output with `{"type": "abort"}`.

Where it cannot follow SGLang: the built-in engine reports no progress, so a stream is generated in
slices of `stream_interval` tokens, each slice a request of its own on prompt + tokens so far
(served from the prefix cache; a seeded slice gets a seed derived from its offset); and seeded
sampling hashes the output position where SGLang hashes the absolute position, so a seeded response
continued past an EOS id differs from SGLang's. The tests that need such equalities use greedy
requests.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace

import torch

from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import SamplingParams

# The sampling fields agentrl's client may send; anything else is refused (a real server would
# accept more, but the client should not be sending it).
KNOWN = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
         "presence_penalty", "min_new_tokens", "n", "ignore_eos", "stop_token_ids", "sampling_seed", "stream_interval"}
NEUTRAL = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_new_tokens": 0, "n": 1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_eos_ids(model_path: str) -> set[int]:
    """EOS ids the way SGLang collects them: config.json's eos_token_id plus generation_config.json's."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_path, name)
        if os.path.exists(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids |= {eos} if isinstance(eos, int) else set(eos or [])
    return ids


def to_agentrl(sp: dict, eos_ids: set[int]) -> SamplingParams:
    """SGLang `sampling_params` -> the same request for agentrl's engine (raises ValueError like SGLang)."""
    unknown = set(sp) - KNOWN
    if unknown:
        raise ValueError(f"the stand-in does not take sampling params {sorted(unknown)}")
    for key, neutral in NEUTRAL.items():
        if sp.get(key, neutral) != neutral:
            raise ValueError(f"{key}={sp[key]} is not implemented by the stand-in")
    temperature = float(sp.get("temperature", 1.0))
    top_k = int(sp.get("top_k", -1))
    stops = set(sp.get("stop_token_ids") or [])
    if not sp.get("ignore_eos", False):
        stops |= eos_ids
    return SamplingParams(temperature=0.0 if temperature < 1e-6 else temperature, top_p=float(sp.get("top_p", 1.0)),
                          top_k=top_k if top_k > 0 else 0, min_p=float(sp.get("min_p", 0.0)),
                          max_tokens=int(sp.get("max_new_tokens", 128)), stop_token_ids=tuple(sorted(stops)),
                          seed=sp.get("sampling_seed"))


class _TokenizerManager:
    def __init__(self, owner: StandinSGLang):
        self.owner = owner

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.owner.aborts.append((rid, abort_all))
        if abort_all:
            self.owner.abort_epoch += 1  # also ends a stream between two of its slices
            self.owner.engine.abort()
        elif rid in self.owner.tasks:
            self.owner.tasks[rid].cancel()


class _ServerArgs:
    tp_size = 1


class StandinSGLang:
    """`sglang.Engine`'s surface that the backend uses in-process (`loop`, `async_generate`,
    `tokenizer_manager.abort_request`, `get_all_child_pids`), recording every call."""

    def __init__(self, *, eos_token_ids: set[int] | None = None, **kwargs):
        self.kwargs = kwargs
        self.calls: list[dict] = []
        self.aborts: list[tuple[str, bool]] = []
        self.tasks: dict[str, asyncio.Task] = {}
        self.abort_epoch = 0
        self.weight_version = str(kwargs.get("weight_version", "default"))
        self.server_args = _ServerArgs()
        self.tokenizer_manager = _TokenizerManager(self)
        self.eos_ids = model_eos_ids(kwargs["model_path"]) if eos_token_ids is None else set(eos_token_ids)
        self.engine = EmbeddedEngine(kwargs["model_path"], device=kwargs.get("device") or "cpu",
                                     dtype=DTYPES[kwargs.get("dtype", "bfloat16")],
                                     max_model_len=int(kwargs.get("context_length") or 4096))
        self.loop = asyncio.new_event_loop()  # like sglang.Engine: a loop of its own, set as current
        asyncio.set_event_loop(self.loop)

    def get_all_child_pids(self) -> list[int]:
        return []

    async def async_generate(self, **request):
        self.calls.append(request)
        outs = self._outputs(request)
        if request.get("stream"):
            return outs
        last = None
        async for last in outs:
            pass
        return last

    async def _outputs(self, request: dict) -> AsyncIterator[dict]:
        """The request's outputs; a stream is generated in slices of `stream_interval` tokens (the
        first slice one token), each a request of the built-in engine on the prompt + what came so
        far (served from its prefix cache), so progress shows as SGLang's does."""
        if not request.get("return_logprob") or request.get("logprob_start_len", -1) != -1:
            raise ValueError("the stand-in serves return_logprob=True with logprob_start_len=-1 only")
        prompt, rid = list(request["input_ids"]), request["rid"]
        sp = request.get("sampling_params") or {}
        sampling = to_agentrl(sp, self.eos_ids)
        interval = max(1, int(sp.get("stream_interval") or 1)) if request.get("stream") else None
        ids: list[int] = []
        lps: list[float] = []
        cached = None
        epoch = self.abort_epoch
        while True:
            if self.abort_epoch != epoch:
                yield self.output(rid, prompt, ids, lps, {"type": "abort", "message": "Aborted"}, cached or 0)
                return
            want = sampling.max_tokens - len(ids)
            size = want if interval is None else min(want, interval if ids else 1)
            seed = None if sampling.seed is None else (sampling.seed + 7919 * len(ids)) % 2**63
            gen = await self._slice(rid, prompt + ids, replace(sampling, max_tokens=size, seed=seed))
            if gen is None:  # aborted by rid: SGLang answers with an abort and what it had
                yield self.output(rid, prompt, ids, lps, {"type": "abort", "message": "Aborted"}, cached or 0)
                return
            ids += gen.token_ids
            lps += gen.logprobs
            cached = gen.prompt_cached_tokens if cached is None else cached
            if gen.finish_reason != "length" or len(ids) >= sampling.max_tokens:
                break
            yield self.output(rid, prompt, ids, lps, None, cached)
        finish = {"stop": {"type": "stop", "matched": ids[-1] if ids else None},
                  "length": {"type": "length", "length": len(ids)},
                  "abort": {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}}
        yield self.output(rid, prompt, ids, lps, finish[gen.finish_reason], cached)

    async def _slice(self, rid: str, prompt: list[int], sampling: SamplingParams):
        task = asyncio.ensure_future(self.engine.generate(prompt, sampling))
        self.tasks[rid] = task
        try:
            return await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the caller left, not an abort by rid
                raise
            return None
        finally:
            self.tasks.pop(rid, None)

    def output(self, rid, prompt, ids, lps, finish, cached) -> dict:
        return {"output_ids": list(ids),
                "meta_info": {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
                              "weight_version": self.weight_version, "completion_tokens": len(ids),
                              "cached_tokens": cached,
                              "output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, ids)]}}

    def load_weights(self, state_dict: dict, version: str) -> None:
        self.engine.update_weights(state_dict, int(version) if version.isdigit() else 0)
        self.weight_version = version
