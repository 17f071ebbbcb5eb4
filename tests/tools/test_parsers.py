"""The hermes parser: calls, several per turn, and malformed calls reported as issues (never raised)."""

from __future__ import annotations

import pytest

from agentrl.errors import RegistryError
from agentrl.tools.parsers import MAX_JSON_DEPTH, get_parser, parse_hermes


def test_plain_text_has_no_calls():
    turn = parse_hermes("The answer is 4.")
    assert turn.calls == () and turn.issues == () and turn.content == "The answer is 4."


def test_several_calls_and_string_arguments():
    text = ('Let me compute. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": [2]}"}</tool_call>')
    turn = parse_hermes(text)
    assert [(c.name, c.arguments) for c in turn.calls] == [("a", {"x": 1}), ("b", {"y": [2]})]
    assert turn.content == "Let me compute."
    assert [c.id for c in turn.calls] == ["call_0", "call_1"]


@pytest.mark.parametrize("body,fragment", [
    ('{"name": "a", "arguments": {', "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"arguments": {}}', 'string "name"'),
    ('{"name": "a", "arguments": [1]}', "must be a JSON object"),
    ('{"name": "a", "arguments": "not json"}', "not valid JSON"),
    ('{"name": "a", "arguments": ' + "[" * (MAX_JSON_DEPTH + 5) + "]" * (MAX_JSON_DEPTH + 5) + "}", "nested deeper"),
    ("{" * 100_000, "nested deeper"),
])
def test_malformed_calls_become_issues(body, fragment):
    turn = parse_hermes(f"<tool_call>{body}</tool_call>")
    assert turn.calls == ()
    assert len(turn.issues) == 1 and fragment in turn.issues[0].message


def test_unclosed_call_is_an_issue():
    turn = parse_hermes('<tool_call>{"name": "a", "arguments": {}}')
    assert turn.calls == () and "not closed" in turn.issues[0].message


def test_parser_registry_suggests_names():
    assert get_parser("hermes") is parse_hermes
    with pytest.raises(RegistryError, match="Did you mean 'hermes'"):
        get_parser("hermez")


def _hermes_reference(text: str):
    """The obvious implementation (a lazy regular expression), slow on huge turns: what parse_hermes must match."""
    import re

    from agentrl.tools.parsers import ParseIssue, ToolCall, call_from_json

    calls, issues = [], []
    for i, m in enumerate(re.finditer(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S)):
        if not m.group(0).endswith("</tool_call>"):
            issues.append(ParseIssue("tool call is not closed with </tool_call>"))
            continue
        out = call_from_json(m.group(1).strip(), i)
        (calls if isinstance(out, ToolCall) else issues).append(out)
    first = text.find("<tool_call>")
    return (text if first < 0 else text[:first]).strip(), calls, [x.message for x in issues]


def test_hermes_matches_the_reference_on_random_turns():
    import random

    rng = random.Random(0)
    pieces = ["<tool_call>", "</tool_call>", '{"name": "a", "arguments": {"x": 1}}', '{"name": "b"}', "{", "}",
              "text", "\n", " ", '"', "</tool_call", "<tool_call"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        turn = parse_hermes(text)
        content, calls, issues = _hermes_reference(text)
        assert (turn.content, list(turn.calls), [x.message for x in turn.issues]) == (content, calls, issues), text


def test_a_huge_turn_is_cheap():
    import time

    text = '<tool_call>{"name": "a", "arguments": {"x": "' + "x" * 50_000_000 + '"}}</tool_call>'
    start = time.perf_counter()
    turn = parse_hermes(text)
    assert "limit is" in turn.issues[0].message
    assert time.perf_counter() - start < 1.0  # the lazy regex took ~2 s here on a loaded 2-core host
