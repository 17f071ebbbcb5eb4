"""Tool-call parsers: model text in, `ToolCall`s and typed parse errors out.

A parser never raises on model text, takes time linear in the text, and returns at most
`MAX_PARSED_CALLS` calls and issues (one more issue says the rest were not read). Whatever it
cannot read becomes a `ParseIssue` that the executor turns into a tool error message, so the
model learns from its malformed call and the episode goes on. JSON inside a call is decoded by
the one strict policy of `agentrl.tools.model_json` (no NaN/Infinity, no float overflow, no
integer over 1,000 digits, no duplicate keys, bounded size and depth).

Parsers are registered by name (`hermes`, `llama3_json`, `mistral`, `qwen3_coder`). A parser is
called as `parser(text, tools=None)`, where `tools` maps each tool's name to its JSON Schema
parameters; formats that write JSON carry their own types and ignore it, `qwen3_coder` (whose
values are bare text) uses it to type each value. `bind_parser` gives an env a one-argument
parser with its schemas bound; a third-party parser written as `parser(text)` still works.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agentrl.errors import RegistryError
from agentrl.registry import Registry
from agentrl.tools.core import ToolCall
from agentrl.tools.model_json import MAX_JSON_DEPTH, ModelJSONError, decode_model_json  # noqa: F401 (re-exported)

# Bounds that keep a hostile turn from costing the parser more than it costs to read the text.
MAX_CALL_CHARS = 1_000_000
# Calls and issues read from one turn; the executor runs far fewer (`max_calls_per_turn`), and a
# turn of tens of thousands of tiny calls must not become tens of thousands of objects.
MAX_PARSED_CALLS = 1024
MAX_SHOWN_NAME_CHARS = 80
_CALL_SHAPE = '{"name": "<tool>", "arguments": {...}}'

#: Tool name -> JSON Schema of its parameters (`Tool.parameters`).
ToolSchemas = Mapping[str, Mapping[str, Any]]


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
    def __call__(self, text: str, tools: ToolSchemas | None = None) -> ParsedTurn: ...


PARSERS: Registry[ToolCallParser] = Registry("tool-call parser", group="agentrl.parsers")


def get_parser(name: str) -> ToolCallParser:
    """The registered parser `name` (unknown names raise `RegistryError` with a suggestion)."""
    return PARSERS.get(name)


def _takes_tools(fn: Callable[..., Any]) -> bool:
    """Whether `fn` accepts `tools=`; raises when it needs more than the text and `tools`."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: called with the text only
        return False
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(required) > 1 + ("tools" in named and "tools" in required):
        raise RegistryError(f"tool-call parser {fn!r} requires the arguments {required}; a parser must accept "
                            "(text) or (text, tools=None) and return a ParsedTurn")
    return "tools" in named


def bind_parser(name: str, tools: ToolSchemas | None = None) -> Callable[[str], ParsedTurn]:
    """The parser `name` as a function of the text alone, with the tool schemas bound.

    A parser that does not accept `tools` (a third-party `parser(text)`) is returned as it is:
    it types values itself.

    Example:
        >>> parse = bind_parser("qwen3_coder", {"echo": {"type": "object", "properties": {"s": {"type": "string"}}}})
        >>> parse("<tool_call><function=echo><parameter=s>007</parameter></function></tool_call>").calls[0].arguments
        {'s': '007'}
    """
    parser = get_parser(name)
    if not _takes_tools(parser):
        return parser  # type: ignore[return-value]
    return functools.partial(parser, tools=dict(tools) if tools is not None else None)


def shown_name(name: str) -> str:
    """A model-written name as quoted in a message: a megabyte-long name must not flood the context."""
    return repr(name if len(name) <= MAX_SHOWN_NAME_CHARS else name[:MAX_SHOWN_NAME_CHARS] + "...")


def call_from_json(body: str, index: int) -> ToolCall | ParseIssue:
    """Read `{"name": str, "arguments": object}` (arguments may also be a JSON string)."""
    snippet = body[:200]
    if len(body) > MAX_CALL_CHARS:
        return ParseIssue(f"tool call is {len(body)} characters long; the limit is {MAX_CALL_CHARS}", snippet)
    try:
        obj = decode_model_json(body)
    except ModelJSONError as exc:
        return ParseIssue(f"tool call {exc.reason}; expected {_CALL_SHAPE}", snippet)
    return call_from_object(obj, index, snippet)


def call_from_object(obj: object, index: int, snippet: str = "") -> ToolCall | ParseIssue:
    """Read an already decoded `{"name": str, "arguments"|"parameters": object}`."""
    if not isinstance(obj, dict):
        return ParseIssue(f"tool call must be a JSON object, got {type(obj).__name__}; expected {_CALL_SHAPE}",
                          snippet)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParseIssue(f'tool call needs a string "name"; expected {_CALL_SHAPE}', snippet)
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = decode_model_json(args) if args.strip() else {}
        except ModelJSONError as exc:
            return ParseIssue(f'"arguments" of {shown_name(name)} is a string that {exc.reason}; write the '
                              "arguments as a JSON object", snippet)
    if not isinstance(args, dict):
        return ParseIssue(f'"arguments" of {shown_name(name)} must be a JSON object, got {type(args).__name__}',
                          snippet)
    return ToolCall(name=name, arguments=args, id=f"call_{index}")


def turn_from(content: str, found: list[ToolCall | ParseIssue]) -> ParsedTurn:
    """Split what a parser found, in order, into calls and issues, past `MAX_PARSED_CALLS` summarised.

    Parsers stop reading once they hold more than `MAX_PARSED_CALLS` items, so the overflow issue
    cannot say how many more there were.
    """
    if len(found) > MAX_PARSED_CALLS:
        found = found[:MAX_PARSED_CALLS] + [ParseIssue(
            f"this turn holds more than {MAX_PARSED_CALLS} tool calls; the rest were not read")]
    calls = tuple(x for x in found if isinstance(x, ToolCall))
    issues = tuple(x for x in found if isinstance(x, ParseIssue))
    return ParsedTurn(content=content, calls=calls, issues=issues)


_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


@PARSERS.decorator("hermes")
def parse_hermes(text: str, tools: ToolSchemas | None = None) -> ParsedTurn:
    """Hermes / Qwen format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number.

    A call ends at the first `</tool_call>` after its opening tag, as in the serving engines' hermes
    parsers (inside a JSON string a model writes `<\\/tool_call>`). An unterminated final block
    (the turn ran out of tokens) is reported as an issue. The tags are found with `str.find`,
    not a lazy regular expression, so a 50 MB turn costs milliseconds, not seconds. The JSON
    carries its own types, so `tools` is not used.
    """
    found: list[ToolCall | ParseIssue] = []
    first = text.find(_HERMES_OPEN)
    content = text if first < 0 else text[:first]
    start = first
    while start >= 0 and len(found) <= MAX_PARSED_CALLS:
        body_start = start + len(_HERMES_OPEN)
        end = text.find(_HERMES_CLOSE, body_start)
        if end < 0:
            found.append(ParseIssue("tool call is not closed with </tool_call>", text[body_start : body_start + 200]))
            break
        found.append(call_from_json(text[body_start:end].strip(), len(found)))
        start = text.find(_HERMES_OPEN, end + len(_HERMES_CLOSE))
    return turn_from(content.strip(), found)


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
    while len(found) <= MAX_PARSED_CALLS:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        end = _json_end(text, pos) if pos < len(text) and text[pos] == "{" else None
        if end is None:
            return found + [_unclosed(text, pos if pos < len(text) else start, "tool call list")]
        found.append(call_from_json(text[pos:end], first_index + len(found)))
        pos = end
    return found


def _calls_from_json_array(body: str, first_index: int) -> list[ToolCall | ParseIssue]:
    """Decode `[{call}, {call}, ...]` (strict JSON; at most `MAX_PARSED_CALLS` + 1 items read)."""
    try:
        items = decode_model_json(body)
    except ModelJSONError as exc:
        return [ParseIssue(f"tool call list {exc.reason}; expected [{_CALL_SHAPE}, ...]", body[:200])]
    if not items:
        return [ParseIssue(f"tool call list is empty; expected [{_CALL_SHAPE}, ...]", body[:200])]
    return [call_from_object(item, first_index + i, json.dumps(item)[:200])
            for i, item in enumerate(items[: MAX_PARSED_CALLS + 1])]


# -- Llama 3.x JSON -------------------------------------------------------------------------
_PYTHON_TAG = "<|python_tag|>"
_LLAMA_CALL_START = re.compile(r'\{\s*"name"\s*:')
_LLAMA_SEPARATORS = " \t\r\n;,"


@PARSERS.decorator("llama3_json")
def parse_llama3_json(text: str, tools: ToolSchemas | None = None) -> ParsedTurn:
    """Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`.

    Several calls may follow one another, separated by `;` or newlines (a JSON list of calls is
    read too). Calls start at the first `<|python_tag|>`, else at the first `{"name":`; the text
    before is the content, and prose after the last call is appended to it. `tools` is not used.

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
    while len(found) <= MAX_PARSED_CALLS:
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
    return turn_from(content, found)


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
        try:
            arguments = decode_model_json(body)
        except ModelJSONError as exc:
            return [ParseIssue(f"the arguments of {shown_name(named.group(1))} {exc.reason}; expected "
                               f'{_MISTRAL_TAG}name[ARGS]{{"x": 1}}', body[:200])], end
        return [call_from_object({"name": named.group(1), "arguments": arguments}, index, body[:200])], end
    if body[0] == "{":
        return [call_from_json(body, index)], end
    return _calls_from_json_array(body, index), end


@PARSERS.decorator("mistral")
def parse_mistral(text: str, tools: ToolSchemas | None = None) -> ParsedTurn:
    """Mistral calls: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

    Also reads the newer `[TOOL_CALLS]name[ARGS]{...}` form and several markers in one turn. The
    text before the first marker is the content; prose after the last call is appended to it.
    `tools` is not used.

    Example:
        >>> parse_mistral('[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]').calls[0].name
        'f'
    """
    first = text.find(_MISTRAL_TAG)
    if first < 0:
        return ParsedTurn(text.strip(), (), ())
    found: list[ToolCall | ParseIssue] = []
    pos, trailing = first, ""
    while text.startswith(_MISTRAL_TAG, pos) and len(found) <= MAX_PARSED_CALLS:
        group, pos = _read_mistral_group(text, pos + len(_MISTRAL_TAG), len(found))
        found += group
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if pos < len(text):
        trailing = text[pos:]
    return turn_from((text[:first].strip() + " " + trailing.strip()).strip(), found)


# Registered lazily: the XML-style format lives in its own module, which imports this one.
PARSERS.register("qwen3_coder", "agentrl.tools.qwen3_coder_parser:parse_qwen3_coder")
