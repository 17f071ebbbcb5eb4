"""Tool results as text: JSON's own output where JSON applies, bounded and never raising elsewhere."""

from __future__ import annotations

import enum
import json
import math
import random
import threading
import time

import pytest

from agentrl.tools.render import MAX_DEPTH, NeedsUserCode, describe_exception, render_value


def _json_value(rng: random.Random, depth: int = 0):
    """A random JSON-compatible value (tuples included: json writes them as lists)."""
    leaves = [lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-10**40, 10**40),
              lambda: rng.uniform(-1e12, 1e12), lambda: rng.choice(["", "plain", 'quo"te\\', "é\n\t\x00", "中文"])]
    if depth >= 4 or rng.random() < 0.4:
        return rng.choice(leaves)()
    kind = rng.randrange(3)
    items = [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 0:
        return items
    if kind == 1:
        return tuple(items)
    return {f"k{i}" + rng.choice(["", "é", '"']): v for i, v in enumerate(items)}


def test_json_compatible_values_render_exactly_as_json_dumps():
    rng = random.Random(0)
    for _ in range(3000):
        value = _json_value(rng)
        expected = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        assert render_value(value, 10**6).text == expected, value


def test_cut_at_the_limit_says_so():
    value = {"rows": [{"id": i, "name": f"row {i}"} for i in range(1000)]}
    full = json.dumps(value, ensure_ascii=False)
    r = render_value(value, 500)
    assert (r.text, r.cut, r.total) == (full[:500], True, None)
    r = render_value("x" * 1000, 10)
    assert (r.text, r.cut, r.total) == ("x" * 10, True, 1000)


class Color(enum.IntEnum):
    RED = 1


class LoudStr(str):
    def __str__(self):
        raise RuntimeError("user code ran")

    def __getitem__(self, item):
        raise RuntimeError("user code ran")


class LoudList(list):
    def __iter__(self):
        raise RuntimeError("user code ran")


class Hang:
    def __init__(self, release: threading.Event):
        self.release = release

    def __str__(self):
        self.release.wait(10)
        return "hung"


def test_subclasses_of_builtins_are_read_without_their_overrides():
    assert render_value(LoudStr("abc"), 100).text == "abc"
    assert render_value(LoudList([1, LoudStr("x")]), 100, allow_user_code=False).text == '[1, "x"]'
    assert render_value([Color.RED], 100).text == "[1]"


@pytest.mark.parametrize("value, expected", [
    (10**5000, "<integer of about 5001 digits: too long to print>"),
    ([10**5000], '["<integer of about 5001 digits: too long to print>"]'),
    (float("nan"), "NaN"),
    ([float("inf"), -math.inf], "[Infinity, -Infinity]"),
    (b"\xff\xfeok", "\ufffd\ufffdok"),
    ({1: "a", None: "b", (1, 2): "c"}, '{"1": "a", "null": "b", "[1, 2]": "c"}'),
    ({3, 3}, "[3]"),
    (object.__new__(type("NoStr", (), {"__str__": lambda self: 42})), "<NoStr object: str() raised TypeError>"),
], ids=["huge int", "huge int nested", "nan", "infinities", "bad utf-8", "non-string keys", "set", "bad __str__"])
def test_awkward_values(value, expected):
    assert render_value(value, 1000).text == expected


def test_recursive_and_deep_structures():
    a: list = [1]
    a.append(a)
    d: dict = {}
    d["me"] = d
    assert render_value(a, 100).text == "[1, [...]]"
    assert render_value(d, 100).text == '{"me": {...}}'
    deep: list = []
    cursor = deep
    for _ in range(100_000):  # deeper than Python's recursion limit
        cursor.append([])
        cursor = cursor[0]
    text = render_value(deep, 10_000).text
    assert text == "[" * MAX_DEPTH + f'"<nested deeper than {MAX_DEPTH} levels>"' + "]" * MAX_DEPTH


def test_size_and_time_are_bounded():
    many, long, huge = ["y" * 1000] * 1_000_000, "z" * 100_000_000, 10**1_000_000  # built before the clock starts
    t0 = time.perf_counter()
    assert len(render_value(many, 4096).text) == 4096
    assert render_value(long, 20).total == 100_000_000
    assert render_value(huge, 100).text.startswith("<integer of about 1000001 digits")
    assert time.perf_counter() - t0 < 2.0  # each reads only what it renders (all of it is over 1 GB of text)


def test_foreign_objects_need_permission_to_run_their_own_code():
    release = threading.Event()
    with pytest.raises(NeedsUserCode):
        render_value({"x": Hang(release)}, 100, allow_user_code=False)
    release.set()
    assert render_value({"x": Hang(release)}, 100).text == '{"x": "hung"}'


def test_a_container_changed_by_another_thread_is_reported_not_raised():
    class Grows:
        def __str__(self):
            shared["new"] = 1  # what a still-running tool thread may do to its returned dict
            return "g"

    shared = {"a": Grows()}
    assert render_value(shared, 100).text == "<dict that could not be printed: RuntimeError>"


def test_exceptions_are_described_without_raising():
    class Weird(Exception):
        def __str__(self):
            raise ValueError("nope")

    assert describe_exception(SystemExit(3)) == "SystemExit: 3"
    assert describe_exception(KeyError("k")) == "KeyError: 'k'"
    assert describe_exception(Weird()) == "Weird: <message could not be printed>"
    assert describe_exception(RuntimeError("x" * 1000), 5) == "RuntimeError: xxxxx"
    with pytest.raises(NeedsUserCode):
        describe_exception(Weird(), allow_user_code=False)
    with pytest.raises(NeedsUserCode):
        describe_exception(RuntimeError(Hang(threading.Event())), allow_user_code=False)
    # Printing a huge int may be slow (when the process lifted the digit limit): not done inline.
    with pytest.raises(NeedsUserCode):
        describe_exception(ValueError(10**5000), allow_user_code=False)
    assert describe_exception(ValueError(10**5000)) == "ValueError: <message could not be printed>"
    assert describe_exception(ValueError("plain", 1, None), allow_user_code=False) == "ValueError: ('plain', 1, None)"
