"""The agent loop: one episode, token-in/token-out, and many episodes at once.

The conversation is rendered once; then each turn appends the model's tokens exactly as sampled
(loss mask 1) and the observation's tokens as rendered by the chat template (loss mask 0). The
env only ever sees text decoded from sampled tokens, and the trainer only ever sees the sampled
tokens themselves. Env or engine failures end the episode as data (`Trajectory.error`), never as an
exception out of the batch; the one exception is a chat template that rejects the conversation or
rewrites its history (`ChatTemplateError`), which would break every episode alike and so stops the run.
"""

from __future__ import annotations

import asyncio
import math
import numbers
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from agentrl.envs.core import Env, Message
from agentrl.errors import ChatTemplateError, EnvError
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import Engine, SamplingParams
from agentrl.rollout.trajectory import Trajectory


@dataclass(frozen=True)
class EpisodeLimits:
    """Bounds of one episode."""

    max_turns: int = 4
    max_total_tokens: int = 1024


@dataclass(frozen=True)
class EpisodeSpec:
    """Which task to play: split + seed pick the task, group_id ties GRPO samples together."""

    seed: int
    split: str = "train"
    group_id: int = 0


class Lockstep:
    """A turn barrier: every live episode submits its next request together, in episode order.

    With continuous batching, which requests share a forward pass depends on when env and tool
    calls return, and float results (logprobs, and so rare sampled tokens) depend slightly on the
    batch. Holding each turn's requests until all live episodes are ready makes the batches, and
    so the whole rollout, a pure function of the seeds (what exact `--resume` needs), at the cost
    of not overlapping tool time with generation.
    """

    def __init__(self, n: int):
        self.active = n
        self.waiting: dict[int, asyncio.Future] = {}

    async def wait(self, index: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[index] = fut
        self._maybe_release()
        await fut

    def leave(self) -> None:
        self.active -= 1
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self.waiting and len(self.waiting) >= self.active:
            for i in sorted(self.waiting):  # futures resolve, and so resume, in episode order
                self.waiting.pop(i).set_result(None)


class _Builder:
    """Accumulates the per-token fields of a trajectory."""

    def __init__(self, prompt: list[int]):
        self.ids = list(prompt)
        self.mask = [0] * len(prompt)
        self.logprobs = [0.0] * len(prompt)
        self.versions = [-1] * len(prompt)
        self.spans: list[tuple[int, int]] = []

    def add_model(self, ids: Sequence[int], logprobs: Sequence[float], version: int) -> None:
        start = len(self.ids)
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += logprobs
        self.versions += [version] * len(ids)
        self.spans.append((start, len(self.ids)))

    def add_observation(self, ids: Sequence[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)


async def run_episode(
    engine: Engine, env: Env, renderer: ChatRenderer, sampling: SamplingParams, limits: EpisodeLimits,
    spec: EpisodeSpec, env_id: str = "", gate: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Trajectory, list[Message]]:
    """Play one episode; return the trajectory and the conversation as messages.

    `gate`, when given, is awaited before every engine request (see `Lockstep`).
    """
    sampling = replace(sampling, stop_token_ids=tuple(sampling.stop_token_ids) or (renderer.end_of_turn_id,))
    rewards: list[float] = []
    tool_errors: Counter[str] = Counter()
    tool_calls = 0
    truncation: str | None = "max_turns"
    error: str | None = None
    messages: list[Message] = []
    b = _Builder([])
    try:
        obs, info = await env.areset(seed=spec.seed, options={"split": spec.split})
        messages = list(obs)
        b = _Builder(renderer.prompt_ids(messages))
        for turn in range(limits.max_turns):
            room = limits.max_total_tokens - len(b.ids)
            if room <= 0:
                truncation = "max_total_tokens"
                break
            # A seeded episode gives every turn its own seed, so turns do not replay one random stream.
            seed = None if sampling.seed is None else (sampling.seed + 1_000_033 * turn) % 2**63
            if gate is not None:
                await gate()
            gen = await engine.generate(b.ids, replace(sampling, max_tokens=min(sampling.max_tokens, room), seed=seed))
            b.add_model(gen.token_ids, gen.logprobs, gen.weight_version)
            text = renderer.decode(renderer.strip_end_of_turn(gen.token_ids))
            messages.append(Message("assistant", text))
            if gen.finish_reason != "stop":  # a turn cut short cannot be handed to the env as an action
                truncation = "abort" if gen.finish_reason == "abort" else (
                    "max_total_tokens" if len(gen.token_ids) >= room else "max_tokens_per_turn")
                break
            obs, reward, terminated, truncated, info = await env.astep(text)
            if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
                raise EnvError(f"env returned the reward {reward!r} at turn {turn + 1}; rewards must be finite "
                               "numbers (a NaN or inf reward would poison the whole batch's advantages)")
            rewards.append(float(reward))
            tool_errors.update(info.get("tool_errors", {}))
            tool_calls += int(info.get("tool_calls", 0))
            if terminated or truncated:
                truncation = "env" if truncated and not terminated else None
                break
            messages += obs
            obs_ids = renderer.observation_ids(obs)
            if len(b.ids) + len(obs_ids) >= limits.max_total_tokens:
                truncation = "max_total_tokens"
                break
            b.add_observation(obs_ids)
    except ChatTemplateError:
        raise  # a template the loop cannot append to breaks every episode alike: a setup error, not data
    except Exception as exc:  # noqa: BLE001 - a broken episode is data, not a crash
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
        truncation = "error"
    traj = Trajectory(
        token_ids=tuple(b.ids), loss_mask=tuple(b.mask), rollout_logprobs=tuple(b.logprobs),
        weight_versions=tuple(b.versions), prompt_length=b.spans[0][0] if b.spans else len(b.ids),
        turn_spans=tuple(b.spans), turn_rewards=tuple(rewards), reward=0.0 if error else float(sum(rewards)),
        env_id=env_id, task_id=f"{spec.split}-{spec.seed}", split=spec.split, seed=spec.seed,
        group_id=spec.group_id, num_turns=len(b.spans), truncation=truncation, error=error,
        tool_errors=dict(tool_errors), tool_calls=tool_calls,
    )
    return traj, messages


class EnvPool:
    """Reusable environment instances, one per concurrent episode."""

    def __init__(self, factory: Callable[[], Env]):
        self.factory = factory
        self._free: list[Env] = []

    def take(self) -> Env:
        return self._free.pop() if self._free else self.factory()

    def give(self, env: Env) -> None:
        self._free.append(env)

    def close(self) -> None:
        for env in self._free:
            env.close()
        self._free.clear()


async def run_episodes(
    engine: Engine, pool: EnvPool, renderer: ChatRenderer, sampling: SamplingParams, limits: EpisodeLimits,
    specs: Sequence[EpisodeSpec], env_id: str = "", lockstep: bool = False,
    indices: Sequence[int] | None = None,
) -> list[Trajectory]:
    """Run all `specs` concurrently on one engine (the engine batches their turns).

    `lockstep=True` submits each turn of all episodes together (reproducible batches; see `Lockstep`).
    `indices` are the episodes' places in the whole batch (default 0, 1, ...), which seed their
    sampling: a rollout worker playing a slice of a batch samples what one engine would have.
    """
    barrier = Lockstep(len(specs)) if lockstep else None
    places = list(indices) if indices is not None else list(range(len(specs)))

    async def one(i: int, spec: EpisodeSpec) -> Trajectory:
        env = pool.take()
        try:
            seed = None if sampling.seed is None else sampling.seed * 1_000_003 + places[i]
            seeded = sampling if seed is None else replace(sampling, seed=seed)
            gate = (lambda: barrier.wait(i)) if barrier is not None else None
            traj, _ = await run_episode(engine, env, renderer, seeded, limits, spec, env_id, gate)
            return traj
        finally:
            pool.give(env)
            if barrier is not None:
                barrier.leave()

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(specs))))
