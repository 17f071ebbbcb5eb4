"""The one JSON policy for model-written text: strict values, bounded size/depth/digits, typed refusals."""

from __future__ import annotations

import json
import random
import sys
import time

import pytest

from agentrl.tools.model_json import (
    MAX_INT_DIGITS,
    MAX_JSON_CHARS,
    MAX_JSON_DEPTH,
    ModelJSONError,
    decode_model_json,
    json_depth_ok,
)


@pytest.mark.parametrize("text", [
    '{"a": [1, -2, 3.5, -0.0, 1e-999, true, false, null, "s"]}', '"\\ud800 lone surrogate"', "[]", "{}", " 7 ",
    '{"nested": ' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}",  # 64 levels in all
    "-" + "9" * MAX_INT_DIGITS, "1e308", "-1.7976931348623157e308",
    '{"<tool_call>": "</tool_call>", "\\u0000": "\\"quoted\\""}',
])
def test_json_values_decode_as_json_loads_does(text):
    # what is valid under the policy decodes to exactly what Python's own decoder gives
    assert decode_model_json(text) == json.loads(text)


@pytest.mark.parametrize("text,reason", [
    ('{"x": NaN}', "holds NaN, which is not a JSON number; write a finite number, or null"),
    ("[Infinity]", "holds Infinity, which is not a JSON number"),
    ("[-Infinity]", "holds -Infinity, which is not a JSON number"),
    ("[1e999]", "holds the number 1e999, which is beyond the range of a 64-bit float"),
    ("[-2.5E+400]", "holds the number -2.5E+400"),
    ("[" + "9" * 400 + ".0]", "beyond the range of a 64-bit float"),
    ("9" * (MAX_INT_DIGITS + 1), f"holds an integer of {MAX_INT_DIGITS + 1} digits; the limit is {MAX_INT_DIGITS}"),
    ("[-" + "1" * 5000 + "]", "holds an integer of 5000 digits"),
    ('{"a": 1, "b": {"c": 2, "c": 3}}', "has the key 'c' twice in one object; give each key once"),
    ('{"' + "k" * 500 + '": 1, "' + "k" * 500 + '": 2}', "has the key '" + "k" * 80 + "...' twice"),
    ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), f"is nested deeper than {MAX_JSON_DEPTH} levels"),
    ("{" * 100_000, "is nested deeper than"),
    ('{"x": 1,}', "is not valid JSON (Expecting property name enclosed in double quotes at character 8)"),
    ("", "is not valid JSON (Expecting value at character 0)"),
    ("1 2", "is not valid JSON (Extra data at character 2)"),
    ("'single'", "is not valid JSON"),
    ('"' + "x" * MAX_JSON_CHARS + '"', f"is {MAX_JSON_CHARS + 2} characters long; the limit is {MAX_JSON_CHARS}"),
])
def test_refusals_are_typed_and_say_why(text, reason):
    with pytest.raises(ModelJSONError) as info:
        decode_model_json(text)
    assert reason in info.value.reason and str(info.value) == info.value.reason


def test_the_interpreters_digit_limit_never_escapes():
    # a user who lowers the interpreter's limit below the policy's still gets a typed refusal
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        with pytest.raises(ModelJSONError, match="too long to read here"):
            decode_model_json("[" + "5" * 700 + "]")
    finally:
        sys.set_int_max_str_digits(old)


def test_strings_that_look_like_refused_values_are_kept():
    assert decode_model_json('["NaN", "1e999", "' + "9" * 5000 + '", "[[[["]') == ["NaN", "1e999", "9" * 5000, "[[[["]


def _depth_reference(text: str) -> bool:
    """The maximum nesting of brackets outside strings, computed the slow, obvious way."""
    depth, deepest, i = 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
        i += 1
    return deepest <= 3


def test_depth_check_matches_the_reference():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice('[]{}"\\a') for _ in range(rng.randint(0, 20)))
        assert json_depth_ok(text, limit=3) == _depth_reference(text), text


@pytest.mark.parametrize("text", ["[" * MAX_JSON_CHARS, "[1," * (MAX_JSON_CHARS // 3 - 1) + "1]",
                                  '"' + "\\" * (MAX_JSON_CHARS - 2) + '"', "1" * MAX_JSON_CHARS])
def test_a_megabyte_is_cheap(text):
    start = time.perf_counter()
    try:
        decode_model_json(text)
    except ModelJSONError:
        pass
    assert time.perf_counter() - start < 2.0
