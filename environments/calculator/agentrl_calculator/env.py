"""`calculator-v0`: arithmetic word tasks a model solves with a `calculator` tool.

Each task is drawn deterministically from (split, seed). Splits are disjoint by construction: a
problem belongs to `test` iff a hash of its text falls in one fifth of the buckets, so no seed of
`train` can ever produce a `test` problem. The reward is 1 when the last number of the final
answer equals the true result, else 0.

The scripted solver (`scripted_action`) is the demonstrator the tiny-model recipe imitates; its
`tool_use_prob` makes it deliberately imperfect (it sometimes answers from a rough guess instead of
calling the tool), so supervised warm-starting gives a policy that succeeds sometimes and RL has
something to improve.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

from agentrl.envs.core import Task
from agentrl.envs.tool_env import ToolEnv
from agentrl.errors import EnvError, ToolError, ToolErrorKind
from agentrl.tools.core import ToolPolicy, tool
from agentrl_calculator.arith import ArithmeticError_, evaluate, format_number

# Expression shapes; a, b in 11..99 and c in 10..99.
EXPRESSIONS: tuple[str, ...] = ("{a} * {b} + {c}", "{a} * {b} - {c}", "{a} + {b} * {c}", "({a} + {b}) * {c}")
# `symbolic` tasks state the arithmetic in the question; the model must still use the tool to get
# the number right. `story` tasks hide it in a short story, so the model must also build the
# expression (much harder for a tiny model; meant for real models).
SYMBOLIC_TEMPLATES: tuple[str, ...] = (
    "What is {expr}?",
    "Compute {expr}.",
    "A box holds {expr} marbles. How many marbles is that?",
    "Tom has {expr} coins. How many coins does he have?",
    "A train carries {expr} people. How many people are on the train?",
)
STORY_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("A shop has {a} boxes with {b} pens each and sells {c} pens. How many pens are left?", "{a} * {b} - {c}"),
    ("Ann buys {a} packs of {b} stickers and finds {c} more. How many stickers does she have?", "{a} * {b} + {c}"),
    ("There are {a} rows of {b} chairs and {c} chairs are taken away. How many chairs remain?", "{a} * {b} - {c}"),
    ("A farm has {a} hens laying {b} eggs each, plus {c} eggs from ducks. How many eggs in all?", "{a} * {b} + {c}"),
    ("{a} friends each bring {b} apples and {c} pears. How many fruits are there?", "{a} * ({b} + {c})"),
)
TEST_BUCKETS = 5  # one bucket in five goes to `test`
SYSTEM_PROMPT = "Use the calculator, then answer."
_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@tool(policy=ToolPolicy(timeout_s=2.0, max_output_chars=200))
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Arithmetic such as "12 * 7 + 3".
    """
    try:
        return format_number(evaluate(expression))
    except ArithmeticError_ as exc:
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, str(exc)) from None


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % TEST_BUCKETS


class CalculatorEnv(ToolEnv):
    """Arithmetic word problems; the model calls `calculator`, then states the answer."""

    splits = ("train", "test")

    def __init__(self, style: str = "symbolic", system_prompt: str | None = SYSTEM_PROMPT, max_calls_per_turn: int = 4):
        if style not in ("symbolic", "story"):
            raise EnvError(f"style must be 'symbolic' or 'story', got {style!r}")
        super().__init__([calculator], parser="hermes", max_calls_per_turn=max_calls_per_turn,
                         system_prompt=system_prompt)
        self.style = style

    def sample_task(self, split: str, seed: int) -> Task:
        rng = random.Random(f"calculator:{self.style}:{split}:{seed}")
        while True:
            nums = {"a": rng.randint(11, 99), "b": rng.randint(11, 99), "c": rng.randint(10, 99)}
            if self.style == "story":
                template, expr = rng.choice(STORY_TEMPLATES)
                question = template.format(**nums)
            else:
                expr = rng.choice(EXPRESSIONS)
                question = rng.choice(SYMBOLIC_TEMPLATES).format(expr=expr.format(**nums))
            if (_bucket(question) == 0) == (split == "test"):
                break
        expression = expr.format(**nums)
        answer = format_number(evaluate(expression))
        return Task(id=f"{split}-{seed}", prompt=question, answer=answer, split=split,
                    metadata={"expression": expression, **nums})

    def score(self, task: Task, answer: str) -> float:
        return 1.0 if self.answer_key(task, answer) == task.answer else 0.0

    def answer_key(self, task: Task, answer: str) -> str | None:
        """The last number of the answer: what `score` checks, so equal keys score alike (maj@k)."""
        numbers = _LAST_NUMBER.findall(answer)
        return numbers[-1] if numbers else None

    def scripted_action(self, rng: random.Random, tool_use_prob: float = 1.0, last_tool_output: str | None = None) -> str:
        """The demonstrator's next turn.

        With probability `1 - tool_use_prob` it skips the tool and lazily repeats the last number
        of the question as the answer, which is how this imperfect demonstrator fails.
        """
        assert self.task is not None, "call reset() first"
        meta = self.task.metadata
        if last_tool_output is not None:
            return f"The answer is {last_tool_output}."
        if rng.random() < tool_use_prob:
            call = {"name": "calculator", "arguments": {"expression": meta["expression"]}}
            return f"<tool_call>{json.dumps(call)}</tool_call>"
        return f"The answer is {meta['c']}."
