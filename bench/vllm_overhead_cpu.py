"""agentrl's own host time per token in the in-process vllm backend, on CPU, without vLLM.

The stand-in `AsyncLLM` of tests/rollout/test_vllm_inprocess.py streams cumulative outputs as fast as Python
can (one token per request per step, no model). Timed: consuming its streams directly (256 requests of 256
tokens, one event loop), and the same requests through `VLLMEngine.generate` (its event-loop thread, the
per-token version bookkeeping, the stats). The difference over the tokens is what agentrl adds per token,
whatever engine computes them; docs/benchmarks.md compares it with the GPU gap it could explain.

    PYTHONPATH=. python bench/vllm_overhead_cpu.py
"""

from __future__ import annotations

import asyncio
import time

import torch

from agentrl.rollout.backends.vllm import VLLMEngine
from agentrl.rollout.engine import SamplingParams
from tests.rollout.test_vllm_inprocess import API, CharTokenizer, FakeLLM

N, T = 256, 256
PROMPTS = [[5 + i % 7] * 8 for i in range(N)]


def direct() -> float:
    llm = FakeLLM(API.AsyncEngineArgs())

    async def one(i, p):
        last = None
        async for out in llm.generate({"prompt_token_ids": p}, API.SamplingParams(stop_token_ids=[], max_tokens=T),
                                      f"r{i}"):
            last = out
        return len(last.outputs[0].token_ids)

    async def go():
        return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))
    t0 = time.perf_counter()
    assert asyncio.run(go()) == N * T
    return time.perf_counter() - t0


def through_agentrl(engine: VLLMEngine) -> float:
    sp = SamplingParams(temperature=1.0, max_tokens=T)

    async def go():
        return sum(len(g.token_ids) for g in await asyncio.gather(*(engine.generate(p, sp) for p in PROMPTS)))
    t0 = time.perf_counter()
    assert asyncio.run(go()) == N * T
    return time.perf_counter() - t0


def main() -> None:
    engine = VLLMEngine("/no/such/model", device="cuda", dtype=torch.bfloat16, max_model_len=512, vllm_api=API,
                        tokenizer=CharTokenizer())
    try:
        base = min(direct() for _ in range(3))
        ours = min(through_agentrl(engine) for _ in range(3))
    finally:
        engine.close()
    print(f"stand-in streams consumed directly: {base:.3f} s; through VLLMEngine.generate: {ours:.3f} s; "
          f"agentrl adds {(ours - base) / (N * T) * 1e6:.1f} us per token ({N} requests x {T} tokens, best of 3)")


if __name__ == "__main__":
    main()
