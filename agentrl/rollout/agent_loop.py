"""The agent loop: one episode, token-in/token-out, and many episodes at once.

The conversation is rendered once; then each turn appends the model's tokens exactly as sampled
(loss mask 1) and the observation's tokens as rendered by the chat template (loss mask 0). The
env only ever sees text decoded from sampled tokens, and the trainer only ever sees the sampled
tokens themselves.

Nothing that goes wrong in an episode escapes it as an exception: what the policy did (a bad tool
call, a wrong answer, running out of turns) ends it as usual, and what the infrastructure did ends
it as a classified failure (`Trajectory.failure`, one of `FAILURE_CLASSES`, with its text in
`Trajectory.error`): the env raised (`env_error`), the engine raised or did not answer in time
(`engine_error`, `engine_timeout`), a tool's infrastructure fault outlived its retries
(`tool_infrastructure`), the chat template refused this conversation (`template_refused`), or the
whole episode passed its deadline (`episode_deadline`). The driver decides what each class costs
(retry, drop, ...; see `agentrl.driver.failures`); an env that failed is closed, not reused.

A template that cannot render the env's conversations at all is refused before the run, by the
rollout side's checks on the probe conversation and the first tasks' openings; a template that
refuses one conversation mid-run fails that episode only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from agentrl.envs.core import Env, Message
from agentrl.errors import ChatTemplateError, EnvError, InfrastructureFault, ToolErrorKind
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import Engine, Generation, SamplingParams
from agentrl.rollout.trajectory import Trajectory

logger = logging.getLogger(__name__)

Gate = Callable[[], Awaitable[None]]
_INFRA = ToolErrorKind.INFRASTRUCTURE.value


@dataclass(frozen=True)
class EpisodeLimits:
    """Bounds of one episode.

    `episode_timeout_s` bounds the whole episode (reset, every turn, every tool call) but not the
    time it waits at a `Lockstep` barrier for the other episodes; `request_timeout_s` bounds one
    engine request. None: no bound.
    """

    max_turns: int = 4
    max_total_tokens: int = 1024
    episode_timeout_s: float | None = None
    request_timeout_s: float | None = None


@dataclass(frozen=True)
class EpisodeSpec:
    """Which task to play: split + seed pick the task, group_id ties GRPO samples together.

    `env` names the env of a multi-task run that plays it (the driver routes it). `index` fixes the
    episode's sampling seed (the batch seed's stream at this index), so a spec
    replayed alone (a retry, or on another worker) samples as it did in its first batch; None:
    its position in the list given to `run_episodes`.
    """

    seed: int
    split: str = "train"
    group_id: int = 0
    index: int | None = None
    env: str = ""  # which env of a multi-task run plays it (its name); "" for a run's only env


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
        try:
            await fut
        finally:  # cancelled while waiting: no longer counted as ready
            if self.waiting.get(index) is fut:
                del self.waiting[index]

    def leave(self) -> None:
        self.active -= 1
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self.waiting and len(self.waiting) >= self.active:
            for i in sorted(self.waiting):  # futures resolve, and so resume, in episode order
                fut = self.waiting.pop(i)
                if not fut.done():
                    fut.set_result(None)


class _Builder:
    """Accumulates the per-token fields of a trajectory."""

    def __init__(self, prompt: list[int]):
        self.ids = list(prompt)
        self.mask = [0] * len(prompt)
        self.logprobs = [0.0] * len(prompt)
        self.versions = [-1] * len(prompt)
        self.spans: list[tuple[int, int]] = []

    def add_model(self, ids: Sequence[int], logprobs: Sequence[float], versions: Sequence[int]) -> None:
        start = len(self.ids)
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += logprobs
        self.versions += versions  # per token: weights pushed mid-turn change it
        self.spans.append((start, len(self.ids)))

    def add_observation(self, ids: Sequence[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)


class _Failed(Exception):
    """Ends an episode as a classified failure (never leaves `run_episode`)."""

    def __init__(self, failure: str, text: str):
        super().__init__(text)
        self.failure, self.text = failure, text


@dataclass
class _Episode:
    """What one episode has gathered so far, and which part of the loop it is in (for classifying)."""

    b: _Builder = field(default_factory=lambda: _Builder([]))
    messages: list[Message] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turn_tool_errors: list[dict[str, int]] = field(default_factory=list)
    tool_errors: Counter[str] = field(default_factory=Counter)
    tool_calls: int = 0
    truncation: str | None = "max_turns"
    phase: str = "reset"  # whose call is running: reset | engine | env | template
    turn: int = 0  # 0-based model turn the loop is in
    failure: str | None = None
    error: str | None = None
    answer: str | None = None

    def fail(self, failure: str, text: str) -> None:
        self.failure, self.error, self.truncation = failure, text, "error"

    def trajectory(self, spec: EpisodeSpec, env_id: str) -> Trajectory:
        b = self.b
        return Trajectory(
            token_ids=tuple(b.ids), loss_mask=tuple(b.mask), rollout_logprobs=tuple(b.logprobs),
            weight_versions=tuple(b.versions), prompt_length=b.spans[0][0] if b.spans else len(b.ids),
            turn_spans=tuple(b.spans), turn_rewards=tuple(self.rewards),
            reward=0.0 if self.failure else float(sum(self.rewards)), env_id=env_id,
            task_id=f"{spec.split}-{spec.seed}", split=spec.split, seed=spec.seed, group_id=spec.group_id,
            num_turns=len(b.spans), truncation=self.truncation, error=self.error, tool_errors=dict(self.tool_errors),
            tool_calls=self.tool_calls, failure=self.failure, answer=None if self.failure else self.answer,
            turn_tool_errors=tuple(self.turn_tool_errors))


def failed_trajectory(spec: EpisodeSpec, failure: str, text: str, env_id: str = "") -> Trajectory:
    """An episode that failed before it produced anything (its worker died, its env could not be built).

    Example:
        >>> failed_trajectory(EpisodeSpec(seed=7), "worker_lost", "worker 3 died").failure
        'worker_lost'
    """
    ep = _Episode()
    ep.fail(failure, text)
    return ep.trajectory(spec, env_id)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _classify(exc: Exception, phase: str) -> str:
    if isinstance(exc, ChatTemplateError) or phase == "template":
        return "template_refused"
    if isinstance(exc, InfrastructureFault):
        return "tool_infrastructure"
    return "engine_error" if phase == "engine" else "env_error"


_WAITING = {"reset": "the env's reset", "engine": "the engine", "env": "the env's step", "template": "the chat template"}


async def run_episode(
    engine: Engine, env: Env, renderer: ChatRenderer, sampling: SamplingParams, limits: EpisodeLimits,
    spec: EpisodeSpec, env_id: str = "", gate: Gate | None = None,
) -> tuple[Trajectory, list[Message]]:
    """Play one episode; return the trajectory and the conversation as messages.

    Never raises for what an env, engine, tool or template does: such an episode comes back
    with `failure` and `error` set (see the module docstring). `gate`, when given, is awaited
    before every engine request (see `Lockstep`); time spent there does not count towards
    `limits.episode_timeout_s`.
    """
    ep = _Episode()
    deadline = asyncio.timeout(limits.episode_timeout_s)
    try:
        async with deadline:
            await _play(engine, env, renderer, sampling, limits, spec, ep, _paused(gate, deadline))
    except _Failed as exc:
        ep.fail(exc.failure, exc.text)
    except Exception as exc:  # noqa: BLE001 - a broken episode is data, not a crash
        if deadline.expired():  # the hung call (engine request, tool thread) was cancelled or abandoned
            ep.fail("episode_deadline", f"the episode did not finish within {limits.episode_timeout_s:g} s "
                    f"(failures.episode_timeout_s); it was waiting on {_WAITING[ep.phase]}"
                    + (f" at turn {ep.turn + 1}" if ep.phase != "reset" else ""))
        else:
            ep.fail(_classify(exc, ep.phase), _describe(exc))
    return ep.trajectory(spec, env_id), ep.messages


def _paused(gate: Gate | None, deadline: asyncio.Timeout) -> Gate | None:
    """`gate` with the episode's deadline stopped while it waits: a neighbour that hangs must not
    spend the deadlines of the episodes held at the barrier with it."""
    if gate is None:
        return None

    async def wait() -> None:
        when = deadline.when()
        if when is None:
            await gate()
            return
        loop = asyncio.get_running_loop()
        deadline.reschedule(None)
        start = loop.time()
        try:
            await gate()
        finally:
            deadline.reschedule(when + loop.time() - start)

    return wait


async def _generate(engine: Engine, ids: list[int], sampling: SamplingParams, timeout_s: float | None) -> Generation:
    request = asyncio.timeout(timeout_s)
    try:
        async with request:
            return await engine.generate(ids, sampling)  # cancelled at the timeout: the engine drops it
    except TimeoutError:
        if not request.expired():
            raise
        raise _Failed("engine_timeout", f"the engine did not answer a request of {len(ids)} prompt tokens within "
                      f"{timeout_s:g} s (failures.request_timeout_s); the request was cancelled") from None


async def _play(engine: Engine, env: Env, renderer: ChatRenderer, sampling: SamplingParams, limits: EpisodeLimits,
                spec: EpisodeSpec, ep: _Episode, gate: Gate | None) -> None:
    """The turns of one episode, filling `ep`; `ep.phase` says whose call is running."""
    sampling = replace(sampling, stop_token_ids=tuple(sampling.stop_token_ids) or (renderer.end_of_turn_id,))
    obs, info = await env.areset(seed=spec.seed, options={"split": spec.split})
    ep.messages = list(obs)
    ep.phase = "template"
    ep.b = b = _Builder(renderer.prompt_ids(ep.messages))
    for turn in range(limits.max_turns):
        ep.turn = turn
        room = limits.max_total_tokens - len(b.ids)
        if room <= 0:
            ep.truncation = "max_total_tokens"
            return
        # A seeded episode gives every turn its own seed, so turns do not replay one random stream.
        seed = None if sampling.seed is None else (sampling.seed + 1_000_033 * turn) % 2**63
        if gate is not None:
            await gate()
        ep.phase = "engine"
        gen = await _generate(engine, b.ids, replace(sampling, max_tokens=min(sampling.max_tokens, room), seed=seed),
                              limits.request_timeout_s)
        b.add_model(gen.token_ids, gen.logprobs, gen.versions())
        text = renderer.decode(renderer.strip_end_of_turn(gen.token_ids))
        ep.messages.append(Message("assistant", text))
        if gen.finish_reason != "stop":  # a turn cut short cannot be handed to the env as an action
            ep.truncation = "abort" if gen.finish_reason == "abort" else (
                "max_total_tokens" if len(gen.token_ids) >= room else "max_tokens_per_turn")
            return
        ep.phase = "env"
        obs, reward, terminated, truncated, info = await env.astep(text)
        if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
            raise EnvError(f"env returned the reward {reward!r} at turn {turn + 1}; rewards must be finite "
                           "numbers (a NaN or inf reward would poison the whole batch's advantages)")
        ep.rewards.append(float(reward))
        errors = {str(k): int(v) for k, v in info.get("tool_errors", {}).items()}
        ep.turn_tool_errors.append(errors)
        ep.tool_errors.update(errors)
        ep.tool_calls += int(info.get("tool_calls", 0))
        _check_infrastructure(info, obs)
        if terminated or truncated:
            ep.truncation = "env" if truncated and not terminated else None
            ep.answer = _answer_key(info, turn)
            return
        ep.messages += obs
        ep.phase = "template"
        obs_ids = renderer.observation_ids(obs)
        if len(b.ids) + len(obs_ids) >= limits.max_total_tokens:
            ep.truncation = "max_total_tokens"
            return
        b.add_observation(obs_ids)


def _answer_key(info: dict, turn: int) -> str | None:
    """The final step's `info["answer_key"]`: answers with equal keys are the same answer (maj@k votes on them)."""
    key = info.get("answer_key")
    if key is not None and not isinstance(key, str):
        raise EnvError(f"env returned info['answer_key']={key!r} at turn {turn + 1}; an answer key must be a str "
                       "(answers with equal keys count as the same answer) or None")
    return key


def _check_infrastructure(info: dict, obs: Sequence[Message]) -> None:
    """A tool call whose infrastructure fault outlived its retries (the executor's `infrastructure`
    error) ends the episode: the model did nothing wrong, and what follows would be trained on."""
    count = int(info.get("tool_errors", {}).get(_INFRA, 0))
    if count:
        shown = next((m.content for m in obs if m.content.startswith(f"Error ({_INFRA})")), "")
        raise _Failed("tool_infrastructure", f"{count} tool call(s) met an infrastructure fault that outlived the "
                      f"tool's retries: {shown[:400]}")


class EnvPool:
    """Reusable environment instances, one per concurrent episode."""

    def __init__(self, factory: Callable[[], Env]):
        self.factory = factory
        self._free: list[Env] = []

    def take(self) -> Env:
        return self._free.pop() if self._free else self.factory()

    def give(self, env: Env) -> None:
        self._free.append(env)

    def discard(self, env: Env) -> None:
        """Close an env whose episode failed instead of reusing it: an env that raised, or whose
        tool hung, may be broken (and closing it stops what it started, a sandbox process say)."""
        try:
            env.close()
        except Exception as exc:  # noqa: BLE001 - the episode's failure is what is reported
            logger.warning("closing a failed episode's env raised %s", _describe(exc))

    def close(self) -> None:
        for env in self._free:
            env.close()
        self._free.clear()


async def run_episodes(
    engine: Engine, pool: EnvPool, renderer: ChatRenderer, sampling: SamplingParams, limits: EpisodeLimits,
    specs: Sequence[EpisodeSpec], env_id: str = "", lockstep: bool = False,
) -> list[Trajectory]:
    """Run all `specs` concurrently on one engine (the engine batches their turns); one trajectory
    per spec, in order, failed ones included (see `run_episode`). An env whose episode failed is
    closed, not given back to the pool.

    `lockstep=True` submits each turn of all episodes together (reproducible batches; see `Lockstep`).
    """
    barrier = Lockstep(len(specs)) if lockstep else None

    async def one(i: int, spec: EpisodeSpec) -> Trajectory:
        traj: Trajectory | None = None
        try:
            try:
                env = pool.take()
            except Exception as exc:  # noqa: BLE001 - an env constructor that fails mid-run fails this episode
                return failed_trajectory(spec, "env_error", f"building the env failed: {_describe(exc)}", env_id)
            try:
                k = i if spec.index is None else spec.index
                seeded = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed * 1_000_003 + k)
                gate = (lambda: barrier.wait(i)) if barrier is not None else None
                traj, _ = await run_episode(engine, env, renderer, seeded, limits, spec, env_id, gate)
                return traj
            finally:
                (pool.give if traj is not None and traj.failure is None else pool.discard)(env)
        finally:
            if barrier is not None:
                barrier.leave()

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(specs))))
