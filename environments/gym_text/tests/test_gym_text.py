"""The toy-text games as a package: every id registered through its entry points passes the contract
checks, and each demonstrator beats random play (what the tiny-model recipe imitates)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agentrl.envs import check_env, make
from agentrl.envs.registration import ENVS

GAMES = ("gym-frozenlake-v0", "gym-cliffwalking-v0", "gym-taxi-v0", "gym-blackjack-v0")


def test_the_package_registers_every_game():
    for env_id in GAMES:
        assert ENVS.spec(env_id).entry_point.startswith("agentrl_gym_text.games:")


@pytest.mark.parametrize("env_id", GAMES)
def test_check_env_passes(env_id):
    report = check_env(env_id, episodes=4, max_turns=30)
    assert report.ok, [(r.name, r.detail) for r in report.failures]


def _mean_return(env_id: str, tool_use_prob: float, episodes: int = 30) -> float:
    env = make(env_id, max_turns=60)
    rng, total = random.Random(0), 0.0
    for seed in range(episodes):
        env.reset(seed=seed, options={"split": "test"})
        for _ in range(60):
            _, reward, term, trunc, _ = env.step(env.scripted_action(rng, tool_use_prob=tool_use_prob))
            total += reward
            if term or trunc:
                break
    return total / episodes


@pytest.mark.parametrize("env_id", GAMES)
def test_the_demonstrator_beats_random_play(env_id):
    assert _mean_return(env_id, 1.0) > _mean_return(env_id, 0.0)



@pytest.mark.parametrize("env_id", GAMES)
def test_an_invalid_reply_costs_what_an_ordinary_losing_move_does(env_id):
    """With a free invalid reply (0) GRPO on Blackjack learned within 11 steps to write `<action>`
    and never play, as every hand played loses on average. An unreadable reply must cost what the
    game's commonest losing move costs (a step, a lost hand: -1), and nothing where no move loses."""
    env = make(env_id, max_turns=60)
    rng, losses = random.Random(0), Counter()
    for seed in range(20):
        env.reset(seed=seed, options={"split": "train"})
        for _ in range(60):
            _, reward, term, trunc, _ = env.step(env.scripted_action(rng, tool_use_prob=0.0))  # random play
            losses.update([reward] if reward < 0 else [])
            if term or trunc:
                break
    commonest_loss = losses.most_common(1)[0][0] if losses else 0.0
    env.reset(seed=0, options={"split": "train"})
    _, reward, *_ = env.step("<action></action>")
    assert reward == commonest_loss == {"gym-frozenlake-v0": 0.0}.get(env_id, -1.0)
