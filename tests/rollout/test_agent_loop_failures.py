"""Failure classes in the agent loop: each way the infrastructure can break an episode ends that
episode (only) as a classified failure with its text, on time, and its env is closed, not reused.

Engines here implement the real Engine protocol: `ScriptedEngine` (fixed turns) and `HangingEngine`,
the built-in engine with chosen requests that never return. Envs are real `ToolEnv`s with real
tools through the real executor, or minimal envs whose `areset`/`astep` do what a test needs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from test_agent_loop import OneTurnEnv, ScriptedEngine
from transformers import AutoTokenizer

from agentrl.envs import Message, make
from agentrl.envs.core import Task
from agentrl.envs.tool_env import ToolEnv
from agentrl.errors import EngineError, InfrastructureFault
from agentrl.rollout.agent_loop import (
    EnvPool, EpisodeLimits, EpisodeSpec, failed_trajectory, run_episode, run_episodes)
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import SamplingParams
from agentrl.rollout.trajectory import FAILURE_CLASSES
from agentrl.tools.core import ToolPolicy, tool


class HangingEngine:
    """The built-in engine, except that the requests numbered in `hang_on` (0-based, in the order
    they arrive) never return; it records how many hung requests were cancelled."""

    def __init__(self, inner: EmbeddedEngine, hang_on: set[int]):
        self.inner, self.hang_on = inner, hang_on
        self.calls = self.cancelled = 0

    async def generate(self, prompt_ids, sampling):
        n, self.calls = self.calls, self.calls + 1
        if n in self.hang_on:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await self.inner.generate(prompt_ids, sampling)

    def update_weights(self, state_dict, version):
        self.inner.update_weights(state_dict, version)

    def sleep(self):
        self.inner.sleep()

    def wake(self):
        self.inner.wake()

    def abort(self):
        self.inner.abort()


class LookupEnv(ToolEnv):
    """A tool env whose one tool, `lookup`, is given by the test; any text without a call answers."""

    splits = ("train",)

    def __init__(self, lookup):
        super().__init__([lookup])
        self.closed = False

    def sample_task(self, split, seed):
        return Task(id=f"{split}-{seed}", prompt=f"Look up key {seed}.", answer="", split=split)

    def score(self, task, answer):
        return 1.0

    def close(self):
        self.closed = True


def _lookup_call(key: str = "a") -> str:
    return "<tool_call>" + json.dumps({"name": "lookup", "arguments": {"key": key}}) + "</tool_call>"


def _play(engine, env, renderer, limits=EpisodeLimits(), spec=EpisodeSpec(0)):
    return asyncio.run(run_episode(engine, env, renderer, SamplingParams(max_tokens=12), limits, spec))[0]


@pytest.fixture()
def renderer(tokenizer):
    return ChatRenderer(tokenizer, make("calculator-v0").tool_schemas())


def test_an_engine_that_raises_is_an_engine_error(renderer):
    class BrokenEngine(ScriptedEngine):
        async def generate(self, prompt_ids, sampling):
            raise EngineError("CUDA error: an illegal memory access was encountered")

    traj = _play(BrokenEngine(renderer, []), OneTurnEnv(None), renderer)
    assert traj.failure == "engine_error" and traj.truncation == "error" and traj.reward == 0.0
    assert traj.error == "EngineError: CUDA error: an illegal memory access was encountered"


def test_a_hung_engine_request_times_out_is_cancelled_and_fails_only_its_episode(tiny_model_dir, renderer):
    engine = HangingEngine(EmbeddedEngine(tiny_model_dir), hang_on={1})
    pool = EnvPool(lambda: make("calculator-v0"))
    t0 = time.perf_counter()
    trajs = asyncio.run(run_episodes(engine, pool, renderer, SamplingParams(max_tokens=8, seed=5),
                                     EpisodeLimits(2, 400, request_timeout_s=2.0), [EpisodeSpec(i) for i in range(4)]))
    engine.inner.sleep()  # joins the engine's thread (it may still finish a step, and must not outlive the process)
    assert time.perf_counter() - t0 < 2.0 + 15  # the timeout, and the other episodes' own (slack for a busy CPU)
    assert [t.failure for t in trajs].count("engine_timeout") == 1 and engine.cancelled == 1
    hung = next(t for t in trajs if t.failure)
    assert hung.error.startswith("the engine did not answer a request of ") and "within 2 s" in hung.error
    assert all(t.error is None for t in trajs if t is not hung)


def test_an_env_that_raises_an_infrastructure_fault_is_tool_infrastructure(renderer):
    async def astep(action):
        raise InfrastructureFault("sandbox pod was preempted")

    traj = _play(ScriptedEngine(renderer, ["anything"]), OneTurnEnv(astep), renderer)
    assert traj.failure == "tool_infrastructure" and traj.error == "InfrastructureFault: sandbox pod was preempted"


def test_a_tool_fault_that_outlives_its_retries_ends_the_episode_as_tool_infrastructure(renderer):
    calls = []

    @tool(policy=ToolPolicy(retries=1))
    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: The key.
        """
        calls.append(key)
        if key == "down" or len(calls) == 1:  # "up" fails once only: the executor's retry absorbs it
            raise InfrastructureFault("the key-value service is down")
        return "value"

    env = LookupEnv(lookup)
    traj = _play(ScriptedEngine(renderer, [_lookup_call("up"), "done"]), env, renderer)
    assert traj.failure is None and traj.num_turns == 2 and calls == ["up", "up"]
    traj = _play(ScriptedEngine(renderer, [_lookup_call("down"), "never played"]), env, renderer)
    assert calls[2:] == ["down", "down"]  # one attempt and one retry (ToolPolicy.retries=1)
    assert traj.failure == "tool_infrastructure" and traj.num_turns == 1 and traj.tool_errors == {"infrastructure": 1}
    assert traj.error == ("1 tool call(s) met an infrastructure fault that outlived the tool's retries: Error "
                          "(infrastructure): 'lookup' is unavailable: InfrastructureFault: the key-value service is down")


def test_a_template_that_refuses_one_conversation_fails_that_episode_only(strict_roles_model_dir):
    # This template refuses a tool result after a model turn: episodes that call a tool fail, the others do not.
    env = make("calculator-v0", system_prompt=None)
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(strict_roles_model_dir), env.tool_schemas())
    call = "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": "1 + 1"}}) + "</tool_call>"
    traj = _play(ScriptedEngine(renderer, [call, "2"]), env, renderer)
    assert traj.failure == "template_refused" and traj.num_turns == 1
    assert traj.error.startswith("ChatTemplateError: the chat template rejects a model turn followed by tool messages")
    assert _play(ScriptedEngine(renderer, ["The answer is 2."]), env, renderer).failure is None


class SlowEnv(OneTurnEnv):
    """Resets in `reset_s`, then one step that takes `step_s` and ends the episode."""

    def __init__(self, reset_s: float, step_s: float):
        self.reset_s, self.step_s = reset_s, step_s

    async def areset(self, seed=None, options=None):
        await asyncio.sleep(self.reset_s)
        return (Message("user", "hi"),), {}

    async def astep(self, action):
        await asyncio.sleep(self.step_s)
        return (), 1.0, True, False, {}

    def close(self):
        pass


def test_the_deadline_fails_a_hung_episode_and_spares_those_held_at_the_barrier_with_it(renderer):
    # In lockstep, episodes 1 and 2 wait at the barrier for episode 0, whose reset hangs until its 1 s
    # deadline. They then take 0.5 s each of their own: 1.5 s of wall time, 0.5 s of their own time.
    envs = iter([SlowEnv(30.0, 0.0), SlowEnv(0.0, 0.5), SlowEnv(0.0, 0.5)])
    pool = EnvPool(lambda: next(envs))
    t0 = time.perf_counter()
    trajs = asyncio.run(run_episodes(ScriptedEngine(renderer, ["a", "b"]), pool, renderer, SamplingParams(),
                                     EpisodeLimits(episode_timeout_s=1.0), [EpisodeSpec(i) for i in range(3)],
                                     lockstep=True))
    assert 1.5 <= time.perf_counter() - t0 < 5.0
    assert trajs[0].failure == "episode_deadline" and trajs[0].num_turns == 0
    assert trajs[0].error == ("the episode did not finish within 1 s (failures.episode_timeout_s); it was "
                              "waiting on the env's reset")
    assert [(t.failure, t.reward) for t in trajs[1:]] == [(None, 1.0), (None, 1.0)]


def test_the_deadline_abandons_a_hung_tool_and_the_env_is_closed_not_reused(renderer):
    release = threading.Event()

    @tool(policy=ToolPolicy(timeout_s=60.0))
    def lookup(key: str) -> str:
        """Look a key up (hangs on "hang" until the test ends).

        Args:
            key: The key.
        """
        if key == "hang":
            release.wait(30.0)
        return "value"

    built: list[LookupEnv] = []
    pool = EnvPool(lambda: built.append(LookupEnv(lookup)) or built[-1])
    engine = ScriptedEngine(renderer, [_lookup_call("hang"), _lookup_call("ok"), "answer"])
    t0 = time.perf_counter()
    try:
        trajs = asyncio.run(run_episodes(engine, pool, renderer, SamplingParams(), EpisodeLimits(
            episode_timeout_s=1.0), [EpisodeSpec(0), EpisodeSpec(1)]))
    finally:
        release.set()  # the abandoned tool thread returns
    assert time.perf_counter() - t0 < 5.0
    assert trajs[0].failure == "episode_deadline" and trajs[0].error.endswith("waiting on the env's step at turn 1")
    assert trajs[1].failure is None and trajs[1].num_turns == 2
    assert built[0].closed and not built[1].closed and pool._free == [built[1]]


def test_an_env_that_cannot_be_built_fails_its_episode_only(renderer):
    built = []

    def build():  # the second env cannot be built (a sandbox quota, say)
        built.append(len(built))
        if len(built) == 2:
            raise ConnectionError("no quota for a sandbox")
        return SlowEnv(0.0, 0.0)

    trajs = asyncio.run(run_episodes(ScriptedEngine(renderer, ["a"]), EnvPool(build), renderer, SamplingParams(),
                                     EpisodeLimits(), [EpisodeSpec(0), EpisodeSpec(1, group_id=4)], env_id="x-v0"))
    assert trajs[0].failure is None and trajs[0].reward == 1.0
    assert trajs[1].failure == "env_error" and trajs[1].group_id == 4 and trajs[1].env_id == "x-v0"
    assert trajs[1].error == "building the env failed: ConnectionError: no quota for a sandbox"


def test_failed_trajectory_is_empty_classified_and_never_a_success():
    traj = failed_trajectory(EpisodeSpec(seed=11, split="train", group_id=2), "worker_lost", "worker 3 died", "x-v0")
    assert (traj.failure, traj.error, traj.group_id, traj.seed, traj.task_id) == (
        "worker_lost", "worker 3 died", 2, 11, "train-11")
    assert traj.token_ids == () and traj.num_model_tokens == 0 and not traj.success and traj.truncation == "error"
    with pytest.raises(ValueError, match="not one of"):
        failed_trajectory(EpisodeSpec(0), "lost", "x")
    assert set(FAILURE_CLASSES) >= {"worker_lost", "episode_deadline", "template_refused"}


def test_a_spec_index_fixes_its_sampling_seed_so_a_replay_alone_samples_as_in_its_batch(tiny_model_dir, renderer):
    engine = EmbeddedEngine(tiny_model_dir)
    pool = EnvPool(lambda: make("calculator-v0"))
    sampling, limits = SamplingParams(max_tokens=12, seed=77), EpisodeLimits(1, 400)
    batch = asyncio.run(run_episodes(engine, pool, renderer, sampling, limits, [EpisodeSpec(i) for i in range(4)]))
    again = asyncio.run(run_episodes(engine, pool, renderer, sampling, limits, [EpisodeSpec(2, index=2)]))
    engine.sleep()  # joins the engine's thread (it may still finish a step, and must not outlive the process)
    assert again[0].token_ids == batch[2].token_ids
