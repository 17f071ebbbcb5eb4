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
    if not isinstance(obj, dict):
        return ParseIssue(f"tool call must be a JSON object, got {type(obj).__name__}", snippet)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParseIssue('tool call needs a string "name"', snippet)
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return ParseIssue(f'"arguments" of {name!r} is a string that is not valid JSON', snippet)
    if not isinstance(args, dict):
        return ParseIssue(f'"arguments" of {name!r} must be a JSON object, got {type(args).__name__}', snippet)
    return ToolCall(name=name, arguments=args, id=f"call_{index}")


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


@PARSERS.decorator("hermes")
def parse_hermes(text: str) -> ParsedTurn:
    """Hermes / Qwen format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number.

    An unterminated final block (the turn ran out of tokens) is reported as an issue.
    """
    calls: list[ToolCall] = []
    issues: list[ParseIssue] = []
    first = text.find("<tool_call>")
    content = text if first < 0 else text[:first]
    for i, m in enumerate(_HERMES.finditer(text)):
        if not m.group(0).endswith("</tool_call>"):
            issues.append(ParseIssue("tool call is not closed with </tool_call>", m.group(1)[:200]))
            continue
        out = call_from_json(m.group(1).strip(), i)
        (calls if isinstance(out, ToolCall) else issues).append(out)
    return ParsedTurn(content=content.strip(), calls=tuple(calls), issues=tuple(issues))
