"""`countdown-v0`: reach a target number from given numbers with + - * /, in one turn, no tools.

The Countdown numbers game, the single-turn task with a verifiable reward that GRPO papers start
from. The model answers with an expression inside `<answer>...</answer>`; the reward is 1 when it
uses each given number at most once, only + - * / and parentheses, and equals the target exactly
(arithmetic on fractions, so `7 / 2 * 2` is 7, and no float ever rounds a wrong answer into a
right one). `format_reward` (0 by default) pays a well-formed but wrong expression.

Every task is solvable by construction: the target is the value of a random expression over some
of the numbers. A task (its numbers and target) belongs to `test` iff a hash of it falls in one
bucket of five, so the splits never share one.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from fractions import Fraction
from typing import Any

from agentrl.envs import Env, Message, Task
from agentrl.errors import EnvError

TEST_BUCKETS = 5
MAX_EXPRESSION_CHARS = 200
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class InvalidExpression(ValueError):
    """The answer is not an expression over the given numbers."""


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """(exact value, numbers used) of an expression of integers, + - * / and parentheses.

    Example:
        >>> evaluate("(25 - 5) * 3 / 4")
        (Fraction(15, 1), [25, 5, 3, 4])
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidExpression(f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise InvalidExpression("not an arithmetic expression") from None
    used: list[int] = []

    def walk(node: ast.AST, depth: int = 0) -> Fraction:
        if depth > 50:
            raise InvalidExpression("nested too deeply")
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left, depth + 1), walk(node.right, depth + 1)
            if isinstance(node.op, ast.Div) and right == 0:
                raise InvalidExpression("division by zero")
            return _OPS[type(node.op)](left, right)
        raise InvalidExpression("only integers, + - * / and parentheses are allowed")

    return walk(tree.body), used


def uses_given_numbers(used: list[int], given: list[int]) -> bool:
    """Whether `used` takes each number of `given` at most once (and nothing else)."""
    left = list(given)
    for n in used:
        if n not in left:
            return False
        left.remove(n)
    return True


def _bucket(numbers: list[int], target: int) -> int:
    key = f"{sorted(numbers)}->{target}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % TEST_BUCKETS


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction]:
    """A random expression over a random subset (at least two) of `numbers`, with its value."""
    picked = rng.sample(numbers, rng.randint(2, len(numbers)))
    parts = [(str(n), Fraction(n)) for n in picked]
    while len(parts) > 1:
        (ta, va), (tb, vb) = parts.pop(rng.randrange(len(parts))), parts.pop(rng.randrange(len(parts)))
        op = rng.choice([ast.Add, ast.Sub, ast.Mult, ast.Div])
        if op is ast.Div and (vb == 0 or (va / vb).denominator != 1):
            op = ast.Add
        if op is ast.Sub and va < vb:
            (ta, va), (tb, vb) = (tb, vb), (ta, va)
        parts.append((f"({ta} {_SYMBOL[op]} {tb})", _OPS[op](va, vb)))
    text, value = parts[0]
    return text[1:-1] if text.startswith("(") else text, value


class CountdownEnv(Env):
    """Countdown numbers game, one turn.

    Args:
        count: How many numbers are given (3 to 6).
        max_number: Numbers are drawn from 1..max_number.
        max_target: Targets are at most this (and at least 1).
        format_reward: Reward of a well-formed answer that is wrong (0 by default).
    """

    splits = ("train", "test")

    def __init__(self, count: int = 4, max_number: int = 20, max_target: int = 200, format_reward: float = 0.0):
        if not 3 <= count <= 6:
            raise EnvError(f"count must be 3..6 numbers, got {count}")
        self.count, self.max_number, self.max_target = count, max_number, max_target
        self.format_reward = float(format_reward)
        self.task: Task | None = None
        self._done = True

    def sample_task(self, split: str, seed: int) -> Task:
        rng = random.Random(f"countdown:{self.count}:{self.max_number}:{split}:{seed}")
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            expression, value = _random_expression(rng, numbers)
            if value.denominator != 1 or not 1 <= value <= self.max_target:
                continue
            target = int(value)
            if (_bucket(numbers, target) == 0) == (split == "test"):
                break
        prompt = (f"Using the numbers {numbers}, each at most once, and + - * / with parentheses, write an "
                  f"expression equal to {target}. Put it inside <answer></answer>.")
        return Task(id=f"{split}-{seed}", prompt=prompt, answer=str(target), split=split,
                    metadata={"numbers": numbers, "target": target, "solution": expression})

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        split = (options or {}).get("split", "train")
        if split not in self.splits:
            raise EnvError(f"unknown split {split!r}; this env has {self.splits}")
        task_seed = int(self.np_random.integers(0, 2**31 - 1)) if seed is None else seed
        self.task = self.sample_task(split, task_seed)
        self._done = False
        return (Message("user", self.task.prompt),), {"task_id": self.task.id, "split": split}

    def score(self, task: Task, answer: str) -> tuple[float, str]:
        """(reward, why) of an answer."""
        found = _ANSWER.findall(answer)
        if not found:
            return 0.0, "no <answer> tag"
        try:
            value, used = evaluate(found[-1])
        except InvalidExpression as exc:
            return 0.0, str(exc)
        if not uses_given_numbers(used, task.metadata["numbers"]):
            return self.format_reward, "uses numbers that were not given (or one twice)"
        if value != task.metadata["target"]:
            return self.format_reward, f"equals {value}, not {task.metadata['target']}"
        return 1.0, "correct"

    def step(self, action: str):
        if self._done or self.task is None:
            raise EnvError("step() called on a finished episode; call reset() first")
        if not isinstance(action, str):
            raise EnvError(f"action must be the model's text (str), got {type(action).__name__}")
        self._done = True
        reward, why = self.score(self.task, action)
        return (), reward, True, False, {"verdict": why}

    def scripted_action(self, rng: random.Random, tool_use_prob: float = 1.0,
                        last_tool_output: str | None = None) -> str:
        """The demonstrator: the task's own solution with probability `tool_use_prob`, else the sum
        of all the numbers (right only by chance)."""
        assert self.task is not None, "call reset() first"
        meta = self.task.metadata
        if rng.random() < tool_use_prob:
            return f"<answer>{meta['solution']}</answer>"
        return "<answer>" + " + ".join(str(n) for n in meta["numbers"]) + "</answer>"
