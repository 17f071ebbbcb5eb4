"""The qwen3_coder parser: the linear scanner against the old regular expressions, values typed by
the tool's schema (declared strings kept verbatim), and malformed calls reported as issues."""

from __future__ import annotations

import random
import re
from typing import Any, Literal

import pytest

from agentrl.tools.core import ToolCall
from agentrl.tools.parsers import ParsedTurn, get_parser
from agentrl.tools.qwen3_coder_parser import declared_types, parse_qwen3_coder, typed_value, untyped_value
from agentrl.tools.schema import function_schema


def _calls(turn: ParsedTurn) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in turn.calls]


def _one_issue(turn: ParsedTurn, fragment: str) -> None:
    assert turn.calls == ()
    assert len(turn.issues) == 1 and fragment in turn.issues[0].message, turn.issues


def test_registered_lazily_by_name():
    assert get_parser("qwen3_coder") is parse_qwen3_coder


QWEN_TWO_CALLS = (
    "I will search.\n<tool_call>\n<function=search>\n<parameter=query>\nbest pizza\nin town\n</parameter>\n"
    "<parameter=limit>\n5\n</parameter>\n<parameter=filters>\n{\"open\": true}\n</parameter>\n</function>\n"
    "</tool_call>\n<tool_call>\n<function=noop>\n</function>\n</tool_call>"
)


def test_several_calls_and_untyped_values():
    turn = parse_qwen3_coder(QWEN_TWO_CALLS)
    assert turn.content == "I will search." and turn.issues == ()
    # no schemas: one newline trimmed at each end of a value; JSON decoded where it is JSON, else text
    assert _calls(turn) == [("search", {"query": "best pizza\nin town", "limit": 5, "filters": {"open": True}}),
                            ("noop", {})]
    assert [c.id for c in turn.calls] == ["call_0", "call_1"]


@pytest.mark.parametrize("raw,value", [("3", 3), ("-2.5", -2.5), ("true", True), ("null", None), ('"5"', "5"),
                                       ("[1, 2]", [1, 2]), ("NaN", "NaN"), ("Infinity", "Infinity"),
                                       ("1e999", "1e999"), ("9" * 5000, "9" * 5000), ('{"a": 1, "a": 2}',
                                                                                      '{"a": 1, "a": 2}'),
                                       ("x = 1", "x = 1"), ("\n\nkept\n\n", "\nkept\n"), ("", "")])
def test_untyped_values_are_strict_json_or_text(raw, value):
    turn = parse_qwen3_coder(f"<tool_call><function=f><parameter=v>{raw}</parameter></function></tool_call>")
    assert _calls(turn) == [("f", {"v": value})]


def test_tolerates_a_missing_parameter_close_tag_when_the_next_tag_delimits():
    turn = parse_qwen3_coder("<tool_call><function=f><parameter=a>1<parameter=b>two</function></tool_call>")
    assert _calls(turn) == [("f", {"a": 1, "b": "two"})]


@pytest.mark.parametrize("text,fragment", [
    ("<tool_call><function=f><parameter=a>1</parameter>", "not closed with </tool_call>"),
    ("<tool_call><function=f><parameter=a>1</parameter></tool_call>", "not closed with </function>"),
    ("<tool_call><function=>x</function></tool_call>", "needs a tool name"),
    ("<tool_call><function=f><parameter=>1</parameter></function></tool_call>", "has no name"),
    ("<tool_call><function=f><parameter=a>1</parameter><parameter=a>2</parameter></function></tool_call>",
     "parameter 'a' of 'f' is given twice"),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', "holds no <function=NAME>"),
    ("<tool_call><function=" + "n" * 5000 + "><parameter=a>1</parameter><parameter=a>2</parameter></function>"
     "</tool_call>", "of '" + "n" * 80 + "...' is given twice"),
])
def test_malformed(text, fragment):
    _one_issue(parse_qwen3_coder(text), fragment)


def test_hostile_values_stay_strings():
    deep = "[" * 100_000 + "]" * 100_000
    turn = parse_qwen3_coder(f"<tool_call><function=f><parameter=v>{deep}</parameter></function></tool_call>")
    assert _calls(turn) == [("f", {"v": deep})]  # too deep to decode: the text itself, not a crash


# -- the scanner against the regular expressions it replaces ------------------------------------
_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.S)
_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(</function>|(?=<function=)|\Z)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.S)
_ISSUE_KEYS = ("not closed with </tool_call>", "holds no <function", "not closed with </function>",
               "needs a tool name", "has no name", "given twice")


def _reference(text: str) -> tuple[str, list[object]]:
    """The parser as it was: lazy regular expressions (quadratic on unclosed tags), no schemas.

    Returns the content and, in order, each call as a `ToolCall` and each issue as its key.
    """
    found: list[object] = []
    for block in _BLOCK.finditer(text):
        if not block.group(2):
            found.append("not closed with </tool_call>")
            continue
        functions = list(_FUNCTION.finditer(block.group(1)))
        if not functions:
            found.append("holds no <function")
        for fn in functions:
            if not fn.group(3):
                found.append("not closed with </function>")
                continue
            name, arguments, issue = fn.group(1).strip(), {}, None
            for m in _PARAMETER.finditer(fn.group(2)):
                key, value = m.group(1).strip(), m.group(2)
                value = value[1:] if value.startswith("\n") else value
                value = value[:-1] if value.endswith("\n") else value
                if not key or key in arguments:
                    issue = issue or ("has no name" if not key else "given twice")
                arguments[key] = untyped_value(value)
            found.append("needs a tool name" if not name else issue or ToolCall(name, arguments, f"call_{len(found)}"))
    first = text.find("<tool_call>")
    return (text if first < 0 else text[:first]).strip(), found


def _random_turn(rng: random.Random) -> str:
    """Well-formed calls with tags dropped, doubled or replaced by noise, so most turns hold calls."""
    noise = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "f", "x",
             ">", "\n", "1", '"a"', " ", "<", "=", "{", "}", "</", "<function=f>", "<parameter=x>", "<tool_call", ""]
    tokens = ["text "]
    for _ in range(rng.randint(0, 3)):
        tokens += ["<tool_call>", "\n", f"<function={rng.choice('fg ')}>"]
        for _ in range(rng.randint(0, 3)):
            tokens += [f"<parameter={rng.choice('xy')}>", rng.choice(["\n1\n", "a b", '{"k": [1]}', "", "\n"]),
                       "</parameter>"]
        tokens += ["</function>", "\n", "</tool_call>"]
    out = []
    for token in tokens:
        roll = rng.random()
        out += [] if roll < 0.05 else [token, token] if roll < 0.1 else [rng.choice(noise)] if roll < 0.2 else [token]
    return "".join(out)


def test_scanner_matches_the_regular_expressions_on_random_turns():
    rng = random.Random(0)
    with_calls = 0
    for _ in range(5000):
        text = _random_turn(rng)
        turn = parse_qwen3_coder(text)
        got = [*turn.calls, *(next(k for k in _ISSUE_KEYS if k in i.message) for i in turn.issues)]
        content, expected = _reference(text)
        # calls and issues come out split, so compare them as two ordered lists
        assert turn.content == content, text
        assert [x for x in got if isinstance(x, ToolCall)] == [x for x in expected if isinstance(x, ToolCall)], text
        assert [x for x in got if isinstance(x, str)] == [x for x in expected if isinstance(x, str)], text
        with_calls += bool(turn.calls)
    assert with_calls > 1500  # the comparison covered calls, not only issues


# -- values typed by the schema ----------------------------------------------------------------
def _echo(s: str, i: int, n: float, b: bool, o: dict, a: list[int], opt_s: str | None = None,
          opt_i: int | None = None, lit: Literal["a", "b"] = "a", lit_i: Literal[1, 2] = 1, anything: Any = None,
          either: int | str = 0) -> str:
    """Stands for any tool: its schema comes from its signature, as for every `@tool`."""
    return ""


SCHEMAS = {"echo": function_schema(_echo)["parameters"]}


@pytest.mark.parametrize("param,raw,value", [
    # declared strings keep their text exactly (the issue's list)
    ("s", "12345", "12345"), ("s", "3.10", "3.10"), ("s", "true", "true"), ("s", '{"a": [1, 2.0]}', '{"a": [1, 2.0]}'),
    ("s", 'say "hi" \\n', 'say "hi" \\n'), ("s", "null", "null"), ("s", "NaN", "NaN"),
    ("s", "  padded  ", "  padded  "),
    ("s", "\n\nx\n\n", "\nx\n"), ("s", "", ""),
    # integers, numbers, booleans, objects and arrays are converted where the schema says so
    ("i", "3", 3), ("i", " -7 ", -7), ("i", "2.0", 2.0), ("n", "2", 2), ("n", "3.10", 3.1), ("n", "-1e-3", -0.001),
    ("b", "true", True), ("b", "False", False), ("b", "TRUE", True),
    ("o", '{"k": [1, "2"]}', {"k": [1, "2"]}), ("a", "[1, 2]", [1, 2]), ("a", "[]", []),
    ("opt_s", "null", None), ("opt_s", "5", "5"), ("opt_i", "null", None), ("opt_i", "4", 4),
    ("lit", "a", "a"), ("lit_i", "2", 2), ("anything", "5", 5), ("anything", "x", "x"), ("either", "5", "5"),
    # what does not convert stays text, for validation to name the parameter and the type it needs
    ("i", "2.5", "2.5"), ("i", "three", "three"), ("i", "true", "true"), ("i", "null", "null"), ("i", "1e999", "1e999"),
    ("i", "9" * 5000, "9" * 5000), ("i", "007", "007"), ("n", "NaN", "NaN"), ("n", "-Infinity", "-Infinity"),
    ("b", "1", "1"), ("b", "yes", "yes"), ("o", "[1]", "[1]"), ("o", '{"k": 1, "k": 2}', '{"k": 1, "k": 2}'),
    ("a", "1, 2", "1, 2"), ("a", "['x']", "['x']"),
])
def test_values_are_typed_by_the_schema(param, raw, value):
    turn = parse_qwen3_coder(f"<tool_call><function=echo><parameter={param}>{raw}</parameter></function></tool_call>",
                             SCHEMAS)
    got = turn.calls[0].arguments[param]
    assert got == value and type(got) is type(value)


def test_unknown_tools_and_undeclared_parameters_fall_back_to_json_if_json():
    text = "<tool_call><function={}><parameter={}>12</parameter></function></tool_call>"
    assert parse_qwen3_coder(text.format("other", "s"), SCHEMAS).calls[0].arguments == {"s": 12}
    assert parse_qwen3_coder(text.format("echo", "zz"), SCHEMAS).calls[0].arguments == {"zz": 12}
    assert parse_qwen3_coder(text.format("echo", "s"), {"echo": "not a schema"}).calls[0].arguments == {"s": 12}


@pytest.mark.parametrize("schema,types", [
    ({"type": "string"}, {"string"}), ({"type": ["integer", "null"]}, {"integer", "null"}),
    ({"enum": ["a", 1, None]}, {"string", "integer", "null"}), ({"const": 2.5}, {"number"}),
    ({"oneOf": [{"type": "array"}, {"anyOf": [{"type": "object"}]}]}, {"array", "object"}),
    ({}, None), ({"anyOf": [{"type": "integer"}, {}]}, None), ({"$ref": "#/defs/x"}, None), ("string", None),
])
def test_declared_types(schema, types):
    assert declared_types(schema) == (frozenset(types) if types is not None else None)


def test_typed_value_prefers_an_exact_enum_member():
    assert typed_value("1", {"enum": ["1", 1]}) == "1" and typed_value("1", {"enum": [2, 1]}) == 1
