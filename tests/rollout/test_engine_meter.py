"""`MeteredEngine`: busy time is the union of the intervals with a request in flight (not the sum of
the requests' own times), and the tokens in and out are counted, on a scripted backend with the meter's
clock set by hand and on the real engine."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from agentrl.errors import EngineError
from agentrl.rollout import engine_meter
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.engine import Generation, SamplingParams
from agentrl.rollout.engine_meter import EngineUse, MeteredEngine


class ScriptedBackend:
    """A stand-in backend whose requests end when the test says so (`finish(i)`, i in order of arrival),
    with `max_tokens` tokens (seed 13: an error); with the meter's clock set by hand (`clock`), the
    interval arithmetic is checked exactly, whatever the machine's load. The real engine's counts are
    checked below."""

    def __init__(self):
        self.gates: list[asyncio.Event] = []

    async def generate(self, prompt_ids, sampling: SamplingParams) -> Generation:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if sampling.seed == 13:
            raise EngineError("request failed")
        return Generation(tuple(range(sampling.max_tokens)), (0.0,) * sampling.max_tokens, "length",
                          prompt_cached_tokens=len(prompt_ids) // 2)

    def update_weights(self, state_dict, version):
        self.version = version

    def sleep(self): ...

    def wake(self): ...

    def abort(self): ...


@pytest.fixture
def clock(monkeypatch):
    """The meter's clock, set by the test (`clock.now = 0.4`)."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(engine_meter, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    return clock


async def _settle() -> None:
    """Let every task that is ready run up to its next wait (a request reaches the backend's gate)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _submit(metered: MeteredEngine, prompt_len: int, **sampling) -> asyncio.Future:
    task = asyncio.ensure_future(metered.generate([1] * prompt_len, SamplingParams(**sampling)))
    await _settle()
    return task


async def _finish(backend: ScriptedBackend, i: int) -> None:
    backend.gates[i].set()
    await _settle()


def test_busy_time_is_the_union_of_in_flight_intervals(clock):
    backend = ScriptedBackend()
    metered = MeteredEngine(backend)

    async def play():
        # A: 0.0-0.4 s, B: 0.2-0.6 s (overlaps A), idle 0.6-1.0 s, C: 1.0-1.2 s, D: 1.0-1.1 s fails.
        a = await _submit(metered, 10, max_tokens=4)
        clock.now = 0.2
        b = await _submit(metered, 6, max_tokens=4)
        clock.now = 0.4
        await _finish(backend, 0)
        clock.now = 0.6
        await _finish(backend, 1)
        clock.now = 1.0
        c = await _submit(metered, 4, max_tokens=2)
        d = await _submit(metered, 2, max_tokens=1, seed=13)
        clock.now = 1.1
        await _finish(backend, 3)
        assert metered.use().requests == 3 and metered.use().busy_s == pytest.approx(0.7)  # C still in flight
        clock.now = 1.2
        await _finish(backend, 2)
        return await asyncio.gather(a, b, c, d, return_exceptions=True)

    results = asyncio.run(play())
    assert [type(r).__name__ for r in results] == ["Generation"] * 3 + ["EngineError"]
    use = metered.use()
    # Busy: 0.0-0.6 and 1.0-1.2 = 0.8 s (the requests' own times add up to 0.4 + 0.4 + 0.2 + 0.1 = 1.1 s).
    assert use.busy_s == pytest.approx(0.8)
    # Four requests; the failed one's prompt counts, it generated nothing.
    assert (use.requests, use.prompt_tokens, use.generated_tokens) == (4, 22, 4 + 4 + 2)
    assert use.prompt_cached_tokens == 5 + 3 + 2
    metered.update_weights({}, version=3)  # the rest of the contract passes through
    assert metered.engine.version == 3 and metered.version == 3


def test_readings_subtract_and_count_an_ongoing_busy_period(clock):
    backend = ScriptedBackend()
    metered = MeteredEngine(backend)

    async def play():
        task = await _submit(metered, 1, max_tokens=3)
        clock.now = 0.1
        midway = metered.use()  # one request in flight for 0.1 s
        clock.now = 0.25
        await _finish(backend, 0)
        await task
        return midway

    midway = asyncio.run(play())
    assert midway.requests == 0 and midway.busy_s == pytest.approx(0.1)
    spent = metered.use() - midway
    assert spent.requests == 1 and spent.generated_tokens == 3 and spent.busy_s == pytest.approx(0.15)
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


def test_a_cancelled_request_ends_its_busy_period(clock):
    metered = MeteredEngine(ScriptedBackend())

    async def play():
        task = await _submit(metered, 1, max_tokens=50)
        clock.now = 0.1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(play())
    clock.now = 0.3  # nothing in flight: the reading no longer grows
    use = metered.use()
    assert use.requests == 1 and use.generated_tokens == 0 and use.busy_s == pytest.approx(0.1)
