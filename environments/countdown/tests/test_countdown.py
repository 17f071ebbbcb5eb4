"""countdown-v0: exact scoring on fractions, solvable tasks, disjoint splits, the contract checks."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from agentrl.envs import Task, check_env, make
from agentrl.errors import EnvError
from agentrl_countdown.env import InvalidExpression, evaluate, uses_given_numbers


def _task(numbers, target):
    return Task(id="t", prompt="", answer=str(target), metadata={"numbers": numbers, "target": target})


@pytest.mark.parametrize("answer,reward,why", [
    ("<answer>(20 - 3) * 3 + 6</answer>", 1.0, "correct"),          # 17 * 3 + 6 = 57
    ("<answer>20 * 3 - 3</answer>", 1.0, "correct"),                # 57, numbers 20, 3, 3: two 3s were given
    ("<answer>20 * 3 - 3 - 3 + 3</answer>", 0.0, "uses numbers"),   # a third 3 was not given
    ("<answer>6 / 4 * 38</answer>", 0.0, "uses numbers"),           # 38 was not given
    ("<answer>20 * 3</answer>", 0.0, "equals 60, not 57"),
    ("The answer is 57.", 0.0, "no <answer> tag"),
    ("<answer>__import__('os')</answer>", 0.0, "only integers"),
    ("<answer>6 / (3 - 3)</answer>", 0.0, "division by zero"),
])
def test_scoring(answer, reward, why):
    env = make("countdown-v0")
    got, verdict = env.score(_task([20, 3, 3, 6], 57), answer)
    assert got == reward and why in verdict


def test_division_is_exact_and_numbers_are_counted():
    assert evaluate("7 / 2 * 2") == (Fraction(7), [7, 2, 2])
    assert uses_given_numbers([3, 3], [3, 5, 3]) and not uses_given_numbers([3, 3], [3, 5])
    with pytest.raises(InvalidExpression):
        evaluate("1" * 300)


def test_every_task_is_solved_by_its_own_solution_and_splits_are_disjoint():
    env = make("countdown-v0")
    seen = {}
    for split in ("train", "test"):
        for seed in range(300):
            obs, _ = env.reset(seed=seed, options={"split": split})
            meta = env.task.metadata
            value, used = evaluate(meta["solution"])
            assert value == meta["target"] and uses_given_numbers(used, meta["numbers"])
            seen.setdefault(split, set()).add((tuple(sorted(meta["numbers"])), meta["target"]))
    assert not seen["train"] & seen["test"] and len(seen["test"]) > 250


def test_one_turn_then_the_episode_is_over():
    env = make("countdown-v0")
    env.reset(seed=3)
    obs, reward, term, trunc, info = env.step(env.scripted_action(random.Random(0), tool_use_prob=1.0))
    assert (obs, reward, term, trunc) == ((), 1.0, True, False)
    with pytest.raises(EnvError, match="finished episode"):
        env.step("<answer>1</answer>")


def test_check_env_passes():
    report = check_env("countdown-v0", episodes=5)
    assert report.ok, [(r.name, r.detail) for r in report.failures]
