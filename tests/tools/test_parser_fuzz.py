"""Seeded fuzzing of every built-in tool-call parser (the parser part of the fuzz suite).

Each case renders random calls in a parser's own format, then mutates the text: cuts it short,
repeats tags thousands of times, puts values JSON does not have in it (NaN, Infinity, 1e999,
integers of thousands of digits, duplicate keys, deep nesting), sprinkles lone surrogates,
control characters and chat-template control tokens, or grows a value to 100,000 characters.
Every case is parsed by all four parsers, with and without tool schemas, and must:

* not raise, and finish within `CASE_SECONDS`;
* return a `ParsedTurn` whose issues each carry a short, non-empty message, and no more than
  `MAX_PARSED_CALLS` calls and issues (plus the one that says the rest were not read);
* hand tools only JSON values: dicts with str keys, lists, str, bool, None, finite floats and
  ints of at most `MAX_INT_DIGITS` digits;
* parse an unmutated text back to exactly the calls it was rendered from (for the format that
  rendered it), and refuse a call holding a value JSON does not have.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass

import pytest

from agentrl.tools.core import ToolCall
from agentrl.tools.model_json import MAX_INT_DIGITS
from agentrl.tools.parsers import MAX_PARSED_CALLS, ParsedTurn, ParseIssue, get_parser

FORMATS = ("hermes", "llama3_json", "mistral", "qwen3_coder")
BLOCKS, CASES_PER_BLOCK = 10, 400  # 4,000 cases, each parsed by 4 parsers, with and without schemas
CASE_SECONDS = 1.0  # a linear parser needs milliseconds even for the 100,000-character cases
MAX_MESSAGE_CHARS = 600
INT_BOUND = 10**MAX_INT_DIGITS


@dataclass(frozen=True)
class Raw:
    """A token written into the JSON as it is: something JSON does not have."""

    text: str


POISON = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "7" * 4301, "-" + "9" * 1001, "[" * 65 + "]" * 65,
          "{" * 10_000, '{"k": 1, "k": 2}', "01", "+1", "'single'", "True", "None", ".5"]
TAGS = ["<tool_call>", "</tool_call>", "<function=", "<function=f>", "</function>", "<parameter=", "<parameter=x>",
        "</parameter>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", '{"name": ', "[", "{", '"', "\\"]
CONTROL = ["<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "<|eot_id|>", "</s>", "<think>", "\x00", "\x1b[2J",
           "\u2028", "\u202e", "\ufeff", "\ud800", "\udfff", "\U0001f600", "é", "\r\n"]
ALPHABET = "abcxyz 019_-.,:;!?'\"\\/<>[]{}=\n\téß中\U0001f600\u0000\ud800"


# -- random calls -------------------------------------------------------------------------------
def random_string(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.02:
        return rng.choice("ab") * 100_000
    if roll < 0.1:
        return rng.choice(TAGS + CONTROL)
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))


def random_value(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth < 4 and roll < 0.15:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 4 and roll < 0.3:
        return {random_string(rng)[:20]: random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([lambda: rng.randint(-10**6, 10**6), lambda: rng.randint(-10**30, 10**30),
                       lambda: rng.uniform(-1e6, 1e6), lambda: rng.choice([0.0, -0.0, 1e-300, 1.5e300, 2.0]),
                       lambda: rng.choice([True, False, None]), lambda: random_string(rng)])()


NAMES = ["search", "python", "f", "get_weather", "a.b-c", "名前", "x" * 200]


def random_calls(rng: random.Random, poison: bool) -> list[tuple[str, dict]]:
    """One to three calls of distinct tools (so one schema per name fits every call)."""
    calls = []
    for name in rng.sample(NAMES, rng.randint(1, 3)):
        args = {f"p{i}": random_value(rng) for i in range(rng.randint(0, 4))}
        calls.append((name, args))
    if poison:
        name, args = rng.choice(calls)
        args[f"p{len(args)}"] = Raw(rng.choice(POISON))
    return calls


# -- rendering in each format --------------------------------------------------------------------
def dump(value: object) -> str:
    """JSON text of `value` with `Raw` tokens written as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def render(fmt: str, calls: list[tuple[str, dict]]) -> str:
    if fmt == "hermes":
        # inside a JSON string a careful model writes `<\/tool_call>`, as the hermes docstring says
        return "\n".join("<tool_call>" + dump({"name": n, "arguments": a}).replace("</", "<\\/") + "</tool_call>"
                         for n, a in calls)
    if fmt == "llama3_json":
        return "<|python_tag|>" + "; ".join(dump({"name": n, "parameters": a}) for n, a in calls)
    if fmt == "mistral":
        return "[TOOL_CALLS]" + dump([{"name": n, "arguments": a} for n, a in calls])
    return "".join(f"<tool_call>\n<function={n}>\n" + "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else dump(v)}\n</parameter>\n" for k, v in a.items())
        + "</function>\n</tool_call>\n" for n, a in calls)


def json_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), "string")


def schemas_for(calls: list[tuple[str, dict]]) -> dict[str, dict]:
    """Schemas that declare each argument's own type, so qwen3_coder can type its bare text back."""
    return {n: {"type": "object", "properties": {k: {"type": json_type(v)} for k, v in a.items()}} for n, a in calls}


def qwen_round_trips(calls: list[tuple[str, dict]]) -> bool:
    """Whether qwen3_coder can give these calls back: bare text holds no tags and no edge newlines."""
    markers = ("<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>")
    texts = [n for n, _ in calls] + [k for _, a in calls for k in a] + [
        v if isinstance(v, str) else dump(v) for _, a in calls for v in a.values()]
    names_ok = all(n.strip() == n and ">" not in n and "\n" not in n for n, _ in calls)
    edges_ok = all(not (isinstance(v, str) and (v.startswith("\n") or v.endswith("\n")))
                   for _, a in calls for v in a.values())
    return names_ok and edges_ok and not any(m in t for t in texts for m in markers)


# -- mutations ---------------------------------------------------------------------------------
def mutate(rng: random.Random, text: str) -> str:
    at = rng.randint(0, len(text))
    kind = rng.randrange(8)
    if kind == 0:  # cut short (a stream, or max_tokens)
        return text[:at]
    if kind == 1:  # a tag repeated, now and then 16,000 times
        return text[:at] + rng.choice(TAGS) * rng.choice([2, 50, 1000, 16_000] if rng.random() < 0.1 else [2, 7, 50]) \
            + text[at:]
    if kind == 2:  # control tokens, lone surrogates, odd unicode
        return text[:at] + "".join(rng.choice(CONTROL) for _ in range(rng.randint(1, 4))) + text[at:]
    if kind == 3:  # a character deleted
        return text[:at] + text[at + 1:]
    if kind == 4:  # a slice doubled
        end = rng.randint(at, min(len(text), at + 200))
        return text[:end] + text[at:end] + text[end:]
    if kind == 5:  # a value JSON does not have, written anywhere
        return text[:at] + rng.choice(POISON) + text[at:]
    if kind == 6:  # text of another format spliced in
        other = render(rng.choice(FORMATS), random_calls(rng, poison=False))
        return text[:at] + other + text[at:]
    return text[:at] + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 8))) + text[at:]


# -- the invariants ----------------------------------------------------------------------------
def json_clean(value: object, depth: int = 0) -> bool:
    """Made of JSON values only, with finite floats and bounded ints."""
    if depth > 70:
        return False
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -INT_BOUND < value < INT_BOUND
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(json_clean(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_clean(v, depth + 1) for k, v in value.items())
    return False


def check_turn(turn: object, label: str) -> None:
    assert isinstance(turn, ParsedTurn) and isinstance(turn.content, str), label
    assert len(turn.calls) + len(turn.issues) <= MAX_PARSED_CALLS + 1, label
    for issue in turn.issues:
        assert isinstance(issue, ParseIssue) and isinstance(issue.message, str), label
        assert 0 < len(issue.message) <= MAX_MESSAGE_CHARS and len(issue.snippet) <= 200, (label, issue.message[:300])
    for call in turn.calls:
        assert isinstance(call, ToolCall) and isinstance(call.name, str) and call.name, label
        assert isinstance(call.arguments, dict) and json_clean(call.arguments), (label, call.name[:80])
        json.dumps(call.arguments, allow_nan=False)  # what a tool gets can be written back as JSON


def timed_parse(fmt: str, text: str, tools: dict | None, label: str) -> ParsedTurn:
    start = time.perf_counter()
    turn = get_parser(fmt)(text, tools)
    elapsed = time.perf_counter() - start
    assert elapsed < CASE_SECONDS, f"{label}: {elapsed:.2f} s on {len(text)} characters: {text[:200]!r}"
    check_turn(turn, label)
    return turn


def plain(calls: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(n, json.loads(json.dumps(a))) for n, a in calls]


@pytest.mark.parametrize("block", range(BLOCKS))
def test_parsers_survive_seeded_fuzzing(block):
    rng = random.Random(1000 + block)
    refused = round_tripped = 0
    for case in range(CASES_PER_BLOCK):
        fmt = FORMATS[case % len(FORMATS)]
        poison = rng.random() < 0.25
        calls = random_calls(rng, poison)
        text = render(fmt, calls)
        mutated = rng.random() < 0.7
        for _ in range(rng.randint(1, 3) if mutated else 0):
            text = mutate(rng, text)
        label = f"seed {1000 + block} case {case} ({fmt}{', mutated' if mutated else ''})"
        tools = schemas_for([(n, {k: v for k, v in a.items() if not isinstance(v, Raw)}) for n, a in calls])
        for parser in FORMATS:
            for schemas in (None, tools):
                turn = timed_parse(parser, text, schemas, f"{label}, parsed by {parser}")
                if parser != fmt or mutated:
                    continue
                if poison and fmt != "qwen3_coder":  # JSON formats refuse the call holding it
                    assert len(turn.calls) < len(calls) and turn.issues, label
                    refused += 1
                elif not poison and (fmt != "qwen3_coder" or (schemas is not None and qwen_round_trips(calls))):
                    assert [(c.name, c.arguments) for c in turn.calls] == plain(calls) and not turn.issues, label
                    round_tripped += 1
    # the exact checks ran often enough to mean something
    assert refused > 20 and round_tripped > 100, (refused, round_tripped)
