"""Tool-call parsers: model text in, `ToolCall`s and typed parse errors out.

A parser never raises on model text. Whatever it cannot read becomes a `ParseIssue` that the
executor turns into a tool error message, so the model learns from its malformed call and the
episode goes on. Parsers are registered by name (`hermes` first).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol

from agentrl.registry import Registry
from agentrl.tools.core import ToolCall

# Bounds that keep a hostile turn from costing the parser more than it costs to read the text.
MAX_CALL_CHARS = 1_000_000
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class ParseIssue:
    """A tool call the parser found but could not read."""

    message: str
    snippet: str = ""


@dataclass(frozen=True)
class ParsedTurn:
    """A model turn split into its plain content, its calls and its unreadable calls."""

    content: str
    calls: tuple[ToolCall, ...]
    issues: tuple[ParseIssue, ...]


class ToolCallParser(Protocol):
    def __call__(self, text: str) -> ParsedTurn: ...


PARSERS: Registry[ToolCallParser] = Registry("tool-call parser", group="agentrl.parsers")


def get_parser(name: str) -> ToolCallParser:
    return PARSERS.get(name)


def _json_depth_ok(text: str) -> bool:
    depth = 0
    in_str = False
    escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def call_from_json(body: str, index: int) -> ToolCall | ParseIssue:
    """Read `{"name": str, "arguments": object}` (arguments may also be a JSON string)."""
    snippet = body[:200]
    if len(body) > MAX_CALL_CHARS:
        return ParseIssue(f"tool call is {len(body)} characters long; the limit is {MAX_CALL_CHARS}", snippet)
    if not _json_depth_ok(body):
        return ParseIssue(f"tool call JSON is nested deeper than {MAX_JSON_DEPTH} levels", snippet)
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deeply nested"
        return ParseIssue(f"tool call is not valid JSON ({msg}); expected "
                          '{"name": "<tool>", "arguments": {...}}', snippet)
    return call_from_object(obj, index, snippet)


def call_from_object(obj: object, index: int, snippet: str = "") -> ToolCall | ParseIssue:
    """Read an already decoded `{"name": str, "arguments"|"parameters": object}`."""
    if not isinstance(obj, dict):
        return ParseIssue(f"tool call must be a JSON object, got {type(obj).__name__}", snippet)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParseIssue('tool call needs a string "name"', snippet)
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return ParseIssue(f'"arguments" of {name!r} is a string that is not valid JSON', snippet)
    if not isinstance(args, dict):
        return ParseIssue(f'"arguments" of {name!r} must be a JSON object, got {type(args).__name__}', snippet)
    return ToolCall(name=name, arguments=args, id=f"call_{index}")


_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


@PARSERS.decorator("hermes")
def parse_hermes(text: str) -> ParsedTurn:
    """Hermes / Qwen format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number.

    A call ends at the first `</tool_call>` after its opening tag, as in the serving engines' hermes
    parsers (inside a JSON string a model writes `<\\/tool_call>`). An unterminated final block
    (the turn ran out of tokens) is reported as an issue. The tags are found with `str.find`,
    not a lazy regular expression, so a 50 MB turn costs milliseconds, not seconds.
    """
    calls: list[ToolCall] = []
    issues: list[ParseIssue] = []
    first = text.find(_HERMES_OPEN)
    content = text if first < 0 else text[:first]
    start, i = first, 0
    while start >= 0:
        body_start = start + len(_HERMES_OPEN)
        end = text.find(_HERMES_CLOSE, body_start)
        if end < 0:
            issues.append(ParseIssue("tool call is not closed with </tool_call>", text[body_start : body_start + 200]))
            break
        out = call_from_json(text[body_start:end].strip(), i)
        (calls if isinstance(out, ToolCall) else issues).append(out)
        start, i = text.find(_HERMES_OPEN, end + len(_HERMES_CLOSE)), i + 1
    return ParsedTurn(content=content.strip(), calls=tuple(calls), issues=tuple(issues))


# -- helpers shared by the JSON-based formats below -------------------------------------------
_JSON_STRUCTURE = re.compile(r'["\[\]{}]')
_JSON_STRING_END = re.compile(r'["\\]')


def _json_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array that opens at `text[start]`.

    Strings (with escapes) are skipped, so brackets inside them do not count. Returns None when
    the value is not closed within `MAX_CALL_CHARS` (a turn cut short, or a hostile one); the
    regular expressions jump from one structural character to the next, so plain text is cheap.
    """
    depth, pos, limit = 0, start, min(len(text), start + MAX_CALL_CHARS)
    while True:
        m = _JSON_STRUCTURE.search(text, pos, limit)
        if m is None:
            return None
        ch, pos = m.group(), m.end()
        if ch == '"':
            while True:
                m = _JSON_STRING_END.search(text, pos, limit)
                if m is None:
                    return None
                pos = m.end() + (1 if m.group() == "\\" else 0)
                if m.group() == '"':
                    break
        elif ch in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos


def _unclosed(text: str, start: int, what: str) -> ParseIssue:
    snippet = text[start : start + 200]
    if len(text) - start > MAX_CALL_CHARS:
        return ParseIssue(f"{what} is longer than {MAX_CALL_CHARS} characters", snippet)
    return ParseIssue(f"{what} is not complete: its JSON is never closed (was the turn cut short?)", snippet)


def _calls_from_cut_list(text: str, start: int, first_index: int) -> list[ToolCall | ParseIssue]:
    """The complete calls of a JSON list that is never closed, then one issue for the rest.

    This keeps a cut list consistent with a cut run of hermes blocks: what was finished runs.
    """
    found: list[ToolCall | ParseIssue] = []
    pos = start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        end = _json_end(text, pos) if pos < len(text) and text[pos] == "{" else None
        if end is None:
            return found + [_unclosed(text, pos if pos < len(text) else start, "tool call list")]
        found.append(call_from_json(text[pos:end], first_index + len(found)))
        pos = end


def _calls_from_json_array(body: str, first_index: int) -> list[ToolCall | ParseIssue]:
    """Decode `[{call}, {call}, ...]` (depth and size checked first)."""
    if not _json_depth_ok(body):
        return [ParseIssue(f"tool call JSON is nested deeper than {MAX_JSON_DEPTH} levels", body[:200])]
    try:
        items = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deeply nested"
        return [ParseIssue(f"tool call list is not valid JSON ({msg}); "
                           'expected [{"name": ..., "arguments": {...}}]', body[:200])]
    if not items:
        return [ParseIssue("tool call list is empty", body[:200])]
    return [call_from_object(item, first_index + i, json.dumps(item)[:200]) for i, item in enumerate(items)]


# -- Llama 3.x JSON -------------------------------------------------------------------------
_PYTHON_TAG = "<|python_tag|>"
_LLAMA_CALL_START = re.compile(r'\{\s*"name"\s*:')
_LLAMA_SEPARATORS = " \t\r\n;,"


@PARSERS.decorator("llama3_json")
def parse_llama3_json(text: str) -> ParsedTurn:
    """Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`.

    Several calls may follow one another, separated by `;` or newlines (a JSON list of calls is
    read too). Calls start at the first `<|python_tag|>`, else at the first `{"name":`; the text
    before is the content, and prose after the last call is appended to it.

    Example:
        >>> parse_llama3_json('<|python_tag|>{"name": "f", "parameters": {"x": 1}}').calls[0].arguments
        {'x': 1}
    """
    tag = text.find(_PYTHON_TAG)
    m = _LLAMA_CALL_START.search(text) if tag < 0 else None
    if tag < 0 and m is None:
        return ParsedTurn(text.strip(), (), ())
    start = tag if tag >= 0 else m.start()  # type: ignore[union-attr]
    if tag < 0 and text[:start].rstrip().endswith("["):  # a JSON list of calls
        start = text.rindex("[", 0, start)
    found: list[ToolCall | ParseIssue] = []
    pos, trailing = start, ""
    while True:
        while pos < len(text) and (text[pos] in _LLAMA_SEPARATORS or text.startswith(_PYTHON_TAG, pos)):
            pos += len(_PYTHON_TAG) if text[pos] == "<" else 1
        if pos >= len(text):
            break
        if text[pos] not in "{[":
            if not found:  # `<|python_tag|>` followed by something that is not JSON
                found.append(ParseIssue('expected a JSON tool call {"name": ..., "parameters": {...}} after '
                                        "<|python_tag|>", text[pos : pos + 200]))
            else:
                trailing = text[pos:]
            break
        end = _json_end(text, pos)
        if end is None:
            cut = text[pos] == "["
            found += _calls_from_cut_list(text, pos, len(found)) if cut else [_unclosed(text, pos, "tool call")]
            break
        body = text[pos:end]
        found += [call_from_json(body, len(found))] if body[0] == "{" else _calls_from_json_array(body, len(found))
        pos = end
    content = (text[:start].strip() + " " + trailing.strip()).strip()
    return _turn(content, found)


def _turn(content: str, found: list[ToolCall | ParseIssue]) -> ParsedTurn:
    calls = tuple(x for x in found if isinstance(x, ToolCall))
    issues = tuple(x for x in found if isinstance(x, ParseIssue))
    return ParsedTurn(content=content, calls=calls, issues=issues)


# -- Mistral --------------------------------------------------------------------------------
_MISTRAL_TAG = "[TOOL_CALLS]"
_MISTRAL_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]{1,128})\[ARGS\]\s*")


def _read_mistral_group(text: str, pos: int, index: int) -> tuple[list[ToolCall | ParseIssue], int]:
    """One group after a `[TOOL_CALLS]` marker; returns what it held and where it ends."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    named = _MISTRAL_NAMED.match(text, pos)
    start = named.end() if named else pos
    if start >= len(text) or text[start] not in "[{":
        return [ParseIssue(f"expected a JSON list of calls after {_MISTRAL_TAG}, e.g. "
                           f'{_MISTRAL_TAG}[{{"name": "f", "arguments": {{}}}}]', text[pos : pos + 200])], len(text)
    end = _json_end(text, start)
    if end is None:
        cut = _calls_from_cut_list(text, start, index) if text[start] == "[" and not named else None
        return cut or [_unclosed(text, start, "tool call")], len(text)
    body = text[start:end]
    if named:  # the newer `[TOOL_CALLS]name[ARGS]{...}` form
        wrapped = '{"name": ' + json.dumps(named.group(1)) + ', "arguments": ' + body + "}"
        return [call_from_json(wrapped, index)], end
    if body[0] == "{":
        return [call_from_json(body, index)], end
    return _calls_from_json_array(body, index), end


@PARSERS.decorator("mistral")
def parse_mistral(text: str) -> ParsedTurn:
    """Mistral calls: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

    Also reads the newer `[TOOL_CALLS]name[ARGS]{...}` form and several markers in one turn. The
    text before the first marker is the content; prose after the last call is appended to it.

    Example:
        >>> parse_mistral('[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]').calls[0].name
        'f'
    """
    first = text.find(_MISTRAL_TAG)
    if first < 0:
        return ParsedTurn(text.strip(), (), ())
    found: list[ToolCall | ParseIssue] = []
    pos, trailing = first, ""
    while text.startswith(_MISTRAL_TAG, pos):
        group, pos = _read_mistral_group(text, pos + len(_MISTRAL_TAG), len(found))
        found += group
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if pos < len(text):
        trailing = text[pos:]
    return _turn((text[:first].strip() + " " + trailing.strip()).strip(), found)


# -- Qwen3-Coder XML-style ------------------------------------------------------------------
_QWEN_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.S)
_QWEN_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(</function>|(?=<function=)|\Z)", re.S)
_QWEN_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.S)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _qwen_value(raw: str) -> object:
    """A parameter value: one newline trimmed at each end, JSON-decoded when it is JSON."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    if not value.strip() or not _json_depth_ok(value):
        return value
    try:
        return json.loads(value, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return value


def _qwen_function(name: str, body: str, index: int) -> ToolCall | ParseIssue:
    snippet = f"<function={name}>{body}"[:200]
    name = name.strip()
    if not name:
        return ParseIssue("<function=...> needs a tool name, e.g. <function=search>", snippet)
    if len(body) > MAX_CALL_CHARS:
        return ParseIssue(f"tool call is {len(body)} characters long; the limit is {MAX_CALL_CHARS}", snippet)
    arguments: dict[str, object] = {}
    for m in _QWEN_PARAMETER.finditer(body):
        key = m.group(1).strip()
        if not key:
            return ParseIssue(f"a <parameter=...> of {name!r} has no name", snippet)
        if key in arguments:
            return ParseIssue(f"parameter {key!r} of {name!r} is given twice", snippet)
        arguments[key] = _qwen_value(m.group(2))
    return ToolCall(name=name, arguments=arguments, id=f"call_{index}")


@PARSERS.decorator("qwen3_coder")
def parse_qwen3_coder(text: str) -> ParsedTurn:
    """Qwen3-Coder calls: `<tool_call><function=NAME><parameter=ARG>value</parameter></function></tool_call>`.

    Values are JSON-decoded when they are JSON (`3` -> 3, `[1, 2]` -> [1, 2]) and kept as strings
    otherwise. A missing `</parameter>` is tolerated when the next tag delimits the value; an
    unclosed `<function=...>` or `<tool_call>` (a turn cut short) is an issue.

    Example:
        >>> t = parse_qwen3_coder("<tool_call><function=f><parameter=x>\\n3\\n</parameter></function></tool_call>")
        >>> t.calls[0].arguments
        {'x': 3}
    """
    first = text.find("<tool_call>")
    found: list[ToolCall | ParseIssue] = []
    for block in _QWEN_BLOCK.finditer(text):
        if not block.group(2):
            found.append(ParseIssue("tool call is not closed with </tool_call>", block.group(1)[:200]))
            continue
        functions = list(_QWEN_FUNCTION.finditer(block.group(1)))
        if not functions:
            found.append(ParseIssue("<tool_call> holds no <function=NAME>...</function>", block.group(1)[:200]))
        for fn in functions:
            if not fn.group(3):
                found.append(ParseIssue("<function=...> is not closed with </function>", fn.group(0)[:200]))
            else:
                found.append(_qwen_function(fn.group(1), fn.group(2), len(found)))
    return _turn((text if first < 0 else text[:first]).strip(), found)
