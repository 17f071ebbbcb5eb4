"""The agent loop's token bookkeeping: masks, spans, decoding, truncation, errors as data (the failure
classes in detail: test_agent_loop_failures.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agentrl.envs import Message, make
from agentrl.rollout.agent_loop import EnvPool, EpisodeLimits, EpisodeSpec, run_episode, run_episodes
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import Generation, SamplingParams


class ScriptedEngine:
    """An Engine that 'samples' fixed turns (encoded text + end of turn), for exact bookkeeping checks.

    It implements the real Engine protocol; the embedded engine is exercised in the tests below and
    in tests/rollout/test_embedded.py.
    """

    def __init__(self, renderer: ChatRenderer, turns: list[str]):
        self.renderer = renderer
        self.turns = list(turns)
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids, sampling):
        self.prompts.append(list(prompt_ids))
        ids = self.renderer.assistant_ids(self.turns.pop(0))
        return Generation(tuple(ids), tuple(-0.5 for _ in ids), "stop", weight_version=7)

    def update_weights(self, state_dict, version): ...
    def sleep(self): ...
    def wake(self): ...
    def abort(self): ...


class SwappingEngine(ScriptedEngine):
    """Reports the weights changing from version 4 to 5 after the first 3 tokens of each turn, as an
    engine updated between two decode steps does (tests/rollout/test_workers.py plays it for real)."""

    async def generate(self, prompt_ids, sampling):
        gen = await super().generate(prompt_ids, sampling)
        n = len(gen.token_ids)
        return Generation(gen.token_ids, gen.logprobs, "stop", weight_version=4,
                          token_weight_versions=(4,) * 3 + (5,) * (n - 3))


def test_each_sampled_token_keeps_the_version_that_sampled_it(env_and_renderer):
    env, renderer = env_and_renderer
    engine = SwappingEngine(renderer, ["The answer is 12."])
    traj, _ = asyncio.run(run_episode(engine, env, renderer, SamplingParams(), EpisodeLimits(1, 2048),
                                      EpisodeSpec(seed=3, split="test")))
    [(start, end)] = traj.turn_spans
    assert end - start > 3
    assert traj.weight_versions[start:end] == (4, 4, 4) + (5,) * (end - start - 3)
    assert set(traj.weight_versions[:start]) == {-1}


def _call(expr) -> str:
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "</tool_call>"


@pytest.fixture()
def env_and_renderer(tokenizer):
    env = make("calculator-v0")
    return env, ChatRenderer(tokenizer, env.tool_schemas())


def test_multi_turn_mask_covers_exactly_sampled_tokens(env_and_renderer):
    env, renderer = env_and_renderer
    env.reset(seed=3, options={"split": "test"})
    expr, answer = env.task.metadata["expression"], env.task.answer
    turns = ["<tool_call>{broken", _call(expr), f"The answer is {answer}."]
    engine = ScriptedEngine(renderer, turns)
    traj, messages = asyncio.run(run_episode(engine, env, renderer, SamplingParams(), EpisodeLimits(4, 2048),
                                             EpisodeSpec(seed=3, split="test")))
    assert traj.num_turns == 3 and traj.reward == 1.0 and traj.truncation is None
    assert traj.tool_errors == {"parse": 1}
    # Per turn: the parse error belongs to the first turn, the reward to the last.
    assert traj.turn_tool_errors == ({"parse": 1}, {}, {}) and traj.turn_rewards == (0.0, 0.0, 1.0)
    # The masked tokens are exactly the concatenation of the sampled turns, span by span.
    sampled = [renderer.assistant_ids(t) for t in turns]
    for (start, end), ids in zip(traj.turn_spans, sampled):
        assert list(traj.token_ids[start:end]) == ids
    assert sum(traj.loss_mask) == sum(len(s) for s in sampled)
    in_spans = {i for s, e in traj.turn_spans for i in range(s, e)}
    assert [i for i, m in enumerate(traj.loss_mask) if m] == sorted(in_spans)
    assert all(traj.rollout_logprobs[i] == -0.5 and traj.weight_versions[i] == 7 for i in in_spans)
    assert all(traj.rollout_logprobs[i] == 0.0 and traj.weight_versions[i] == -1
               for i in range(len(traj.token_ids)) if i not in in_spans)
    # Each request's prompt is the whole token history so far: history is appended, never re-tokenized.
    for prompt, (start, _) in zip(engine.prompts, traj.turn_spans):
        assert prompt == list(traj.token_ids[:start])
    # The token ids decode to the conversation as the chat template renders it (observations escaped:
    # the parse error names </tool_call>, a control token of this tokenizer).
    opening = next(i for i, m in enumerate(messages) if m.role == "assistant")
    rendered = renderer.render_episode(messages[:opening], messages[opening:])
    decoded = renderer.decode(traj.token_ids)
    assert rendered.startswith(decoded) and rendered[len(decoded):] == renderer._after_turn
    assert messages[3].role == "tool" and messages[3].content.startswith("Error (parse)")
    assert messages[5] == Message("tool", answer, name="calculator", tool_call_id="call00001")


def test_max_turns_and_total_tokens_truncate(env_and_renderer):
    env, renderer = env_and_renderer
    engine = ScriptedEngine(renderer, [_call("1 + 1")] * 3)
    traj, _ = asyncio.run(run_episode(engine, env, renderer, SamplingParams(), EpisodeLimits(2, 4096),
                                      EpisodeSpec(seed=0)))
    assert traj.truncation == "max_turns" and traj.num_turns == 2 and traj.reward == 0.0
    engine = ScriptedEngine(renderer, [_call("1 + 1")] * 3)
    prompt_len = len(renderer.prompt_ids(list(env.reset(seed=0)[0])))
    traj, _ = asyncio.run(run_episode(engine, env, renderer, SamplingParams(), EpisodeLimits(5, prompt_len + 30),
                                      EpisodeSpec(seed=0)))
    assert traj.truncation == "max_total_tokens"
    assert len(traj.token_ids) <= prompt_len + 30 + len(renderer.assistant_ids(_call("1 + 1")))


class OneTurnEnv:
    """A minimal env for failure cases: says "hi", then `step` does whatever the test gives it."""

    def __init__(self, astep):
        self.astep = astep

    def tool_schemas(self):
        return []

    async def areset(self, seed=None, options=None):
        return (Message("user", "hi"),), {}


def test_env_failure_is_recorded_not_raised(env_and_renderer):
    _, renderer = env_and_renderer

    async def astep(action):
        raise RuntimeError("env bug")

    engine = ScriptedEngine(renderer, ["anything"])
    traj, _ = asyncio.run(run_episode(engine, OneTurnEnv(astep), renderer, SamplingParams(), EpisodeLimits(), EpisodeSpec(0)))
    assert traj.error and "env bug" in traj.error and traj.reward == 0.0 and traj.truncation == "error"
    assert traj.failure == "env_error"
    assert traj.num_model_tokens == len(renderer.assistant_ids("anything"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "1.0"])
def test_non_finite_or_non_numeric_reward_is_an_episode_error(env_and_renderer, bad):
    _, renderer = env_and_renderer

    async def astep(action):
        return (Message("user", "ok"),), bad, True, False, {}

    engine = ScriptedEngine(renderer, ["anything"])
    traj, _ = asyncio.run(run_episode(engine, OneTurnEnv(astep), renderer, SamplingParams(), EpisodeLimits(), EpisodeSpec(0)))
    assert traj.truncation == "error" and traj.reward == 0.0 and traj.failure == "env_error"
    assert "EnvError" in traj.error and "rewards must be finite" in traj.error


def test_many_episodes_share_engine_batches(tiny_model_dir, env_and_renderer):
    env, renderer = env_and_renderer
    engine = EmbeddedEngine(tiny_model_dir)
    pool = EnvPool(lambda: make("calculator-v0"))
    specs = [EpisodeSpec(seed=i, group_id=i // 4) for i in range(16)]
    trajs = asyncio.run(run_episodes(engine, pool, renderer, SamplingParams(max_tokens=12), EpisodeLimits(2, 400),
                                     specs, env_id="calculator-v0"))
    assert len(trajs) == 16 and all(t.error is None for t in trajs)
    first_turns = 16
    assert engine.stats.batches < first_turns  # concurrent episodes were batched together
    for t in trajs:
        assert sum(t.loss_mask) == sum(e - s for s, e in t.turn_spans)
        assert t.truncation in (None, "max_turns", "max_tokens_per_turn", "max_total_tokens")


def test_the_env_answer_key_is_recorded_and_a_non_string_key_is_an_env_error(env_and_renderer):
    env, renderer = env_and_renderer
    env.reset(seed=5, options={"split": "test"})
    answer = env.task.answer
    traj, _ = asyncio.run(run_episode(ScriptedEngine(renderer, [f"I think {answer}."]), env, renderer,
                                      SamplingParams(), EpisodeLimits(4, 2048), EpisodeSpec(seed=5, split="test")))
    assert traj.answer == answer and traj.reward == 1.0  # calculator-v0's key: the last number
    no_number, _ = asyncio.run(run_episode(ScriptedEngine(renderer, ["no idea"]), env, renderer, SamplingParams(),
                                           EpisodeLimits(4, 2048), EpisodeSpec(seed=5, split="test")))
    assert no_number.answer is None and no_number.failure is None

    class NumericKeyEnv(type(env)):
        def answer_key(self, task, answer):
            return 42  # not a str: answers could not be compared reliably

    bad = NumericKeyEnv()
    traj, _ = asyncio.run(run_episode(ScriptedEngine(renderer, ["42"]), bad, renderer, SamplingParams(),
                                      EpisodeLimits(4, 2048), EpisodeSpec(seed=5, split="test")))
    assert traj.failure == "env_error" and "info['answer_key']=42" in traj.error and traj.answer is None
