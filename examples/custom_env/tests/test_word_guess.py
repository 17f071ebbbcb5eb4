"""word-guess-v0: the stateful guess tool, its rewards and end, disjoint splits, and the contract checks."""

from __future__ import annotations

import json
import random

import pytest

from agentrl.envs import check_env, make
from agentrl_word_guess.env import WORDS, WordGuessEnv, _is_test, feedback


def _guess(word: str) -> str:
    return "<tool_call>" + json.dumps({"name": "guess", "arguments": {"word": word}}) + "</tool_call>"


def test_feedback_marks_each_letter():
    # against "apple": a, p in place (G); e is in apple but at 4, not 2 (Y); z absent (.); l is at 3, not 4 (Y)
    assert feedback("apezl", "apple") == "GGY.Y"
    assert feedback("apple", "apple") == "GGGGG"


def test_a_right_guess_pays_one_and_ends_the_episode():
    env = make("word-guess-v0")
    env.reset(seed=3, options={"split": "train"})
    secret = env.task.answer
    assert sorted(env.task.metadata["shuffled"]) == sorted(secret)
    obs, reward, term, _, info = env.step(_guess("zzzzz"))
    assert obs[0].content == "....." and reward == pytest.approx(-0.1) and not term
    obs, reward, term, _, info = env.step(_guess(secret))
    assert obs[0].content == "correct" and reward == pytest.approx(1.0) and term and info["ended_by"] == "found"


def test_running_out_of_guesses_ends_the_episode_without_reward():
    env = WordGuessEnv(max_guesses=2)
    env.reset(seed=0)
    _, r1, t1, _, _ = env.step(_guess("aaaaa"))
    _, r2, t2, _, info = env.step(_guess("bbbbb"))
    assert (t1, t2) == (False, True) and r1 + r2 == pytest.approx(-0.2) and info["ended_by"] == "out of guesses"


def test_state_is_per_episode():
    env = make("word-guess-v0")
    env.reset(seed=1)
    env.step(_guess("aaaaa"))
    env.reset(seed=1)
    assert env.context.state["guesses"] == []


def test_splits_never_share_a_word():
    env = make("word-guess-v0")
    train = {env.reset(seed=s, options={"split": "train"})[0] and env.task.answer for s in range(300)}
    test = {env.reset(seed=s, options={"split": "test"})[0] and env.task.answer for s in range(300)}
    assert not train & test and test == {w for w in WORDS if _is_test(w)}


def test_the_demonstrator_solves_at_full_tool_use():
    env = make("word-guess-v0")
    env.reset(seed=5)
    _, reward, term, _, _ = env.step(env.scripted_action(random.Random(0), tool_use_prob=1.0))
    assert reward == 1.0 and term


def test_check_env_passes():
    report = check_env("word-guess-v0", episodes=5)
    assert report.ok, [(r.name, r.detail) for r in report.failures]
