"""The executor: validation, typed errors shown to the model, counts, limits — and it never raises."""

from __future__ import annotations

import asyncio
import time

from agentrl.errors import ToolErrorKind
from agentrl.tools.core import ToolCall, ToolPolicy, tool
from agentrl.tools.executor import ToolExecutor
from agentrl.tools.parsers import parse_hermes


@tool
def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: First term.
        b: Second term.
    """
    return a + b


@tool(policy=ToolPolicy(timeout_s=0.2))
async def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    await asyncio.sleep(seconds)
    return "done"


@tool(policy=ToolPolicy(max_output_chars=10))
def shout(text: str) -> str:
    """Repeat loudly.

    Args:
        text: Words.
    """
    return text.upper() * 5


@tool
def crash() -> str:
    """Always fails."""
    raise KeyError("/home/secret/path")


def _run(executor, text):
    turn = parse_hermes(text)
    return asyncio.run(executor.execute(turn.calls, turn.issues))


def test_schema_from_signature_and_docstring():
    assert add.parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer", "description": "First term."},
                       "b": {"type": "integer", "description": "Second term.", "default": 0}},
        "required": ["a"], "additionalProperties": False,
    }
    assert add.description == "Add two integers."


def test_each_failure_kind_reaches_the_model_and_is_counted():
    ex = ToolExecutor([add, slow, shout, crash], max_calls_per_turn=8)
    cases = {
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>': None,
        '<tool_call>{"name": "add", "arguments": {"a": "two"}}</tool_call>': ToolErrorKind.INVALID_ARGUMENTS,
        '<tool_call>{"name": "add", "arguments": {"a": 1, "c": 2}}</tool_call>': ToolErrorKind.INVALID_ARGUMENTS,
        '<tool_call>{"name": "add", "arguments": {}}</tool_call>': ToolErrorKind.INVALID_ARGUMENTS,
        '<tool_call>{"name": "ad", "arguments": {"a": 1}}</tool_call>': ToolErrorKind.UNKNOWN_TOOL,
        '<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>': ToolErrorKind.PARSE,
        '<tool_call>{"name": "slow", "arguments": {"seconds": 5}}</tool_call>': ToolErrorKind.TIMEOUT,
        '<tool_call>{"name": "shout", "arguments": {"text": "hello"}}</tool_call>': ToolErrorKind.OUTPUT_TOO_LARGE,
        '<tool_call>{"name": "crash", "arguments": {}}</tool_call>': ToolErrorKind.RUNTIME,
    }
    for text, kind in cases.items():
        t0 = time.perf_counter()
        [result] = _run(ex, text)
        assert result.error_kind == kind, (text, result)
        assert time.perf_counter() - t0 < 2.0
        if kind == ToolErrorKind.OUTPUT_TOO_LARGE:  # the model still sees the head of the output
            assert result.content.startswith("HELLOHELLO") and "[output truncated: 15 more characters]" in result.content
        elif kind is not None:
            assert result.content.startswith(f"Error ({kind.value})")
    assert _run(ex, '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>')[0].content == "5"
    assert ex.error_counts == {"invalid_arguments": 3, "unknown_tool": 1, "parse": 1, "timeout": 1,
                               "output_too_large": 1, "runtime": 1}


def test_messages_are_helpful_and_leak_nothing():
    ex = ToolExecutor([add, crash])
    [r] = _run(ex, '<tool_call>{"name": "ad", "arguments": {"a": 1}}</tool_call>')
    assert "Did you mean 'add'" in r.content
    [r] = _run(ex, '<tool_call>{"name": "add", "arguments": {"a": "x"}}</tool_call>')
    assert "$['a']" in r.content and "'x' is not of type 'integer'" in r.content
    [r] = _run(ex, '<tool_call>{"name": "crash", "arguments": {}}</tool_call>')
    assert "Traceback" not in r.content and "KeyError" in r.content


def test_calls_over_the_per_turn_limit_share_one_summary_and_are_counted():
    ex = ToolExecutor([add, shout], max_calls_per_turn=2)
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>' * 299
            + '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    results = _run(ex, text)
    # 2 calls run, then ONE message for the other 298 (each counted): not 300 messages.
    assert [r.error_kind for r in results] == [None, None, ToolErrorKind.RATE_LIMITED]
    assert results[2].content == ("Error (rate_limited): at most 2 tool calls are allowed per turn; the other 298 "
                                  "calls in this turn were not run ('add' x297, 'nope' x1)")
    assert ex.error_counts == {"rate_limited": 298}


def test_huge_arguments_do_not_crash():
    ex = ToolExecutor([shout])
    big = "x" * 5_000_000
    [r] = asyncio.run(ex.execute([ToolCall("shout", {"text": big})]))
    assert r.error_kind == ToolErrorKind.OUTPUT_TOO_LARGE and len(r.content) < 200


def test_many_malformed_calls_are_summarised_but_counted():
    ex = ToolExecutor([add], max_calls_per_turn=3)
    results = _run(ex, "<tool_call>{bad</tool_call>" * 1000)
    # 3 issues shown one by one, then one summary for the other 997; all 1000 are counted.
    assert len(results) == 4
    assert all(r.error_kind == ToolErrorKind.PARSE for r in results)
    assert "997 more malformed tool calls" in results[-1].content
    assert ex.error_counts == {"parse": 1000}
