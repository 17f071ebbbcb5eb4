"""A rollout worker: one engine, its pool of envs and the chat renderer, in a process of its own.

The driver runs `cluster.rollout_workers` of these as Ray actors (`agentrl.driver.rollout_pool`)
and hands each worker a slice of a step's episodes whenever it is free; this module knows nothing of
Ray or of the driver, so a worker also runs in-process (the tests build one directly).

Threads, not asyncio, answer the driver while episodes play. The actor is threaded with three
concurrency groups (`CONCURRENCY_GROUPS`): `play` (one thread: play, sleep, wake, close, in the
order they were sent), `weights` (one thread: weight updates) and `control` (health, abort). `play`
runs its episodes on an event loop of its own, and the engine computes on its own background thread,
so `health` reads the engine's progress counters from another thread and answers in milliseconds even
mid-generation, and even when an env's code blocks the episode loop. An async actor would answer
health from that same event loop, and so not at all while a blocking env or tool call holds it: the
worker would look hung for the wrong reason.

Weight updates have a thread of their own so that the asynchronous schedule can push new weights
while a slice plays: the engine swaps them in between two of its steps (its own lock), the episodes
in flight go on with them, and each token keeps the version that sampled it. Pushes may be received
out of order (Ray does not order calls across a threaded actor's threads), so a push older than the
weights held is skipped, and `play` accepts weights newer than the driver expected (a push that
landed while the call was on its way).

Letters: none (no tensors cross this boundary except the weights, a name -> tensor mapping).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from agentrl.envs.registration import ENVS, make, register
from agentrl.errors import EngineError
from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episodes
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import Generation, SamplingParams
from agentrl.rollout.engine_meter import EngineUse, MeteredEngine
from agentrl.rollout.trajectory import Trajectory

# Ray concurrency groups of the actor, and which group each method runs in.
CONCURRENCY_GROUPS = {"play": 1, "weights": 1, "control": 2}
METHOD_GROUPS = {"play": "play", "update_weights": "weights", "sleep": "play", "wake": "play", "close": "play",
                 "health": "control", "abort": "control"}


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker builds at start (and again after a restart).

    Attributes:
        engine: An Engine class, taken from `ENGINES` by the driver (pickled by reference, so its
            module must be importable in the worker).
        model_path: The model directory (the starting weights; current ones are pushed after).
        device: `cpu` or `cuda` (the GPU Ray assigned).
        dtype: The engine's weights dtype.
        max_model_len: Longest prompt + response.
        env_id, env_kwargs: The env each episode plays.
        env_spec: The env's registry entry in the driver: an env registered at run time there (a
            script's `register(...)`) is registered here too (its class must be importable here,
            or defined in the driver's `__main__`, which Ray ships by value).
        template_kwargs: Options passed to the chat template on every render.
        limits: Bounds of one episode.
        lockstep: Submit each turn of all episodes together (reproducible batches; see `Lockstep`).
        engine_kwargs: The engine constructor's other keywords (`server`, `rollout.engine_options`),
            checked by the driver.
    """

    engine: type
    model_path: str
    device: str
    dtype: torch.dtype
    max_model_len: int
    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    env_spec: Any = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    limits: EpisodeLimits = EpisodeLimits()
    lockstep: bool = True
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerHealth:
    """A worker's answer to a health check.

    Attributes:
        pid, node_id: Where it runs (node_id is Ray's, "" outside Ray).
        version: The weight version its engine holds.
        in_flight: Engine requests sent and not answered yet.
        stalled_s: Seconds since the engine last made progress (a token, an answer) while requests
            were in flight; 0 when none are.
        asleep: Whether the engine is asleep (its KV cache freed).
        episodes_played: Episodes this worker process has played since it started (the driver's
            dispatch shows in it: a slow worker plays fewer).
        generated_tokens: Tokens its engine has sampled since it started, counted per engine step
            (0 for an engine that keeps no `stats`).
    """

    pid: int
    node_id: str
    version: int
    in_flight: int
    stalled_s: float
    asleep: bool
    episodes_played: int = 0
    generated_tokens: int = 0


class StaleWeightsError(EngineError):
    """A worker was asked to play with weights it does not hold (it restarted since the last push)."""


class _Watched:
    """An engine wrapper that records when the engine last made progress, for `health` (read from another thread)."""

    def __init__(self, engine):
        self.engine = engine
        self.in_flight = 0
        self.last_progress = time.monotonic()
        self._tokens: int | None = None

    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Generation:
        if self.in_flight == 0:
            self.last_progress = time.monotonic()  # stalls are counted from when work starts
        self.in_flight += 1
        try:
            return await self.engine.generate(prompt_ids, sampling)
        finally:
            self.in_flight -= 1
            self.last_progress = time.monotonic()

    def generated_tokens(self) -> int | None:
        """The engine's count of sampled tokens (it moves every model step of the embedded engine), if it keeps one."""
        return getattr(getattr(self.engine, "stats", None), "generated_tokens", None)

    def stalled_s(self) -> float:
        tokens = self.generated_tokens()
        if tokens != self._tokens:
            self._tokens = tokens
            self.last_progress = time.monotonic()
        return time.monotonic() - self.last_progress if self.in_flight else 0.0

    def update_weights(self, state_dict: Mapping[str, object], version: int) -> None:
        self.engine.update_weights(state_dict, version)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def abort(self) -> None:
        self.engine.abort()


class RolloutWorker:
    """Plays slices of a step's episodes on its own engine (a Ray actor in `cluster.mode=ray`).

    Example:
        >>> worker = RolloutWorker(setup)                                              # doctest: +SKIP
        >>> trajs, use = worker.play(specs, SamplingParams(seed=3), version=0)          # doctest: +SKIP
    """

    def __init__(self, setup: WorkerSetup):
        from transformers import AutoTokenizer

        self.setup = setup
        if setup.env_spec is not None and setup.env_id not in ENVS:
            register(setup.env_id, setup.env_spec.entry_point, **setup.env_spec.kwargs)
        probe = make(setup.env_id, **setup.env_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(setup.model_path)
        self.renderer = ChatRenderer(tokenizer, probe.tool_schemas(), template_kwargs=setup.template_kwargs)
        self.engine = _Watched(MeteredEngine(setup.engine(setup.model_path, device=setup.device, dtype=setup.dtype,
                                                          max_model_len=setup.max_model_len, **setup.engine_kwargs)))
        self.pool = EnvPool(lambda: make(setup.env_id, **setup.env_kwargs))
        self.pool.give(probe)
        self.version = 0
        self.asleep = False
        self.episodes_played = 0

    def play(self, specs: Sequence[EpisodeSpec], sampling: SamplingParams,
             version: int) -> tuple[list[Trajectory], EngineUse]:
        """Play `specs` concurrently; one trajectory each, in order, and what the engine did meanwhile.

        Args:
            specs: The episodes (whole GRPO groups, so a group's shared prompt is prefilled once), each
                with its `index`, its place in the step's whole batch, which seeds its sampling.
            sampling: Sampling parameters with the step's seed.
            version: The weight version the driver knows this worker holds (it may hold a newer one:
                a push that arrived meanwhile).

        Raises:
            StaleWeightsError: The worker holds older weights (it restarted since the last push).
        """
        from agentrl.tools.blocking import run_blocking

        if self.version < version:
            raise StaleWeightsError(f"worker holds weights version {self.version}, the driver expects {version} "
                                    "or newer")
        # A slice's trajectories must not depend on what this worker played before: prefixes cached
        # by an earlier batch were computed in another batch shape, equal only to the last bits.
        reset = getattr(self.engine.engine, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        before = self.engine.engine.use()
        trajectories = run_blocking(run_episodes(self.engine, self.pool, self.renderer, sampling, self.setup.limits,
                                                 list(specs), env_id=self.setup.env_id, lockstep=self.setup.lockstep))
        self.episodes_played += len(trajectories)
        return trajectories, self.engine.engine.use() - before

    def update_weights(self, state_dict: Mapping[str, object], version: int) -> None:
        """Copy the trainer's weights into the engine in place, between two engine steps (a play in
        flight goes on with them; a worker that sleeps keeps sleeping). A push older than the weights
        held is skipped: it arrived after a newer one."""
        if version < self.version:
            return
        self.engine.update_weights(state_dict, version)
        self.version = version

    def sleep(self) -> float:
        """Free the engine's KV cache (the trainer steps on the same device); returns the seconds it took."""
        t0 = time.perf_counter()
        self.engine.sleep()
        self.asleep = True
        return time.perf_counter() - t0

    def wake(self) -> float:
        """Undo `sleep`; returns the seconds it took."""
        t0 = time.perf_counter()
        self.engine.wake()
        self.asleep = False
        return time.perf_counter() - t0

    def abort(self) -> None:
        """End the engine's requests in flight; each episode ends with what it has (truncation `abort`)."""
        self.engine.abort()

    def health(self) -> WorkerHealth:
        """Cheap: reads counters only, never waits for the engine."""
        return WorkerHealth(pid=os.getpid(), node_id=_node_id(), version=self.version,
                            in_flight=self.engine.in_flight, stalled_s=self.engine.stalled_s(), asleep=self.asleep,
                            episodes_played=self.episodes_played, generated_tokens=self.engine.generated_tokens() or 0)

    def close(self) -> None:
        self.pool.close()
        close = getattr(self.engine.engine.engine, "close", None)  # the built-in engine joins its thread
        if close is not None:
            close()


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except ImportError:
        return ""
