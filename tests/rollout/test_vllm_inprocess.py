"""The in-process vllm adapter's argument mapping and call order, without vLLM installed.

vLLM cannot run on these machines, so `VLLMEngine`'s `vllm_api` argument gets stand-ins for the five
vLLM 0.24 names it uses (`AsyncEngineArgs`, `AsyncLLM`, `SamplingParams`, `TokensPrompt`,
`RequestOutputKind`). The stand-in `AsyncLLM` keeps the shapes of the real one
(`vllm/v1/engine/async_llm.py`, `vllm/outputs.py`): `generate` yields cumulative `RequestOutput`s whose
`outputs[0]` has `token_ids`, per-position `{token_id: Logprob}` dicts and `finish_reason`, and
`num_cached_tokens`; `abort(ids)` makes the request's iterator end with `finish_reason="abort"`;
closing the iterator early aborts the request. It records every call, and the tests check that the
adapter makes the calls vLLM needs, in the order it needs them. The real engine is exercised by the
GPU proof (bench/vllm_gpu_proof.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import threading
import types

import pytest
import torch

from agentrl.errors import EngineError
from agentrl.rollout.backends.vllm import VLLMEngine
from agentrl.rollout.engine import SamplingParams


@dataclasses.dataclass
class FakeEngineArgs:  # a few of AsyncEngineArgs' fields (a dataclass there too)
    model: str = ""
    dtype: str = "auto"
    max_model_len: int | None = None
    skip_tokenizer_init: bool = False
    enable_prefix_caching: bool | None = None
    logprobs_mode: str = "raw_logprobs"
    enable_sleep_mode: bool = False
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class Kind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class FakeLLM:
    """Token k of a response is `prompt[-1] + k + 1` with logprob -(k + 1) / 10, one per step."""

    def __init__(self, args: FakeEngineArgs):
        self.args = args
        self.calls: list[tuple] = []
        self.aborted: set[str] = set()
        self.seen_prompts: list[list[int]] = []
        self.step = asyncio.Event()  # set: steps run freely; tests clear it to hold a request mid-way
        self.step.set()

    @classmethod
    def from_engine_args(cls, args, usage_context=None):
        llm = cls(args)
        llm.usage_context = usage_context
        return llm

    async def generate(self, prompt, params, request_id):
        self.calls.append(("generate", request_id, dict(params.kwargs), dict(prompt)))
        p = prompt["prompt_token_ids"]
        cached = 16 if p[:16] in [q[:16] for q in self.seen_prompts] and len(p) > 16 else 0
        self.seen_prompts.append(p)
        kw = params.kwargs
        ids, lps = [], []
        try:
            while True:
                await self.step.wait()
                await asyncio.sleep(0)
                if request_id in self.aborted:
                    yield self._out(ids, lps, "abort", cached)
                    return
                tok = p[-1] + len(ids) + 1
                ids.append(tok)
                lps.append({tok: types.SimpleNamespace(logprob=-len(ids) / 10, rank=1, decoded_token=None)})
                done = "stop" if tok in kw["stop_token_ids"] else "length" if len(ids) >= kw["max_tokens"] else None
                yield self._out(ids, lps, done, cached)
                if done:
                    return
        except GeneratorExit:
            self.calls.append(("closed", request_id))
            raise

    @staticmethod
    def _out(ids, lps, finish, cached):
        c = types.SimpleNamespace(token_ids=ids, logprobs=lps, finish_reason=finish)
        return types.SimpleNamespace(outputs=[c], num_cached_tokens=cached, finished=finish is not None)

    async def abort(self, ids):
        self.calls.append(("abort", list(ids)))
        self.aborted.update(ids)

    async def pause_generation(self, *, mode="abort", clear_cache=True):
        self.calls.append(("pause", mode, clear_cache))

    async def resume_generation(self):
        self.calls.append(("resume",))

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        path = kwargs["weights_path"]
        where = sorted(os.listdir(path)) if os.path.isdir(path) else path
        self.calls.append(("rpc", method, where, kwargs["is_checkpoint_format"]))
        return [None]

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset", reset_running_requests))
        return True

    async def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))

    async def wake_up(self, tags=None):
        self.calls.append(("wake", tags))

    def shutdown(self, timeout=None):
        self.calls.append(("shutdown",))


class Usage(enum.Enum):  # vllm.usage.usage_lib.UsageContext's members that matter here
    ENGINE_CONTEXT = "ENGINE_CONTEXT"
    LLM_CLASS = "LLM_CLASS"
    OPENAI_API_SERVER = "OPENAI_API_SERVER"


API = types.SimpleNamespace(AsyncEngineArgs=FakeEngineArgs, AsyncLLM=FakeLLM, SamplingParams=FakeSamplingParams,
                            TokensPrompt=lambda **kw: kw, RequestOutputKind=Kind, UsageContext=Usage)


class CharTokenizer:
    """Token t decodes to one letter (enough for stop strings)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.fixture()
def engine():
    eng = VLLMEngine("/no/such/model", device="cuda", dtype=torch.bfloat16, max_model_len=512, vllm_api=API,
                     tokenizer=CharTokenizer(), gpu_memory_utilization=0.3, enforce_eager=True)
    yield eng
    eng.close()


def llm(engine) -> FakeLLM:
    return engine.transport.llm


def gen(engine, prompt, sampling):
    return asyncio.run(engine.generate(prompt, sampling))


def test_engine_arguments(engine):
    assert dataclasses.asdict(llm(engine).args) == dict(
        model="/no/such/model", dtype="bfloat16", max_model_len=512, skip_tokenizer_init=True,
        enable_prefix_caching=True, logprobs_mode="processed_logprobs", enable_sleep_mode=True,
        gpu_memory_utilization=0.3, enforce_eager=True)
    # The offline batch defaults (max_num_seqs, max_num_batched_tokens), not AsyncLLM's generic 128 / 2,048.
    assert llm(engine).usage_context is Usage.LLM_CLASS
    with pytest.raises(EngineError, match="Did you mean 'enforce_eager'"):
        VLLMEngine("/m", vllm_api=API, enforce_eagre=True)
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES"):
        VLLMEngine("/m", device="cpu", vllm_api=API)


def test_generate_maps_request_and_output(engine):
    out = gen(engine, [40, 41], SamplingParams(temperature=0.5, max_tokens=3, seed=9, stop_token_ids=(99,)))
    name, rid, params, prompt = llm(engine).calls[0]
    assert prompt == {"prompt_token_ids": [40, 41]}
    assert params["output_kind"] is Kind.CUMULATIVE and params["temperature"] == 0.5 and params["seed"] == 9
    assert params["logprobs"] == 0 and params["detokenize"] is False and params["ignore_eos"] is True
    assert out.token_ids == (42, 43, 44) and out.logprobs == pytest.approx((-0.1, -0.2, -0.3))
    assert out.finish_reason == "length" and out.weight_version == 0 and out.token_weight_versions == (0, 0, 0)
    assert gen(engine, list(range(1, 30)), SamplingParams(max_tokens=1)).prompt_cached_tokens == 0
    stopped = gen(engine, list(range(1, 30)), SamplingParams(max_tokens=8, stop_token_ids=(31,)))
    assert stopped.token_ids == (30, 31) and stopped.finish_reason == "stop"
    assert stopped.prompt_cached_tokens == 16  # RequestOutput.num_cached_tokens (the stand-in caches 16)
    assert engine.stats.requests == 3 and engine.stats.generated_tokens == 6
    assert engine.stats.extra["cached_prompt_tokens"] == 16


def test_stop_string_ends_the_response_and_stops_vllm(engine):
    # Tokens 3, 4, 5, ... decode to "d", "e", "f", ...: "ef" is completed by the second token.
    out = gen(engine, [2], SamplingParams(max_tokens=50, stop=("ef",)))
    assert out.token_ids == (3, 4, 5) and out.finish_reason == "stop" and len(out.logprobs) == 3
    assert ("closed", llm(engine).calls[0][1]) in llm(engine).calls  # the request's iterator closed: vLLM aborts it


def test_abort_returns_partial_output(engine):
    fake = llm(engine)

    async def go():
        task = asyncio.ensure_future(engine.generate([1], SamplingParams(max_tokens=10_000)))
        while engine.stats.generated_tokens < 3:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.abort)  # abort() is a blocking call from the caller's side
        return await task

    out = asyncio.run(go())
    assert out.finish_reason == "abort" and 3 <= len(out.token_ids) < 10_000
    assert ("abort", [fake.calls[0][1]]) in fake.calls


def test_update_weights_pauses_reloads_resets_resumes(engine):
    sd = {"w": torch.ones(3), "v": torch.zeros(2)}
    engine.update_weights(sd, version=4)
    calls = [c for c in llm(engine).calls]
    assert calls == [("pause", "keep", False), ("rpc", "reload_weights", ["model.safetensors"], True),
                     ("reset", True), ("resume",)]
    first = engine._current
    assert engine.weight_version == 4 and os.path.isdir(first)
    engine.update_weights(sd, version=5)
    assert not os.path.exists(first) and os.path.isdir(engine._current)  # only the latest copy is kept
    out = gen(engine, [1], SamplingParams(max_tokens=2))
    assert out.weight_version == 5 and out.token_weight_versions == (5, 5)


def test_weights_that_arrive_asleep_load_at_wake(engine):
    fake = llm(engine)
    engine.sleep()
    with pytest.raises(EngineError, match="asleep"):
        gen(engine, [1], SamplingParams(max_tokens=2))
    engine.update_weights({"w": torch.ones(3)}, version=2)
    assert [c[0] for c in fake.calls] == ["sleep"] and engine.weight_version == 0  # nothing loaded while asleep
    engine.wake()
    assert fake.calls[1:] == [("wake", ["weights"]), ("rpc", "reload_weights", ["model.safetensors"], True),
                              ("wake", ["kv_cache"]), ("reset", False)]
    assert engine.weight_version == 2 and gen(engine, [1], SamplingParams(max_tokens=1)).weight_version == 2


def test_level_two_sleep_reloads_the_current_weights(engine):
    fake = llm(engine)
    engine.sleep(level=2)
    engine.wake()
    # vLLM dropped the weights: the model's own are loaded again from the model path.
    assert fake.calls == [("sleep", 2), ("wake", ["weights"]), ("rpc", "reload_weights", "/no/such/model", True),
                          ("wake", ["kv_cache"]), ("reset", False)]


def test_requests_from_many_threads_and_loops(engine):
    results = []

    def worker(i):
        results.append(gen(engine, [10 * i], SamplingParams(max_tokens=2)).token_ids)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(10 * i + 1, 10 * i + 2) for i in range(1, 5)]


def test_close_shuts_vllm_down(engine):
    fake = llm(engine)
    engine.close()
    assert fake.calls[-1] == ("shutdown",)
    with pytest.raises(EngineError, match="closed"):
        engine.update_weights({"w": torch.ones(1)}, version=1)
