"""Speculative (async) decode steps: launching step t+1 before step t's tokens reach the host.

On CUDA the embedded engine overlaps its host bookkeeping with the device this way; the result
must be exactly what the one-step-at-a-time engine produces. The logic is device-independent,
so it is checked on the CPU with `async_steps=True` against `async_steps=False` (and on the GPU,
with CUDA graphs and the real overlap, under `AGENTRL_TEST_DEVICE=cuda`).
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import SamplingParams

DEVICE = os.environ.get("AGENTRL_TEST_DEVICE", "cpu")


def _run(engine, prompts, samplings):
    async def go():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, samplings)))

    return asyncio.run(go())


def _workload(stop_token: int | None):
    """Mixed lengths, limits, filters, a stop token most rows hit at different steps, and greedy rows."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randrange(3, 70))] for _ in range(24)]
    samplings = []
    for i in range(len(prompts)):
        kw = dict(max_tokens=rng.randrange(1, 40), seed=1000 + i, temperature=rng.choice([0.0, 0.7, 1.0, 1.3]))
        if i % 3 == 0 and stop_token is not None:
            kw["stop_token_ids"] = (stop_token,)
        if i % 4 == 1:
            kw["top_k"] = 5
        if i % 5 == 2:
            kw["top_p"] = 0.8
        samplings.append(SamplingParams(**kw))
    return prompts, samplings


def test_async_steps_give_the_same_outputs_as_sync_steps(tiny_model_dir):
    sync = EmbeddedEngine(tiny_model_dir, DEVICE, async_steps=False, block_size=8)
    spec = EmbeddedEngine(tiny_model_dir, DEVICE, async_steps=True, block_size=8)
    # A stop token the model actually emits: the most frequent token of a first pass without stops.
    prompts, samplings = _workload(None)
    tokens = [t for o in _run(sync, prompts, samplings) for t in o.token_ids]
    prompts, samplings = _workload(max(set(tokens), key=tokens.count))
    a = _run(sync, prompts, samplings)
    b = _run(spec, prompts, samplings)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        # Same tokens; logprobs up to float rounding (a step with dropped rows has another batch shape).
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5 if DEVICE == "cpu" else 2e-3)
    assert any(o.finish_reason == "stop" for o in a) and any(o.finish_reason == "length" for o in a)
    extra = spec.stats.extra
    assert extra["speculative_steps"] > 0 and sync.stats.extra["speculative_steps"] == 0
    assert extra["dropped_rows"] > 0  # rows launched for sequences that had just stopped
    assert spec.stats.generated_tokens == sum(len(o.token_ids) for o in b)


@pytest.mark.parametrize("max_batch_size", [6, 32])
def test_speculative_prefill_chunks_and_admissions_give_the_same_outputs(tiny_model_dir, max_batch_size):
    # Prompts longer than a step (48 tokens) are prefilled over several steps, requests wait for a
    # row (6 rows) or for budget, identical prompts fork, stop tokens end rows at different steps:
    # the speculative step t+1 carries prefill chunks and admissions planned before step t is read.
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randrange(20, 130))] for _ in range(14)]
    prompts += [prompts[2], prompts[2], prompts[5][:40]]  # forks, and a prompt sharing a cached prefix
    samplings = [SamplingParams(max_tokens=rng.randrange(1, 30), seed=77 + i, temperature=rng.choice([0.0, 1.0]),
                                stop_token_ids=(rng.randrange(3, 400),) if i % 2 else ())
                 for i in range(len(prompts))]
    kw = dict(block_size=8, max_step_tokens=48, max_batch_size=max_batch_size)
    sync = EmbeddedEngine(tiny_model_dir, DEVICE, async_steps=False, **kw)
    spec = EmbeddedEngine(tiny_model_dir, DEVICE, async_steps=True, **kw)
    a, b = _run(sync, prompts, samplings), _run(spec, prompts, samplings)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5 if DEVICE == "cpu" else 2e-3)
    assert spec.stats.extra["speculative_prefills"] > 0
    assert max_batch_size < 32 or spec.stats.extra["forks"] > 0  # with 6 rows the copies wait their turn
    off = EmbeddedEngine(tiny_model_dir, DEVICE, async_steps=True, async_prefill=False, **kw)
    c = _run(off, prompts, samplings)
    assert [o.token_ids for o in c] == [o.token_ids for o in a]
    assert off.stats.extra["speculative_prefills"] == 0


def test_requests_arriving_mid_run_and_aborts_with_async_steps(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, DEVICE, async_steps=True)
    ref = EmbeddedEngine(tiny_model_dir, DEVICE, async_steps=False)
    late_prompt, sp = [9, 8, 7, 6, 5], SamplingParams(max_tokens=12, seed=5)

    async def go():
        first = asyncio.ensure_future(engine.generate([1, 2, 3], SamplingParams(max_tokens=3000, seed=1)))
        while engine.stats.generated_tokens < 8:  # decoding, with speculative steps in flight
            await asyncio.sleep(0.01)
        late = await engine.generate(late_prompt, sp)  # joins the running batch
        engine.abort()
        return late, await asyncio.wait_for(first, 30)

    late, first = asyncio.run(go())
    assert late.token_ids == _run(ref, [late_prompt], [sp])[0].token_ids
    assert first.finish_reason == "abort" and len(first.logprobs) == len(first.token_ids) >= 8
    again = _run(engine, [[4, 4, 4]], [SamplingParams(max_tokens=5, seed=2)])[0]
    assert again.token_ids == _run(ref, [[4, 4, 4]], [SamplingParams(max_tokens=5, seed=2)])[0].token_ids
    assert engine.stats.extra["speculative_steps"] > 0
