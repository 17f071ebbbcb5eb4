"""How much an engine worked: wall time with a request in flight, and the tokens that went in and out.

Episodes run concurrently, so adding up the time each episode waited on the engine counts the same
second once per episode; it cannot split a rollout's wall time. `MeteredEngine` measures from the
caller's side instead: the engine is busy from the moment a first `generate` is in flight until the
moment none is. The rest of a rollout's wall time is the agent loop waiting on envs, tools and chat
rendering with the engine idle, which is the number to act on (more concurrency, faster tools).
It works for every backend, since it only watches the `Engine` contract.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from agentrl.rollout.engine import Engine, Generation, SamplingParams


@dataclass(frozen=True)
class EngineUse:
    """Running totals of a `MeteredEngine`; subtract two readings for what happened between them.

    Attributes:
        busy_s: Wall seconds with at least one `generate` call in flight.
        requests: `generate` calls finished (answered or failed).
        prompt_tokens: Prompt tokens submitted (a multi-turn episode resubmits its history each turn).
        prompt_cached_tokens: Of those, tokens the engine reused from its prefix cache (as it reports them).
        generated_tokens: Tokens sampled.
    """

    busy_s: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    prompt_cached_tokens: int = 0
    generated_tokens: int = 0

    def __sub__(self, other: EngineUse) -> EngineUse:
        return EngineUse(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


class MeteredEngine:
    """An `Engine` that passes every call through to `engine` and keeps an `EngineUse` tally.

    Example:
        >>> metered = MeteredEngine(engine)                       # doctest: +SKIP
        >>> before = metered.use(); run_episodes(metered, ...); spent = metered.use() - before
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._in_flight = 0
        self._busy_since = 0.0
        self._use = EngineUse()

    def use(self) -> EngineUse:
        """The totals so far, counting an ongoing busy period up to now."""
        if self._in_flight:
            return _add(self._use, busy_s=time.perf_counter() - self._busy_since)
        return self._use

    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Generation:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        gen = None
        try:
            gen = await self.engine.generate(prompt_ids, sampling)
            return gen
        finally:  # a failed or cancelled request still held the engine
            self._in_flight -= 1
            busy = time.perf_counter() - self._busy_since if self._in_flight == 0 else 0.0
            self._use = _add(self._use, busy_s=busy, requests=1, prompt_tokens=len(prompt_ids),
                             prompt_cached_tokens=gen.prompt_cached_tokens if gen is not None else 0,
                             generated_tokens=len(gen.token_ids) if gen is not None else 0)

    def update_weights(self, state_dict: Mapping[str, object], version: int) -> None:
        self.engine.update_weights(state_dict, version)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def abort(self) -> None:
        self.engine.abort()

    def __getattr__(self, name: str):
        # Backend extras (`stats`, `weight_version`, ...) stay reachable through the meter.
        if name == "engine":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)


def _add(use: EngineUse, **more: float) -> EngineUse:
    return EngineUse(**{f.name: getattr(use, f.name) + more.get(f.name, 0) for f in fields(use)})
