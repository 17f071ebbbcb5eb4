"""Gymnasium adapters: text in, text out, reward and flags passed through, invalid actions
explained without ending the episode, tasks determined by seed, splits disjoint."""

from __future__ import annotations

import json
import random
from collections import deque

import pytest

from agentrl.envs import GymTextEnv, make
from agentrl_gym_text.games import FrozenLakeTextEnv
from agentrl.errors import EnvError

FROZEN_HELP = "Valid actions: left (0), down (1), right (2), up (3)."


def _move_call(direction: str) -> str:
    return "<tool_call>" + json.dumps({"name": "move", "arguments": {"direction": direction}}) + "</tool_call>"


def test_frozenlake_stock_map_solved_with_every_action_form():
    env = make("gym-frozenlake-v0", random_map=False)  # SFFF / FHFH / FFFH / HFFG, not slippery
    obs, info = env.reset(seed=0)
    assert "You (A) are at row 0, column 0.\nA F F F\nF H F H\nF F F H\nH F F G" in obs[-1].content
    assert FROZEN_HELP in obs[-1].content
    # the shortest safe path: down, down, right, right, down, right
    turns = ["<action>down</action>", "<action>1</action>", _move_call("right"), "move(right)",
             'move(direction="down")', "Right."]
    rewards = []
    for i, action in enumerate(turns):
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        assert info["invalid_action"] is False and not truncated
        assert terminated == (i == len(turns) - 1)
    assert rewards == [0.0] * 5 + [1.0]
    assert obs[0].role == "user" and "You reached the goal!" in obs[0].content
    with pytest.raises(EnvError, match="finished episode"):
        env.step("<action>left</action>")


def test_tool_call_actions_answer_as_tool_messages():
    env = make("gym-frozenlake-v0", random_map=False)
    env.reset(seed=0)
    obs, *_ = env.step(_move_call("down"))
    assert (obs[0].role, obs[0].name) == ("tool", "move") and "row 1, column 0" in obs[0].content
    assert env.tool_schemas()[0]["function"]["parameters"]["properties"]["direction"]["enum"] == [
        "left", "down", "right", "up"]


@pytest.mark.parametrize("action,fragment", [
    ("<action>fly</action>", "'fly' is not an action"),
    ("<action>4</action>", "'4' is not an action"),
    ("<action>-1</action>", "'-1' is not an action"),
    ("<action>" + "9" * 5000 + "</action>", "is not an action"),
    ("<action>up</action> <action>down</action>", "found 2 <action> tags"),
    ("", "no action found"),
    ("I would like to go left eventually", "no action found"),
    ('<tool_call>{"name": "jump", "arguments": {"direction": "up"}}</tool_call>', "there is no tool 'jump'"),
    ('<tool_call>{"name": "move", "arguments": {"direction": 3.5}}</tool_call>', "needs a string argument"),
    ('<tool_call>{"name": "move", "arguments": {</tool_call>', "could not be read"),
    (_move_call("up") + _move_call("down"), "found 2 tool calls"),
    ("move(up) then move(down)", "found 2 calls of move"),
    ("A" * 1_000_000, "no action found"),
])
def test_invalid_actions_are_explained_and_the_episode_goes_on(action, fragment):
    env = make("gym-frozenlake-v0", random_map=False)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(action)
    text = obs[0].content
    assert text.startswith("Invalid action: ") and fragment in text and FROZEN_HELP in text
    assert len(text) < 400  # a hostile turn is not echoed back in full
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["invalid_action"] is True and info["invalid_actions"] == 1
    obs, _, _, _, info = env.step("<action>down</action>")  # the game state did not move
    assert "row 1, column 0" in obs[0].content and info["invalid_actions"] == 1


def test_turn_limit_truncates_and_counts_invalid_turns():
    env = make("gym-frozenlake-v0", random_map=False, max_turns=3)
    env.reset(seed=0)
    results = [env.step(a) for a in ("nope", "<action>down</action>", "nope")]
    assert [r[3] for r in results] == [False, False, True] and not any(r[2] for r in results)
    assert results[-1][4]["invalid_actions"] == 2 and "turn limit" in results[-1][0][0].content
    with pytest.raises(EnvError, match="finished episode"):
        env.step("<action>down</action>")


def test_invalid_action_reward_is_given_and_said():
    env = make("gym-frozenlake-v0", random_map=False, max_turns=2, invalid_action_reward=-0.5)
    env.reset(seed=0)
    obs, reward, _, truncated, _ = env.step("nope")
    assert (reward, truncated) == (-0.5, False) and "Reward: -0.5." in obs[0].content
    _, reward, _, truncated, _ = env.step("nope")  # the last turn: truncated, and still costed
    assert (reward, truncated) == (-0.5, True)
    with pytest.raises(EnvError, match="finite"):
        make("gym-frozenlake-v0", invalid_action_reward=float("nan"))


def _bfs_steps(desc: list[str]) -> int:
    """Reference: the fewest moves from S to G on a FrozenLake map, around the holes."""
    n = len(desc)
    seen, queue = {(0, 0): 0}, deque([(0, 0)])
    while queue:
        r, c = queue.popleft()
        for dr, dc in ((0, -1), (1, 0), (0, 1), (-1, 0)):
            nr, nc = min(max(r + dr, 0), n - 1), min(max(c + dc, 0), n - 1)
            if (nr, nc) not in seen and desc[nr][nc] != "H":
                seen[(nr, nc)] = seen[(r, c)] + 1
                if desc[nr][nc] == "G":
                    return seen[(nr, nc)]
                queue.append((nr, nc))
    raise AssertionError("generate_random_map promises a path")


@pytest.mark.parametrize("size", [4, 6])
def test_expert_reaches_the_goal_on_random_maps_by_a_shortest_path(size):
    env = FrozenLakeTextEnv(size=size)
    rng = random.Random(0)
    for seed in range(15):
        env.reset(seed=seed, options={"split": "test"})
        desc = [b"".join(row).decode() for row in env.inner.unwrapped.desc]
        total, turns, done = 0.0, 0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.scripted_action(rng))
            total, turns, done = total + reward, turns + 1, terminated or truncated
        assert (total, turns) == (1.0, _bfs_steps(desc)), (seed, desc)


def test_tasks_are_determined_by_seed_and_splits_are_disjoint():
    a, b = make("gym-frozenlake-v0"), make("gym-frozenlake-v0")
    for seed in range(20):
        for split in ("train", "test"):
            ra, rb = a.reset(seed=seed, options={"split": split}), b.reset(seed=seed, options={"split": split})
            assert ra == rb
    maps = {s: {a.reset(seed=i, options={"split": s})[0][-1].content for i in range(150)} for s in ("train", "test")}
    assert not maps["train"] & maps["test"]
    assert len(maps["train"]) > 50 and len(maps["test"]) > 50
    # same seed and the same actions, same episode (slippery ice is driven by the seeded RNG)
    runs = []
    for _ in range(2):
        env = make("gym-frozenlake-v0", is_slippery=True)
        env.reset(seed=7)
        runs.append([env.step(f"<action>{d}</action>") for d in ("right", "down", "right", "down")])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("env_id,fragment", [
    ("gym-taxi-v0", "Passenger: waiting at"), ("gym-blackjack-v0", "Your cards: "),
    ("gym-cliffwalking-v0", "S C C C C C C C C C C G"),
])
def test_other_games_render_and_their_experts_finish(env_id, fragment):
    env = make(env_id)
    obs, _ = env.reset(seed=3)
    assert fragment in obs[-1].content
    rng, done, turns = random.Random(0), False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.scripted_action(rng))
        done, turns = terminated or truncated, turns + 1
        assert isinstance(reward, float) and not info["invalid_action"]
    assert terminated and turns < 40


def test_generic_adapter_and_non_discrete_envs():
    env = GymTextEnv("CartPole-v1", max_turns=5)
    obs, _ = env.reset(seed=0)
    assert "Observation: [" in obs[-1].content and "Valid actions: 0, 1." in obs[-1].content
    obs, reward, terminated, truncated, info = env.step("<action>1</action>")
    assert reward == 1.0 and info["action"] == "1" and "You chose 1. Reward: 1." in obs[0].content
    with pytest.raises(EnvError, match="needs a Discrete one"):
        GymTextEnv("Pendulum-v1")
    with pytest.raises(EnvError, match="unknown split 'dev'"):
        env.reset(seed=0, options={"split": "dev"})
