"""The llama3_json, mistral and qwen3_coder parsers: several calls per turn, malformed and hostile
calls reported as issues (never raised), and streaming safety (any prefix of a turn parses)."""

from __future__ import annotations

import json
import time

import pytest

from agentrl.tools.parsers import (
    MAX_CALL_CHARS,
    MAX_JSON_DEPTH,
    ParsedTurn,
    get_parser,
    parse_llama3_json,
    parse_mistral,
    parse_qwen3_coder,
)


def _calls(turn: ParsedTurn) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in turn.calls]


def _one_issue(turn: ParsedTurn, fragment: str) -> None:
    assert turn.calls == ()
    assert len(turn.issues) == 1 and fragment in turn.issues[0].message, turn.issues


@pytest.mark.parametrize("name,fn", [("llama3_json", parse_llama3_json), ("mistral", parse_mistral),
                                     ("qwen3_coder", parse_qwen3_coder)])
def test_registered_by_name(name, fn):
    assert get_parser(name) is fn


@pytest.mark.parametrize("fn", [parse_llama3_json, parse_mistral, parse_qwen3_coder])
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
    assert [i.message for i in turn.issues] == ["tool call must be a JSON object, got int",
                                                'tool call needs a string "name"']


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


# -- Qwen3-Coder ----------------------------------------------------------------------------
QWEN_TWO_CALLS = (
    "I will search.\n<tool_call>\n<function=search>\n<parameter=query>\nbest pizza\nin town\n</parameter>\n"
    "<parameter=limit>\n5\n</parameter>\n<parameter=filters>\n{\"open\": true}\n</parameter>\n</function>\n"
    "</tool_call>\n<tool_call>\n<function=noop>\n</function>\n</tool_call>"
)


def test_qwen3_coder_several_calls_and_value_decoding():
    turn = parse_qwen3_coder(QWEN_TWO_CALLS)
    assert turn.content == "I will search." and turn.issues == ()
    # one newline trimmed at each end of a value; JSON decoded where it is JSON, else kept as text
    assert _calls(turn) == [("search", {"query": "best pizza\nin town", "limit": 5, "filters": {"open": True}}),
                            ("noop", {})]


@pytest.mark.parametrize("raw,value", [("3", 3), ("-2.5", -2.5), ("true", True), ("null", None), ('"5"', "5"),
                                       ("[1, 2]", [1, 2]), ("NaN", "NaN"), ("Infinity", "Infinity"),
                                       ("x = 1", "x = 1"), ("\n\nkept\n\n", "\nkept\n"), ("", "")])
def test_qwen3_coder_values(raw, value):
    turn = parse_qwen3_coder(f"<tool_call><function=f><parameter=v>{raw}</parameter></function></tool_call>")
    assert _calls(turn) == [("f", {"v": value})]


def test_qwen3_coder_tolerates_a_missing_parameter_close_tag_when_the_next_tag_delimits():
    turn = parse_qwen3_coder("<tool_call><function=f><parameter=a>1<parameter=b>two</function></tool_call>")
    assert _calls(turn) == [("f", {"a": 1, "b": "two"})]


@pytest.mark.parametrize("text,fragment", [
    ("<tool_call><function=f><parameter=a>1</parameter>", "not closed with </tool_call>"),
    ("<tool_call><function=f><parameter=a>1</parameter></tool_call>", "not closed with </function>"),
    ("<tool_call><function=>x</function></tool_call>", "needs a tool name"),
    ("<tool_call><function=f><parameter=>1</parameter></function></tool_call>", "has no name"),
    ("<tool_call><function=f><parameter=a>1</parameter><parameter=a>2</parameter></function></tool_call>",
     "given twice"),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', "holds no <function=NAME>"),
])
def test_qwen3_coder_malformed(text, fragment):
    _one_issue(parse_qwen3_coder(text), fragment)


def test_qwen3_coder_hostile_values_stay_strings():
    deep = "[" * 100_000 + "]" * 100_000
    turn = parse_qwen3_coder(f"<tool_call><function=f><parameter=v>{deep}</parameter></function></tool_call>")
    assert _calls(turn) == [("f", {"v": deep})]  # too deep to decode: the text itself, not a crash


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
