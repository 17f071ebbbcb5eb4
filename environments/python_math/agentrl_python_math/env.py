"""`python-math-v0`: math word problems solved by writing Python for the sandboxed `python` tool.

Each problem needs a little program (a sum over a range, a modular power, a recurrence, ...). The
model writes code, reads what it printed (or its traceback), fixes it if needed, and answers with
the number: several turns of write, read, fix, answer. The reward is 1 when the last integer of
the answer is right. The `python` tool is agentrl's builtin: every call runs in a fresh sandboxed
process with time, memory and output limits, and no network.

Problems come from templates with random parameters; the reference answer is computed here in
plain Python. A problem belongs to `test` iff a hash of its text falls in one bucket of five.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable

from agentrl.envs import Task, ToolEnv
from agentrl.tools.builtin.python import python_tool

TEST_BUCKETS = 5
SYSTEM_PROMPT = "Write Python for the python tool to compute the answer, then reply with the number."
_INTEGER = re.compile(r"-?\d+")

Problem = tuple[str, int, str]  # question, answer, a program that prints the answer


def _multiples(rng: random.Random) -> Problem:
    n, a, b = rng.randint(50, 2000), rng.randint(2, 9), rng.randint(2, 9)
    answer = sum(k for k in range(1, n) if k % a == 0 or k % b == 0)
    return (f"What is the sum of all positive integers below {n} that are divisible by {a} or {b}?", answer,
            f"print(sum(k for k in range(1, {n}) if k % {a} == 0 or k % {b} == 0))")


def _linear(rng: random.Random) -> Problem:
    a, x, b = rng.randint(2, 40), rng.randint(-200, 200), rng.randint(-500, 500)
    c = a * x + b
    return f"Solve for x: {a}x + {b} = {c}.".replace("+ -", "- "), x, f"print(({c} - ({b})) // {a})"


def _modpow(rng: random.Random) -> Problem:
    a, b, m = rng.randint(2, 99), rng.randint(10, 500), rng.randint(7, 997)
    return (f"What is the remainder when {a} to the power {b} is divided by {m}?", pow(a, b, m),
            f"print(pow({a}, {b}, {m}))")


def _count_divisible(rng: random.Random) -> Problem:
    lo = rng.randint(1, 500)
    hi, k = lo + rng.randint(100, 5000), rng.randint(3, 37)
    answer = sum(1 for i in range(lo, hi + 1) if i % k == 0)
    return (f"How many integers from {lo} to {hi} inclusive are divisible by {k}?", answer,
            f"print(sum(1 for i in range({lo}, {hi} + 1) if i % {k} == 0))")


def _digit_sum(rng: random.Random) -> Problem:
    a, b = rng.randint(1000, 99999), rng.randint(1000, 99999)
    answer = sum(int(d) for d in str(a * b))
    return (f"What is the sum of the digits of {a} times {b}?", answer,
            f"print(sum(int(d) for d in str({a} * {b})))")


def _recurrence(rng: random.Random) -> Problem:
    x, y, n = rng.randint(1, 9), rng.randint(1, 9), rng.randint(10, 30)
    seq = [x, y]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return (f"A sequence starts {x}, {y}, and each later term is the sum of the two before it. What is term "
            f"number {n}?", seq[n - 1],
            f"s = [{x}, {y}]\nwhile len(s) < {n}:\n    s.append(s[-1] + s[-2])\nprint(s[{n} - 1])")


def _gcd(rng: random.Random) -> Problem:
    g = rng.randint(2, 60)
    a, b = g * rng.randint(10, 400), g * rng.randint(10, 400)
    return (f"What is the largest number that divides both {a} and {b}?", math.gcd(a, b),
            f"import math\nprint(math.gcd({a}, {b}))")


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _multiples, _linear, _modpow, _count_divisible, _digit_sum, _recurrence, _gcd)


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % TEST_BUCKETS


def _code_call(code: str) -> str:
    return "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>"


class PythonMathEnv(ToolEnv):
    """Math word problems; the model runs Python in the sandbox, then answers.

    Args:
        max_calls_per_turn: Programs run per model turn at most.
        bug_prob: How often the demonstrator's first program has a bug it then fixes (teaches the
            read-the-traceback-and-fix loop).
    """

    splits = ("train", "test")

    def __init__(self, max_calls_per_turn: int = 2, bug_prob: float = 0.3, system_prompt: str | None = SYSTEM_PROMPT):
        super().__init__([python_tool], max_calls_per_turn=max_calls_per_turn, system_prompt=system_prompt)
        self.bug_prob = bug_prob

    def sample_task(self, split: str, seed: int) -> Task:
        rng = random.Random(f"python-math:{split}:{seed}")
        while True:
            question, answer, code = rng.choice(TEMPLATES)(rng)
            if (_bucket(question) == 0) == (split == "test"):
                break
        return Task(id=f"{split}-{seed}", prompt=question, answer=str(answer), split=split,
                    metadata={"code": code})

    def score(self, task: Task, answer: str) -> float:
        numbers = _INTEGER.findall(answer.replace(",", ""))
        return 1.0 if numbers and numbers[-1] == task.answer else 0.0

    def scripted_action(self, rng: random.Random, tool_use_prob: float = 1.0,
                        last_tool_output: str | None = None) -> str:
        """The demonstrator's next turn: code (sometimes buggy at first), a fix after a traceback,
        then the printed number as the answer. With probability `1 - tool_use_prob` it answers at
        once with a guess (the first number of the question), which is how it fails."""
        assert self.task is not None, "call reset() first"
        code = self.task.metadata["code"]
        if last_tool_output is None:
            if rng.random() >= tool_use_prob:
                return f"The answer is {_INTEGER.findall(self.task.prompt)[0]}."
            # the same program with `print` misspelt: a NameError to read and fix
            return _code_call(code.replace("print(", "prnt(", 1) if rng.random() < self.bug_prob else code)
        if "Error" in last_tool_output or "[exit code" in last_tool_output:
            return _code_call(code)
        printed = _INTEGER.findall(last_tool_output)
        return f"The answer is {printed[-1] if printed else '0'}."
