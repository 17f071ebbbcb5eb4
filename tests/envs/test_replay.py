"""Record and replay: a FrozenLake and a calculator episode replay bit for bit with no engine, no
Gymnasium env and no tool; a diverging action, seed or call is a clear error."""

from __future__ import annotations

import asyncio
import json
import math
import random

import gymnasium
import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv
from gymnasium.utils.env_checker import data_equivalence

import agentrl_calculator.env as calculator_module
from agentrl.envs import Env, Message, RecordingEnv, ReplayDivergence, ReplayEnv, make
from agentrl.envs.replay import decode, encode
from agentrl.errors import EnvError


def _identical(a, b) -> bool:
    """Equal values of identical types all the way down (exact floats, tuples stay tuples)."""
    return data_equivalence(a, b, exact=True) and json.dumps(encode(a)) == json.dumps(encode(b))


def _record_frozenlake(path):
    env = RecordingEnv(make("gym-frozenlake-v0"), path)
    rng = random.Random(0)
    actions = ["<action>sideways</action>"]  # an invalid turn is part of the episode too
    results = [env.reset(seed=11, options={"split": "test"}), env.step(actions[0])]
    while not (results[-1][2] or results[-1][3]):
        actions.append(env.scripted_action(rng))  # looked up on the wrapped env
        results.append(env.step(actions[-1]))
    env.close()
    return actions, results


def _forbid(monkeypatch, target, name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} ran during replay")

    monkeypatch.setattr(target, name, boom)


def test_frozenlake_episode_replays_bit_for_bit_without_gymnasium(tmp_path, monkeypatch):
    path = tmp_path / "frozenlake.jsonl"
    actions, recorded = _record_frozenlake(path)
    assert recorded[-1][1] == 1.0 and recorded[1][4]["invalid_action"] is True
    _forbid(monkeypatch, gymnasium, "make")
    _forbid(monkeypatch, FrozenLakeEnv, "step")
    _forbid(monkeypatch, FrozenLakeEnv, "reset")
    replay = ReplayEnv(path)
    assert replay.recorded_env == "agentrl_gym_text.games:FrozenLakeTextEnv"
    assert replay.tool_schemas()[0]["function"]["name"] == "move"
    replayed = [replay.reset(seed=11, options={"split": "test"})] + [replay.step(a) for a in actions]
    assert len(replayed) == len(recorded)
    for got, want in zip(replayed, recorded):
        assert _identical(got, want)
    with pytest.raises(EnvError, match="finished episode"):
        replay.step(actions[-1])
    # recording the replay writes the same events, byte for byte
    again = RecordingEnv(ReplayEnv(path), tmp_path / "again.jsonl")
    again.reset(seed=11, options={"split": "test"})
    for a in actions:
        again.step(a)
    again.close()
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def _play_calculator(env, rng):
    results = [env.reset(seed=5, options={"split": "test"})]
    actions, last = [], None
    while not (len(results) > 1 and results[-1][2]):
        actions.append(env.scripted_action(rng, last_tool_output=last))
        results.append(env.step(actions[-1]))
        last = results[-1][0][0].content if results[-1][0] else None
    return actions, results


def test_calculator_episode_replays_without_running_the_tool(tmp_path, monkeypatch):
    path = tmp_path / "calculator.jsonl"
    env = RecordingEnv(make("calculator-v0"), path)
    actions, recorded = _play_calculator(env, random.Random(0))
    env.close()
    assert actions[0].startswith("<tool_call>") and recorded[1][0][0].role == "tool" and recorded[-1][1] == 1.0
    _forbid(monkeypatch, calculator_module, "evaluate")  # the calculator tool calls this
    replay = ReplayEnv(path)
    replayed = [replay.reset(seed=5, options={"split": "test"})] + [replay.step(a) for a in actions]
    for got, want in zip(replayed, recorded, strict=True):
        assert _identical(got, want)
    with pytest.raises(AssertionError, match="evaluate ran"):  # the guard itself works
        calculator_module.calculator.fn("1 + 1")


def test_async_recording_inside_an_event_loop(tmp_path):
    """The rollout loop awaits areset/astep; ToolEnv.step would refuse inside a running loop."""
    path = tmp_path / "async.jsonl"

    async def play():
        env = RecordingEnv(make("calculator-v0"), path)
        await env.areset(seed=2, options={"split": "train"})
        call = env.scripted_action(random.Random(0))
        out = await env.astep(call)
        await env.astep(f"The answer is {out[0][0].content}.")
        env.close()
        return call

    call = asyncio.run(play())
    replay = ReplayEnv(path)
    asyncio.run(replay.areset(seed=2, options={"split": "train"}))
    assert asyncio.run(replay.astep(call))[0][0].role == "tool"


def test_divergence_is_a_clear_error(tmp_path):
    path = tmp_path / "frozenlake.jsonl"
    actions, _ = _record_frozenlake(path)
    replay = ReplayEnv(path)
    with pytest.raises(ReplayDivergence, match=r"reset with seed=11 options=\{'split': 'test'\}, not seed=12"):
        replay.reset(seed=12, options={"split": "test"})
    with pytest.raises(ReplayDivergence, match="holds 1 episode"):
        replay.reset(seed=11, options={"split": "test"})
    replay = ReplayEnv(path)
    replay.reset(seed=11, options={"split": "test"})
    with pytest.raises(ReplayDivergence, match=r"step 1 of episode 0 .* they differ from character 8: recorded "
                                               r"'<action>sideways</action>', got '<action>up</action>'"):
        replay.step("<action>up</action>")
    assert issubclass(ReplayDivergence, EnvError)


class Fragile(Env):
    """Raises on "boom": the recording keeps the exception and the replay raises it again."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return (Message("user", "go"),), {}

    def step(self, action):
        if action == "boom":
            raise ValueError("cannot handle boom")
        return (), 0.5, False, False, {"echo": action}


def test_recorded_exceptions_replay_as_env_errors(tmp_path):
    path = tmp_path / "fragile.jsonl"
    env = RecordingEnv(Fragile(), path)
    env.reset(seed=0)
    env.step("fine")
    with pytest.raises(ValueError):
        env.step("boom")
    env.close()
    replay = ReplayEnv(path)
    replay.reset(seed=0)
    assert replay.step("fine")[4] == {"echo": "fine"}
    with pytest.raises(EnvError, match=r"\(replayed\) step\(\) raised ValueError: cannot handle boom"):
        replay.step("boom")


@pytest.mark.parametrize("value", [
    (Message("tool", "4", name="calc", tool_call_id="call_0"),), [1, (2, [3.5])], {"a": {"b": (None, True)}},
    {1: "int key", (2, 3): "tuple key"}, {"__tuple__": "a key that looks like a tag"}, -0.0, 0.1 + 0.2, 1e308,
    np.arange(6, dtype=np.int16).reshape(2, 3), np.float32(0.1), np.bool_(True), "caf\udce9 \x00 <|im_end|>",
])
def test_encode_round_trips_exactly(value):
    back = decode(json.loads(json.dumps(encode(value))))
    assert type(back) is type(value) and _identical(back, value)
    if isinstance(value, np.ndarray):
        assert back.dtype == value.dtype and back.shape == value.shape


def test_nan_rewards_round_trip_and_unknown_types_are_refused():
    assert math.isnan(decode(json.loads(json.dumps(encode(float("nan"))))))
    with pytest.raises(EnvError, match=r"cannot record a value of type set at \$.info.seen"):
        encode({"info": {"seen": {1, 2}}})
