"""Seeded fuzzing of the agent loop: hostile model turns and hostile tools, many episodes at once.

Two drivers, both through the real `run_episodes`, `ToolEnv`, executor and chat renderer:

* a scripted engine (the real Engine protocol) whose every turn is drawn from a seeded mix of
  hermes calls to `hostile_tools`' zoo, agentrl's hostile model turns (`agentrl.envs.hostile`)
  and plain answers: 160 episodes of up to 4 turns, all concurrent on one event loop;
* the real built-in engine with the tiny model, each episode opening with one scripted call to a
  hostile tool, so that every later turn is sampled by the model on a prompt holding its output.

For every episode: no episode error (nothing a tool or a model turn does may break an episode;
the one failure is a tool's infrastructure fault that outlived its retries, classified as such),
a bounded time, token bookkeeping intact, and every tool message a typed message or a result.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import tests.hostile_tools as zoo
import pytest

from agentrl.envs.core import Task
from agentrl.envs.hostile import hostile_actions
from agentrl.envs.tool_env import ToolEnv
from agentrl.errors import ToolErrorKind as K
from agentrl.rollout.agent_loop import EpisodeLimits, EpisodeSpec, run_episode
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import Generation, SamplingParams

TOOLS = zoo.make_hostile_tools("_loop")
NAMES = [t.name for t in TOOLS]
TURN_BOUND_S = 2.5  # a hung call (0.2 s) + the cancellation grace, with room for a loaded machine
KINDS = {k.value for k in K}
SCRIPTED = 10**6  # the weight version of scripted turns, to tell them from the model's


@pytest.fixture(autouse=True, scope="module")
def _abandoned_threads_end():
    yield
    assert zoo.settle() == {}


class HostileEnv(ToolEnv):
    def __init__(self, tools=TOOLS):
        super().__init__(tools, max_calls_per_turn=6, max_observation_chars=16_000)

    def sample_task(self, split: str, seed: int) -> Task:
        return Task(id=f"{split}-{seed}", prompt=f"Task {seed}: break things.", answer="42", split=split)

    def score(self, task: Task, answer: str) -> float:
        return float("42" in answer)


class FuzzEngine:
    """An Engine whose turns come from a seeded RNG keyed by the request's seed (one per episode turn)."""

    def __init__(self, renderer: ChatRenderer, model_turns: list[str]):
        self.renderer = renderer
        self.model_turns = model_turns

    async def generate(self, prompt_ids, sampling):
        rng = random.Random(sampling.seed)
        r = rng.random()
        if r < 0.15:
            text = rng.choice(self.model_turns)
        elif r < 0.25:
            text = "The answer is 42."
        else:
            text, _ = zoo.random_turn(rng, 0.03, NAMES)
        # A model's text is decoded from tokens, so it never holds a lone surrogate (the zoo's turns do,
        # for the executor's sake); the tokenizer would refuse to encode one.
        ids = self.renderer.assistant_ids(text.encode("utf-8", "replace").decode("utf-8"))
        finish = "stop"
        if len(ids) > sampling.max_tokens:  # as a real engine: cut at the token budget
            ids, finish = ids[: sampling.max_tokens], "length"
        await asyncio.sleep(0)
        return Generation(tuple(ids), tuple(-1.0 for _ in ids), finish, weight_version=3)

    def update_weights(self, state_dict, version): ...
    def sleep(self): ...
    def wake(self): ...
    def abort(self): ...


def _check_trajectory(traj, messages, limits: EpisodeLimits) -> None:
    # The one failure a hostile tool may cause: an infrastructure fault that outlived its retries ends
    # the episode as an infrastructure failure (never trained on); everything else is the model's data.
    infra = traj.tool_errors.get("infrastructure", 0) > 0
    assert traj.failure == ("tool_infrastructure" if infra else None), traj.error
    assert (traj.truncation == "error") == infra
    n = len(traj.token_ids)
    assert len(traj.loss_mask) == len(traj.rollout_logprobs) == len(traj.weight_versions) == n
    spans = {i for s, e in traj.turn_spans for i in range(s, e)}
    assert [i for i, m in enumerate(traj.loss_mask) if m] == sorted(spans)
    assert set(traj.tool_errors) <= KINDS
    assert traj.truncation in (None, "max_turns", "max_total_tokens", "max_tokens_per_turn", "error")
    for m in messages:
        if m.role == "tool":
            kind = K(m.content[7 : m.content.index(")")]) if m.content.startswith("Error (") else None
            zoo.check_tool_message(m.content, kind, 16_000 + 200)


def _play_all(engine, make_env, renderer, sampling: SamplingParams, limits: EpisodeLimits, episodes: int):
    """Every episode concurrently on one loop (as `run_episodes` does): (trajectory, messages, seconds)."""

    async def one(i: int):
        t0 = time.perf_counter()
        seeded = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                seed=sampling.seed * 1_000_003 + i)
        traj, messages = await run_episode(engine, make_env(), renderer, seeded, limits,
                                           EpisodeSpec(seed=i, group_id=i // 4), "hostile")
        return traj, messages, time.perf_counter() - t0

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(episodes)))

    return asyncio.run(run_all())


def test_agent_loop_fuzz_scripted_turns(tokenizer):
    env = HostileEnv()
    renderer = ChatRenderer(tokenizer, env.tool_schemas())
    model_turns = [a for _, a in hostile_actions(env.tool_schemas()) if len(a) < 200_000]
    limits = EpisodeLimits(max_turns=4, max_total_tokens=40_000)
    played = _play_all(FuzzEngine(renderer, model_turns), HostileEnv, renderer,
                       SamplingParams(max_tokens=8_000, seed=2024), limits, 160)
    for traj, messages, _ in played:
        _check_trajectory(traj, messages, limits)
    assert sum(t.num_turns for t, _, _ in played) >= 300  # several hundred hostile turns were played
    assert max(s for _, _, s in played) < limits.max_turns * TURN_BOUND_S, sorted(s for _, _, s in played)[-3:]
    assert sum(t.tool_errors.get("timeout", 0) for t, _, _ in played) > 0  # hangs were met, and survived


class FirstTurnScripted:
    """The real engine, except that each episode's first turn is a scripted call to a hostile tool:
    every later turn is the real model's, sampled on a prompt that holds what the hostile tool did."""

    def __init__(self, real, renderer: ChatRenderer, openings: set[tuple[int, ...]]):
        self.real, self.renderer, self.openings = real, renderer, openings

    async def generate(self, prompt_ids, sampling):
        if tuple(prompt_ids) not in self.openings:
            return await self.real.generate(prompt_ids, sampling)
        name, args, _ = zoo.random_call(random.Random(sampling.seed), 0.2, NAMES)
        text = "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"
        ids = self.renderer.assistant_ids(text)
        return Generation(tuple(ids), tuple(-1.0 for _ in ids), "stop", weight_version=SCRIPTED)


def test_agent_loop_fuzz_real_model(tiny_model_dir, tokenizer):
    from agentrl.rollout.backends.embedded import EmbeddedEngine

    def make_env():  # small observations, so the model's 1024-token context still has room to answer
        env = HostileEnv()
        env.executor.max_calls_per_turn, env.executor.max_observation_chars = 2, 1000
        return env

    renderer = ChatRenderer(tokenizer, make_env().tool_schemas())
    episodes = 24
    openings = set()
    for i in range(episodes):
        obs, _ = make_env().reset(seed=i, options={"split": "train"})
        openings.add(tuple(renderer.prompt_ids(list(obs))))
    engine = FirstTurnScripted(EmbeddedEngine(tiny_model_dir), renderer, openings)
    limits = EpisodeLimits(max_turns=3, max_total_tokens=1024)
    played = _play_all(engine, make_env, renderer, SamplingParams(max_tokens=40, temperature=1.0, seed=11),
                       limits, episodes)
    for traj, messages, seconds in played:
        _check_trajectory(traj, messages, limits)
        assert seconds < limits.max_turns * TURN_BOUND_S + 30
    answered = [t for t, _, _ in played if t.num_turns >= 2]
    assert len(answered) >= episodes // 2  # the model sampled on hostile tool output in most episodes
    assert all(t.weight_versions[t.turn_spans[1][0]] != SCRIPTED for t in answered)  # those turns are the model's
