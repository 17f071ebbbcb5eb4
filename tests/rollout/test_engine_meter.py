"""`MeteredEngine`: busy time is the union of the intervals with a request in flight (not the sum of
the requests' own times), and the tokens in and out are counted, on a timed script and on the real engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentrl.errors import EngineError
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import Generation, SamplingParams
from agentrl.rollout.engine_meter import EngineUse, MeteredEngine


class TimedScript:
    """A stand-in backend whose requests take known wall times (max_tokens x 0.1 s), to check the
    interval arithmetic by hand; the real engine's counts are checked below."""

    async def generate(self, prompt_ids, sampling: SamplingParams) -> Generation:
        await asyncio.sleep(sampling.max_tokens * 0.1)
        if sampling.seed == 13:
            raise EngineError("request failed")
        return Generation(tuple(range(sampling.max_tokens)), (0.0,) * sampling.max_tokens, "length",
                          prompt_cached_tokens=len(prompt_ids) // 2)

    def update_weights(self, state_dict, version):
        self.version = version

    def sleep(self): ...

    def wake(self): ...

    def abort(self): ...


async def _after(delay: float, coro):
    await asyncio.sleep(delay)
    return await coro


def test_busy_time_is_the_union_of_in_flight_intervals():
    metered = MeteredEngine(TimedScript())

    async def play():
        # A: 0.0-0.4 s, B: 0.2-0.6 s (overlaps A), idle 0.6-1.0 s, C: 1.0-1.2 s, D: 1.0-1.1 s fails.
        await asyncio.gather(metered.generate([1] * 10, SamplingParams(max_tokens=4)),
                             _after(0.2, metered.generate([1] * 6, SamplingParams(max_tokens=4))),
                             _after(1.0, metered.generate([1] * 4, SamplingParams(max_tokens=2))),
                             _after(1.0, metered.generate([1] * 2, SamplingParams(max_tokens=1, seed=13))),
                             return_exceptions=True)

    t0 = time.perf_counter()
    asyncio.run(play())
    wall = time.perf_counter() - t0
    use = metered.use()
    # Busy: 0.0-0.6 and 1.0-1.2 = 0.8 s (the requests' own times add up to 0.4 + 0.4 + 0.2 + 0.1 = 1.1 s).
    assert 0.79 <= use.busy_s <= 0.8 + (wall - 1.2) + 0.02 and use.busy_s < wall - 0.35
    # Four requests; the failed one's prompt counts, it generated nothing.
    assert (use.requests, use.prompt_tokens, use.generated_tokens) == (4, 22, 4 + 4 + 2)
    assert use.prompt_cached_tokens == 5 + 3 + 2
    metered.update_weights({}, version=3)  # the rest of the contract passes through
    assert metered.engine.version == 3 and metered.version == 3


def test_readings_subtract_and_count_an_ongoing_busy_period():
    metered = MeteredEngine(TimedScript())

    async def play():
        task = asyncio.ensure_future(metered.generate([1], SamplingParams(max_tokens=3)))
        await asyncio.sleep(0.1)
        midway = metered.use()  # one request in flight for ~0.1 s
        await task
        return midway

    midway = asyncio.run(play())
    assert midway.requests == 0 and 0.09 <= midway.busy_s < 0.3
    spent = metered.use() - midway
    assert spent.requests == 1 and spent.generated_tokens == 3 and 0.15 <= spent.busy_s < 0.3
    assert EngineUse(busy_s=1.0, requests=2) - EngineUse(busy_s=0.25, requests=1) == EngineUse(busy_s=0.75, requests=1)


def test_counts_on_the_real_engine_match_its_outputs_and_its_own_stats(tiny_model_dir, tokenizer):
    engine = EmbeddedEngine(tiny_model_dir)
    metered = MeteredEngine(engine)
    prompts = [tokenizer.encode(t) for t in ("What is 12 times 13?", "A shop has 40 boxes.", "Add 2 and 3.")]

    async def play():
        return await asyncio.gather(*(metered.generate(p, SamplingParams(temperature=0.0, max_tokens=8))
                                      for p in prompts))

    t0 = time.perf_counter()
    outs = asyncio.run(play())
    wall = time.perf_counter() - t0
    use = metered.use()
    assert use.requests == 3 and use.prompt_tokens == sum(map(len, prompts))
    assert use.generated_tokens == sum(len(o.token_ids) for o in outs) == engine.stats.generated_tokens
    assert use.prompt_cached_tokens == sum(o.prompt_cached_tokens for o in outs)
    assert 0 < use.busy_s <= wall
    assert metered.stats is engine.stats  # backend extras stay reachable


def test_a_cancelled_request_ends_its_busy_period():
    metered = MeteredEngine(TimedScript())

    async def play():
        task = asyncio.ensure_future(metered.generate([1], SamplingParams(max_tokens=50)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(play())
    time.sleep(0.1)
    use = metered.use()
    assert use.requests == 1 and use.generated_tokens == 0 and 0.09 <= use.busy_s < 0.19
