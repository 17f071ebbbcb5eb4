"""calculator-v0: deterministic disjoint splits, scoring, and the safe evaluator under hostile input."""

from __future__ import annotations

import json

import pytest

from agentrl.envs import make
from agentrl.errors import EnvError
from agentrl_calculator.arith import ArithmeticError_, evaluate


def test_seeded_reset_is_deterministic_and_splits_are_disjoint():
    env = make("calculator-v0")
    a = [env.reset(seed=s, options={"split": "train"})[0] for s in range(50)]
    b = [env.reset(seed=s, options={"split": "train"})[0] for s in range(50)]
    assert a == b
    train = {env.reset(seed=s, options={"split": "train"})[0][-1].content for s in range(2000)}
    test = {env.reset(seed=s, options={"split": "test"})[0][-1].content for s in range(500)}
    assert not train & test
    assert len(test) > 450  # the test split is large enough to be a real held-out set


def test_correct_answer_scores_one_and_step_after_end_raises():
    env = make("calculator-v0")
    env.reset(seed=1, options={"split": "test"})
    call = json.dumps({"name": "calculator", "arguments": {"expression": env.task.metadata["expression"]}})
    obs, reward, term, trunc, info = env.step(f"<tool_call>{call}</tool_call>")
    assert (reward, term, trunc) == (0.0, False, False) and obs[0].content == env.task.answer
    _, reward, term, _, _ = env.step(f"So the answer is {env.task.answer}.")
    assert reward == 1.0 and term
    with pytest.raises(EnvError, match="finished episode"):
        env.step("again")
    env.reset(seed=1, options={"split": "test"})
    assert env.step("The answer is 3.")[1] == 0.0


def test_unknown_split_is_a_clear_error():
    with pytest.raises(EnvError, match="unknown split 'dev'"):
        make("calculator-v0").reset(seed=0, options={"split": "dev"})


@pytest.mark.parametrize("expr,value", [("47 * 38 + 12", 1798), ("(2 + 3) * 4", 20), ("7 / 2", 3.5),
                                         ("-3 ** 2", -9), ("10 // 3", 3), ("2 ** 10", 1024)])
def test_evaluator_computes(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "open('/etc/passwd').read()", "9 ** 9 ** 9", "1 / 0",
    "(" * 100_000 + "1" + ")" * 100_000, "1" * 500, "a + 1", "[1, 2]", "lambda: 1", "1e308 * 10",
    "2 ** 100", "'a' * 3", "",
])
def test_evaluator_refuses_hostile_input(expr):
    with pytest.raises(ArithmeticError_):
        evaluate(expr)
