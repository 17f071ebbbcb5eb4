"""The llama3_json and mistral parsers (qwen3_coder has its own file), and what every parser must do:
several calls per turn, malformed and hostile calls reported as issues (never raised), streaming
safety (any prefix of a turn parses), linear time on hostile repetitions."""

from __future__ import annotations

import json
import time

import pytest

from agentrl.errors import RegistryError
from agentrl.tools.parsers import (
    MAX_CALL_CHARS,
    MAX_JSON_DEPTH,
    MAX_PARSED_CALLS,
    PARSERS,
    ParsedTurn,
    bind_parser,
    get_parser,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
)
from agentrl.tools.qwen3_coder_parser import parse_qwen3_coder


def _calls(turn: ParsedTurn) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in turn.calls]


def _one_issue(turn: ParsedTurn, fragment: str) -> None:
    assert turn.calls == ()
    assert len(turn.issues) == 1 and fragment in turn.issues[0].message, turn.issues


@pytest.mark.parametrize("name,fn", [("llama3_json", parse_llama3_json), ("mistral", parse_mistral),
                                     ("qwen3_coder", parse_qwen3_coder)])
def test_registered_by_name(name, fn):
    assert get_parser(name) is fn


@pytest.mark.parametrize("fn", [parse_hermes, parse_llama3_json, parse_mistral, parse_qwen3_coder])
def test_plain_text_has_no_calls(fn):
    turn = fn("The answer is {4}.")
    assert turn == ParsedTurn("The answer is {4}.", (), ())


# -- Llama 3 JSON ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "neg", "parameters": {"x": "}{"}}',
    '{"name": "add", "parameters": {"a": 1}}\n{"name": "neg", "parameters": {"x": "}{"}}',
    '<|python_tag|>{"name": "add", "parameters": {"a": 1}}<|python_tag|>{"name": "neg", "arguments": {"x": "}{"}}',
    '[{"name": "add", "parameters": {"a": 1}}, {"name": "neg", "parameters": "{\\"x\\": \\"}{\\"}"}]',
])
def test_llama3_several_calls(text):
    turn = parse_llama3_json(text)
    assert _calls(turn) == [("add", {"a": 1}), ("neg", {"x": "}{"})]
    assert [c.id for c in turn.calls] == ["call_0", "call_1"] and turn.issues == () and turn.content == ""


def test_llama3_content_around_calls():
    turn = parse_llama3_json('Let me look. {"name": "f", "parameters": {}} I will wait.')
    assert turn.content == "Let me look. I will wait." and _calls(turn) == [("f", {})]


@pytest.mark.parametrize("text,fragment", [
    ('{"name": "f", "parameters": {"x": [1, 2', "not complete"),
    ('<|python_tag|>print("hi")', "expected a JSON tool call"),
    ('{"name": "f", "parameters": [1]}', "must be a JSON object"),
    ('{"name": "", "parameters": {}}', 'string "name"'),
    ('{"name": "f", "parameters": {"x": 1,}}', "not valid JSON"),
    ('{"name": "f", "parameters": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}", "nested deeper"),
    ('{"name": "f", "parameters": {"x": "' + "a" * (MAX_CALL_CHARS + 10) + '"}}', "longer than"),
])
def test_llama3_malformed(text, fragment):
    _one_issue(parse_llama3_json(text), fragment)


# -- Mistral --------------------------------------------------------------------------------
def test_mistral_list_and_newer_forms():
    turn = parse_mistral('Checking. [TOOL_CALLS][{"name": "a", "arguments": {"q": "[TOOL_CALLS]"}}, '
                         '{"name": "b", "arguments": "{\\"n\\": 2}"}]')
    assert turn.content == "Checking." and _calls(turn) == [("a", {"q": "[TOOL_CALLS]"}), ("b", {"n": 2})]
    turn = parse_mistral('[TOOL_CALLS]a[ARGS]{"q": 1}[TOOL_CALLS]b[ARGS]{}')
    assert _calls(turn) == [("a", {"q": 1}), ("b", {})] and turn.issues == ()


def test_mistral_good_and_bad_calls_in_one_list():
    turn = parse_mistral('[TOOL_CALLS][{"name": "a", "arguments": {}}, 7, {"arguments": {}}, {"name": "c"}]')
    assert _calls(turn) == [("a", {}), ("c", {})]
    shape = '; expected {"name": "<tool>", "arguments": {...}}'
    assert [i.message for i in turn.issues] == ["tool call must be a JSON object, got int" + shape,
                                                'tool call needs a string "name"' + shape]


def test_mistral_cut_list_keeps_the_finished_calls():
    # like a cut run of hermes blocks: the finished call runs, the unfinished one is an issue
    turn = parse_mistral('[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "argum')
    assert _calls(turn) == [("a", {})] and "not complete" in turn.issues[0].message
    turn = parse_llama3_json('[{"name": "a", "parameters": {}}, {"name": "b"}')
    assert _calls(turn) == [("a", {}), ("b", {})] and "list is not complete" in turn.issues[0].message


@pytest.mark.parametrize("text,fragment", [
    ('[TOOL_CALLS][{"name": "a", "arguments": {"q": "x', "not complete"),
    ("[TOOL_CALLS]", "expected a JSON list"),
    ("[TOOL_CALLS] call a please", "expected a JSON list"),
    ("[TOOL_CALLS][]", "list is empty"),
    ('[TOOL_CALLS][{"name": "a", "arguments": {}},]', "not valid JSON"),
    ('[TOOL_CALLS]a[ARGS][1, 2]', "must be a JSON object"),
    ("[TOOL_CALLS]" + "[" * 100_000 + "]" * 100_000, "nested deeper"),
])
def test_mistral_malformed(text, fragment):
    _one_issue(parse_mistral(text), fragment)


# -- every parser --------------------------------------------------------------------------
FULL_TURNS = {
    parse_llama3_json: ('<|python_tag|>{"name": "a", "parameters": {"x": 12}}; '
                        '{"name": "b", "parameters": {"y": "t;}"}}'),
    parse_mistral: 'Ok [TOOL_CALLS][{"name": "a", "arguments": {"x": 12}}, {"name": "b", "arguments": {"y": "t]"}}]',
    parse_qwen3_coder: ("<tool_call><function=a><parameter=x>12</parameter></function></tool_call>"
                        "<tool_call><function=b><parameter=y>t</parameter></function></tool_call>"),
}


@pytest.mark.parametrize("fn", list(FULL_TURNS), ids=lambda f: f.__name__)
def test_streaming_safe_every_prefix_parses(fn):
    """A turn cut anywhere (a stream, or max_tokens) never raises and never yields a call the full
    turn does not have; cut before its end, it reports the unfinished part as one issue."""
    text = FULL_TURNS[fn]
    full = _calls(fn(text))
    assert len(full) == 2
    for cut in range(len(text)):
        turn = fn(text[:cut])
        got = _calls(turn)
        assert got == full[: len(got)], (cut, got)
    last = fn(text[:-1])
    assert len(last.issues) == 1 and len(_calls(last)) < 2 + (fn is parse_mistral)


@pytest.mark.parametrize("fn", list(FULL_TURNS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("text", [
    "", "\x00\udcff\ufffd", "<|python_tag|>", "[TOOL_CALLS]", "<tool_call>", "<function=", "{" * 100_000,
    '{"name": "a", "parameters": {}}' * 300, "[TOOL_CALLS]" * 1000, "<tool_call><function=f>" * 1000,
    "A" * (MAX_CALL_CHARS + 1000), '"' * 10_000, "\\" * 10_001,
])
def test_hostile_text_never_raises_and_stays_cheap(fn, text):
    start = time.perf_counter()
    turn = fn(text)
    assert isinstance(turn, ParsedTurn)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("fn,wrap", [
    (parse_hermes, lambda calls: "".join(f"<tool_call>{json.dumps({'name': n, 'arguments': a})}</tool_call>"
                                         for n, a in calls)),
    (parse_llama3_json, lambda calls: "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)),
    (parse_mistral, lambda calls: "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])),
    (parse_qwen3_coder, lambda calls: "".join(
        f"<tool_call><function={n}>" + "".join(f"<parameter={k}>{json.dumps(v)}</parameter>" for k, v in a.items())
        + "</function></tool_call>" for n, a in calls)),
])
def test_hundreds_of_calls_in_one_turn(fn, wrap):
    calls = [(f"tool_{i}", {"i": i, "s": f"v{i}"}) for i in range(300)]
    turn = fn(wrap(calls))
    assert _calls(turn) == calls and turn.issues == ()


# -- the JSON policy, the same in every JSON format ------------------------------------------
JSON_FORMATS = {
    parse_hermes: lambda args: '<tool_call>{"name": "f", "arguments": ' + args + "}</tool_call>",
    parse_llama3_json: lambda args: '<|python_tag|>{"name": "f", "parameters": ' + args + "}",
    parse_mistral: lambda args: '[TOOL_CALLS][{"name": "f", "arguments": ' + args + "}]",
}


@pytest.mark.parametrize("fn", list(JSON_FORMATS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("args,fragment", [
    ('{"x": NaN}', "holds NaN, which is not a JSON number"),
    ('{"x": [Infinity]}', "holds Infinity"),
    ('{"x": -Infinity}', "holds -Infinity"),
    ('{"x": 1e999}', "holds the number 1e999, which is beyond the range of a 64-bit float"),
    ('{"x": ' + "4" * 4301 + "}", "holds an integer of 4301 digits; the limit is 1000 digits"),
    ('{"x": 1, "x": 2}', "has the key 'x' twice in one object"),
    ('"{\\"x\\": NaN}"', '"arguments" of \'f\' is a string that holds NaN'),
    ('"{\\"x\\": ' + "4" * 5000 + '}"', "is a string that holds an integer of 5000 digits"),
])
def test_values_json_does_not_have_are_issues(fn, args, fragment):
    _one_issue(fn(JSON_FORMATS[fn](args)), fragment)


def test_mistral_named_form_follows_the_policy():
    _one_issue(parse_mistral('[TOOL_CALLS]f[ARGS]{"x": NaN}'), "the arguments of 'f' holds NaN")
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH  # 64 levels: allowed as the arguments' value
    assert parse_mistral('[TOOL_CALLS]f[ARGS]{"x": ' + deep[1:-1] + "}").calls[0].arguments == {"x": json.loads(
        deep[1:-1])}


# -- what every parser must do ---------------------------------------------------------------
ALL = [parse_hermes, parse_llama3_json, parse_mistral, parse_qwen3_coder]
_HOSTILE_REPETITIONS = {
    "16,000 unclosed <function=": "<tool_call>" + "<function=" * 16_000 + "</tool_call>",
    "16,000 unclosed <function=x": "<tool_call>" + "<function=x" * 16_000 + "</tool_call>",
    "16,000 unclosed <parameter=": "<tool_call><function=f>" + "<parameter=" * 16_000 + "</function></tool_call>",
    "16,000 <parameter=x> without values": ("<tool_call><function=f>" + "<parameter=x>" * 16_000
                                            + "</function></tool_call>"),
    "nested tags": ("<tool_call><function=f><parameter=p>" * 5_000) + ("</parameter></function></tool_call>" * 5_000),
    "50,000 <tool_call>": "<tool_call>" * 50_000,
    "50,000 [TOOL_CALLS]": "[TOOL_CALLS]" * 50_000,
    "50,000 <|python_tag|>": "<|python_tag|>" * 50_000,
    "1 MB of one value": "<tool_call><function=f><parameter=v>" + "x" * 2**20 + "</parameter></function></tool_call>",
    "1 MB of '{\"name\": '": '{"name": ' * (2**20 // 9),
    "1 MB of quotes and backslashes": '[TOOL_CALLS]["' + '\\"' * (2**20 // 3),
    "1 MB of '<tool_call>{\"'": '<tool_call>{"' * (2**20 // 13),
}


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize("label", list(_HOSTILE_REPETITIONS))
def test_hostile_repetitions_parse_in_linear_time(fn, label):
    # the old lazy-regex qwen3_coder parser took ~8 s on the first case here (quadratic); 2 s is
    # generous enough for a loaded CI host and still far below a quadratic scanner
    start = time.perf_counter()
    turn = fn(_HOSTILE_REPETITIONS[label], {"f": {"type": "object", "properties": {"p": {"type": "integer"}}}})
    assert time.perf_counter() - start < 2.0
    assert all(i.message for i in turn.issues) and len(turn.calls) + len(turn.issues) <= MAX_PARSED_CALLS + 1


@pytest.mark.parametrize("fn,one_call", [
    (parse_hermes, '<tool_call>{"name": "f", "arguments": {}}</tool_call>'),
    (parse_llama3_json, '{"name": "f", "parameters": {}};'),
    (parse_mistral, '[TOOL_CALLS][{"name": "f", "arguments": {}}]'),
    (parse_qwen3_coder, "<tool_call><function=f></function></tool_call>"),
])
def test_calls_past_the_cap_are_summarised(fn, one_call):
    turn = fn(one_call * (MAX_PARSED_CALLS + 500))
    assert len(turn.calls) == MAX_PARSED_CALLS and turn.calls[-1].id == f"call_{MAX_PARSED_CALLS - 1}"
    assert [i.message for i in turn.issues] == [
        f"this turn holds more than {MAX_PARSED_CALLS} tool calls; the rest were not read"]
    assert len(fn(one_call * MAX_PARSED_CALLS).calls) == MAX_PARSED_CALLS  # exactly the cap: no summary


# -- binding the tool schemas ------------------------------------------------------------------
def test_bind_parser_passes_the_schemas_to_parsers_that_take_them():
    schemas = {"f": {"type": "object", "properties": {"x": {"type": "string"}}}}
    text = "<tool_call><function=f><parameter=x>1</parameter></function></tool_call>"
    assert bind_parser("qwen3_coder", schemas)(text).calls[0].arguments == {"x": "1"}
    assert bind_parser("qwen3_coder")(text).calls[0].arguments == {"x": 1}  # no schema: JSON when it is JSON
    assert bind_parser("hermes", schemas)('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>').calls


def test_one_argument_third_party_parsers_keep_working():
    seen = []

    def legacy(text):
        seen.append(text)
        return ParsedTurn(text, (), ())

    PARSERS.register("legacy-test", legacy)
    try:
        assert bind_parser("legacy-test", {"f": {}}) is legacy and bind_parser("legacy-test")("hi").content == "hi"
    finally:
        PARSERS.unregister("legacy-test")
    assert seen == ["hi"]


def test_parsers_that_need_more_than_text_and_tools_are_refused():
    PARSERS.register("greedy-test", lambda text, tokenizer: ParsedTurn(text, (), ()))
    try:
        with pytest.raises(RegistryError, match=r"requires the arguments \['text', 'tokenizer'\]; a parser must "
                                                r"accept \(text\) or \(text, tools=None\)"):
            bind_parser("greedy-test")
    finally:
        PARSERS.unregister("greedy-test")
