"""`integral_floats_to_int`: a float that a schema admits only as an integer becomes an int (JSON
Schema calls 2.0 an integer; a Python `int` parameter must never receive a float), everywhere in
the arguments, and a float too large to stand for one exact integer is refused."""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
import pytest

from agentrl.tools.schema import (
    MAX_EXACT_FLOAT_INT,
    InexactIntegerError,
    function_schema,
    integral_floats_to_int,
)


def _f(i: int, x: float, either: int | float, opt: int | None, ints: list[int], table: dict[str, int],
       nested: list[list[int]], lit: Literal[1, 2], anything: Any, text: str, flag: bool) -> None:
    """A signature with every way an integer can be declared."""


SCHEMA = function_schema(_f)["parameters"]


def _typed(value: object) -> object:
    """The value with the type of every leaf, so 2 and 2.0 (equal in Python) compare different."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


@pytest.mark.parametrize("key,value,expected", [
    ("i", 2.0, 2), ("i", -0.0, 0), ("i", float(MAX_EXACT_FLOAT_INT), MAX_EXACT_FLOAT_INT), ("i", 7, 7),
    ("x", 2.0, 2.0),  # a float parameter keeps its float
    ("either", 2.0, 2.0),  # int | float admits the float as it is
    ("opt", 3.0, 3), ("opt", None, None),
    ("ints", [1.0, 2, -3.0], [1, 2, -3]), ("table", {"a": 1.0, "b": 2}, {"a": 1, "b": 2}),
    ("nested", [[1.0], [2.0, 3]], [[1], [2, 3]]),
    ("lit", 2.0, 2),  # an enum of ints is integer-only too
    ("anything", 2.0, 2.0), ("text", "2.0", "2.0"), ("flag", True, True),
])
def test_integral_floats_become_ints_where_only_an_integer_is_allowed(key, value, expected):
    out = integral_floats_to_int({key: value}, SCHEMA)
    assert _typed(out) == _typed({key: expected})


def test_the_result_still_validates_and_the_input_is_not_changed():
    args = {"i": 2.0, "x": 1.0, "either": 3.0, "opt": None, "ints": [4.0], "table": {"k": 5.0}, "nested": [[6.0]],
            "lit": 1.0, "anything": 7.0, "text": "t", "flag": False}
    jsonschema.validate(args, SCHEMA)  # JSON Schema accepts each integral float as an integer
    out = integral_floats_to_int(args, SCHEMA)
    jsonschema.validate(out, SCHEMA)
    assert args["i"] == 2.0 and type(args["i"]) is float and type(out["i"]) is int


@pytest.mark.parametrize("key,value,path", [
    ("i", 1e300, "$['i']"), ("i", float(MAX_EXACT_FLOAT_INT) * 2, "$['i']"), ("ints", [1.0, -1e17], "$['ints'][1]"),
    ("table", {"big": 1e20}, "$['table']['big']"),
])
def test_floats_beyond_2_to_the_53_are_refused_with_their_path(key, value, path):
    with pytest.raises(InexactIntegerError) as info:
        integral_floats_to_int({key: value}, SCHEMA)
    assert str(info.value).startswith(f"at {path}: ") and "is an integer written as a float beyond 2**53" in str(
        info.value)


def test_non_integral_floats_and_unknown_keys_are_left_to_validation():
    assert _typed(integral_floats_to_int({"i": 2.5, "zz": 3.0}, SCHEMA)) == _typed({"i": 2.5, "zz": 3.0})


def test_schemas_without_a_type_convert_nothing():
    assert _typed(integral_floats_to_int({"a": 1.0}, {"type": "object"})) == _typed({"a": 1.0})
    any_branch = {"properties": {"a": {"anyOf": [{"type": "integer"}, {}]}}}
    assert _typed(integral_floats_to_int({"a": 1.0}, any_branch)) == _typed({"a": 1.0})
    assert _typed(integral_floats_to_int({"a": 1.0}, {"properties": {"a": {"type": ["integer", "null"]}}})) == \
        _typed({"a": 1})
