"""python-math-v0: reference answers, the sandboxed write/read/fix/answer loop, splits, the contract checks."""

from __future__ import annotations

import json
import random

import pytest

from agentrl.envs import Task, check_env, make
from agentrl_python_math.env import TEMPLATES


def test_every_templates_program_prints_its_reference_answer():
    """The demonstration programs, run in the sandbox through the env, print the answers computed here."""
    env = make("python-math-v0")
    rng = random.Random(0)
    env.reset(seed=0)
    for template in TEMPLATES:
        question, answer, code = template(rng)
        call = "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>"
        obs, *_ = env.step(call)
        assert obs[0].content.strip() == str(answer), question


def test_a_buggy_program_is_read_fixed_and_answered():
    env = make("python-math-v0", bug_prob=1.0)
    env.reset(seed=4, options={"split": "test"})
    rng = random.Random(0)
    obs, reward, term, *_ = env.step(env.scripted_action(rng))
    assert "NameError" in obs[0].content and not term  # the traceback comes back as the tool's output
    obs, reward, term, *_ = env.step(env.scripted_action(rng, last_tool_output=obs[0].content))
    assert obs[0].content.strip() == env.task.answer
    _, reward, term, *_ = env.step(env.scripted_action(rng, last_tool_output=obs[0].content))
    assert (reward, term) == (1.0, True)


@pytest.mark.parametrize("answer,reward", [("The answer is 1,234.", 1.0), ("1234", 1.0), ("12 then 1234", 1.0),
                                           ("1234 or 12", 0.0), ("no idea", 0.0)])
def test_scoring_takes_the_last_integer(answer, reward):
    env = make("python-math-v0")
    env.reset(seed=0)
    assert env.score(Task(id="t", prompt="", answer="1234"), answer) == reward


def test_splits_are_disjoint():
    env = make("python-math-v0")
    train = {env.sample_task("train", s).prompt for s in range(1000)}
    test = {env.sample_task("test", s).prompt for s in range(1000)}
    assert not train & test and len(test) > 900


def test_check_env_passes():
    report = check_env("python-math-v0", episodes=4, max_turns=4)
    assert report.ok, [(r.name, r.detail) for r in report.failures]
