"""ToolEnv's side of parsing: the tools' schemas reach the parser, values reach the function with the
declared Python types (declared strings verbatim, integral floats as ints), and long turns are
parsed off the event loop. The tool, the parsers and the executor are the real ones."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from agentrl.envs.core import Task
from agentrl.envs.tool_env import PARSE_OFF_LOOP_CHARS, ToolEnv
from agentrl.tools.core import tool
from agentrl.tools.parsers import PARSERS, ParsedTurn, parse_hermes


@tool
def describe(s: str, n: int = 0, x: float = 0.0, ns: list[int] | None = None, maybe: int | None = None) -> str:
    """Report the Python type and value of each argument it received.

    Args:
        s: Any text.
        n: An integer.
        x: A number.
        ns: Integers.
        maybe: An integer or nothing.
    """
    return json.dumps({k: [type(v).__name__, v] for k, v in dict(s=s, n=n, x=x, ns=ns, maybe=maybe).items()})


class DescribeEnv(ToolEnv):
    def __init__(self, parser: str = "hermes"):
        super().__init__([describe], parser=parser)

    def sample_task(self, split: str, seed: int) -> Task:
        return Task(id=str(seed), prompt="Describe.", answer="", split=split)

    def score(self, task: Task, answer: str) -> float:
        return 0.0


def _step(parser: str, text: str) -> tuple[str, dict]:
    env = DescribeEnv(parser)
    env.reset(seed=0)
    obs, _, _, _, info = env.step(text)
    assert len(obs) == 1
    return obs[0].content, info["tool_errors"]


def qwen(**arguments: str) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function=describe>\n{params}</function>\n</tool_call>"


@pytest.mark.parametrize("text", ["12345", "3.10", "true", '{"a": [1, 2.0]}', 'she said "hi"', "null", "NaN"])
def test_qwen3_coder_declared_strings_reach_the_tool_verbatim(text):
    content, errors = _step("qwen3_coder", qwen(s=text))
    assert errors == {} and json.loads(content)["s"] == ["str", text]


def test_qwen3_coder_converts_declared_numbers_and_lists():
    content, errors = _step("qwen3_coder", qwen(s="a", n="7", x="2.5", ns="[1, 2.0]", maybe="null"))
    assert errors == {}
    assert json.loads(content) == {"s": ["str", "a"], "n": ["int", 7], "x": ["float", 2.5], "ns": ["list", [1, 2]],
                                   "maybe": ["NoneType", None]}


@pytest.mark.parametrize("arguments,message", [
    ({"s": "a", "n": "three"}, "at $['n']: 'three' is not of type 'integer'"),
    ({"s": "a", "n": "2.5"}, "at $['n']: '2.5' is not of type 'integer'"),
    ({"s": "a", "x": "1e999"}, "at $['x']: '1e999' is not of type 'number'"),
    ({"s": "a", "ns": "[1, NaN]"}, "at $['ns']: '[1, NaN]' is not valid under any of the given schemas"),
])
def test_qwen3_coder_values_that_do_not_convert_are_named_by_validation(arguments, message):
    content, errors = _step("qwen3_coder", qwen(**arguments))
    assert errors == {"invalid_arguments": 1}
    assert content == "Error (invalid_arguments): invalid arguments for 'describe' " + message


def hermes(**arguments: object) -> str:
    return "<tool_call>" + json.dumps({"name": "describe", "arguments": arguments}) + "</tool_call>"


def test_integral_floats_reach_an_int_parameter_as_ints():
    # JSON Schema calls 2.0 an integer; the function typed `int` still gets an int, and a `float`
    # parameter keeps its float
    content, errors = _step("hermes", hermes(s="a", n=2.0, x=2.0, ns=[1.0, -3.0], maybe=4.0))
    assert errors == {}
    got = json.loads(content)
    assert got["n"] == ["int", 2] and got["x"] == ["float", 2.0] and got["ns"] == ["list", [1, -3]]
    assert got["maybe"] == ["int", 4]


@pytest.mark.parametrize("value,path", [(1e300, "$['n']"), (-(2.0**53) - 2, "$['n']")])
def test_integral_floats_beyond_2_to_the_53_are_refused(value, path):
    content, errors = _step("hermes", hermes(s="a", n=value))
    assert errors == {"invalid_arguments": 1}
    assert content.startswith(f"Error (invalid_arguments): invalid arguments for 'describe' at {path}: {value!r} "
                              "is an integer written as a float beyond 2**53")


def test_json_policy_failures_are_parse_errors_not_crashes():
    content, errors = _step("hermes", '<tool_call>{"name": "describe", "arguments": {"s": "a", "n": '
                            + "1" * 5000 + "}}</tool_call>")
    assert errors == {"parse": 1} and "holds an integer of 5000 digits" in content


def test_long_turns_are_parsed_off_the_event_loop():
    threads: list[tuple[int, bool]] = []

    def probe(text: str, tools=None) -> ParsedTurn:
        threads.append((len(text), threading.current_thread() is threading.main_thread()))
        assert tools == {"describe": describe.parameters}  # the env passes its tools' schemas
        return parse_hermes(text)

    PARSERS.register("thread-probe-test", probe)
    try:
        env = DescribeEnv("thread-probe-test")
        call = hermes(s="a")
        for text in (call, call + " " * PARSE_OFF_LOOP_CHARS):
            env.reset(seed=0)
            obs, _, _, _, info = asyncio.run(env.astep(text))
            assert info["tool_errors"] == {} and json.loads(obs[0].content)["s"] == ["str", "a"]
    finally:
        PARSERS.unregister("thread-probe-test")
    # the short turn on the loop's own thread; the long one in a worker, with the same result
    assert threads == [(len(call), True), (len(call) + PARSE_OFF_LOOP_CHARS, False)]
