"""The `qwen3_coder` tool-call parser: XML-style calls whose values are bare text, typed by schema.

Format (Qwen3-Coder's chat template):

    <tool_call>
    <function=search>
    <parameter=query>
    best pizza
    </parameter>
    <parameter=limit>
    5
    </parameter>
    </function>
    </tool_call>

Reading. A block runs from `<tool_call>` to the first `</tool_call>`; an unclosed block (a turn
cut short) is an issue. Inside it each `<function=NAME>` runs to the first `</function>`, or is
an issue when the next `<function=` or the block's end comes first. Inside a function each
`<parameter=NAME>` runs to the first `</parameter>`, the next `<parameter=` or the function's end
(a missing `</parameter>` is tolerated). A tag whose name meets a newline before `>` is not a
tag. These are the rules of the lazy regular expressions this parser used to be (kept in the
tests as the reference), but the scanner finds tags with `str.find` and never searches the same
text twice, so its time is linear in the turn: the regular expressions took seconds on 16,000
unclosed `<function=` tags.

Typing. A value is its text with one newline trimmed at each end, then typed by the tool's
JSON Schema, as SGLang's and vLLM's reference `qwen3_coder` parsers do, but with strict JSON:

* a parameter that admits a string keeps its text exactly (`12345`, `3.10`, `true`, a JSON
  document, text with quotes); only `null` becomes None, and only where the schema admits null;
* otherwise the text is decoded by the strict policy of `agentrl.tools.model_json`; `true` and
  `false` are read in any case for a boolean; the result is kept when its JSON type is one the
  schema admits (an integral float such as `2.0` counts as an integer, as in JSON Schema; the
  executor turns it into an int);
* a value that does not convert stays text, so schema validation reports it as an
  `invalid_arguments` error that names the parameter and the type it needs;
* an unknown tool, a parameter the schema does not declare, or a schema that does not say a
  type: the value is JSON when it is strict JSON and its text otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from agentrl.tools.core import ToolCall
from agentrl.tools.model_json import ModelJSONError, decode_model_json
from agentrl.tools.parsers import (
    MAX_CALL_CHARS,
    MAX_PARSED_CALLS,
    ParsedTurn,
    ParseIssue,
    ToolSchemas,
    shown_name,
    turn_from,
)

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION, _FUNCTION_END = "<function=", "</function>"
_PARAMETER, _PARAMETER_END = "<parameter=", "</parameter>"
_MAX_SCHEMA_DEPTH = 32


class _Next:
    """Where `needle` next occurs in `text[:end]` at or after a position; positions must not go back.

    The last answer is kept, so a whole scan costs one pass over the text per needle, where a
    fresh search for each tag would cost a pass per tag (quadratic on thousands of unclosed tags).
    """

    __slots__ = ("text", "needle", "end", "at")

    def __init__(self, text: str, needle: str, end: int):
        self.text, self.needle, self.end = text, needle, end
        self.at = -2  # not searched yet; -1 means there is none left

    def __call__(self, pos: int) -> int:
        if self.at == -1 or self.at >= pos:
            return self.at
        self.at = self.text.find(self.needle, pos, self.end)
        return self.at


def _elements(text: str, start: int, end: int, opener: str, closer: str) -> Iterator[tuple[int, str, int, int, bool]]:
    """Each `opener NAME>body` in `text[start:end]` as (tag start, NAME, body start, body end, closed).

    The body ends at the first `closer` (closed) or at the next `opener` or `end`, whichever
    comes first (not closed). An opener whose name meets a newline or never meets `>` is skipped.
    """
    next_open, next_close = _Next(text, opener, end), _Next(text, closer, end)
    next_gt, next_newline = _Next(text, ">", end), _Next(text, "\n", end)
    pos = start
    while True:
        tag = next_open(pos)
        if tag < 0:
            return
        name_start = tag + len(opener)
        gt, newline = next_gt(name_start), next_newline(name_start)
        if gt < 0 or 0 <= newline < gt:
            pos = tag + 1
            continue
        body_start = gt + 1
        close, following = next_close(body_start), next_open(body_start)
        if close >= 0 and (following < 0 or close < following):
            yield tag, text[name_start:gt], body_start, close, True
            pos = close + len(closer)
        else:
            body_end = following if following >= 0 else end
            yield tag, text[name_start:gt], body_start, body_end, False
            pos = body_end


# -- values -----------------------------------------------------------------------------------
def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def declared_types(schema: object, depth: int = 0) -> frozenset[str] | None:
    """The JSON types a parameter's schema admits (`type`, `enum`, `const`, `anyOf`, `oneOf`).

    None when the schema does not say, i.e. any value is allowed (`{}`, a `$ref`, a branch of
    `anyOf` without a type).

    Example:
        >>> sorted(declared_types({"anyOf": [{"type": "integer"}, {"type": "null"}]}))
        ['integer', 'null']
    """
    if not isinstance(schema, Mapping) or depth > _MAX_SCHEMA_DEPTH:
        return None
    found: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        found.add(declared)
    elif isinstance(declared, list):
        found.update(t for t in declared if isinstance(t, str))
    enum = schema.get("enum")
    found.update(_json_type(v) for v in (enum if isinstance(enum, list) else ()))
    if "const" in schema:
        found.add(_json_type(schema["const"]))
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        for branch in branches if isinstance(branches, list) else ():
            sub = declared_types(branch, depth + 1)
            if sub is None:
                return None
            found |= sub
    return frozenset(found) or None


def _fits(value: object, types: frozenset[str]) -> bool:
    kind = _json_type(value)
    if kind in types or (kind == "integer" and "number" in types):
        return True
    return kind == "number" and "integer" in types and float(value).is_integer()  # type: ignore[arg-type]


def untyped_value(text: str) -> object:
    """A value without a declared type: strict JSON when it is JSON, else the text itself."""
    if not text.strip():
        return text
    try:
        return decode_model_json(text)
    except ModelJSONError:
        return text


def typed_value(text: str, schema: object) -> object:
    """One parameter's text as the value its JSON Schema declares (rules in the module docstring).

    Example:
        >>> typed_value("3.10", {"type": "string"}), typed_value("3", {"type": "integer"})
        ('3.10', 3)
        >>> typed_value("three", {"type": "integer"})  # left for validation to report
        'three'
    """
    enum = schema.get("enum") if isinstance(schema, Mapping) else None
    if isinstance(enum, list) and text in enum:
        return text
    types = declared_types(schema)
    if types is None:
        return untyped_value(text)
    if "string" in types:
        return None if text == "null" and "null" in types else text
    if "boolean" in types and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        value = decode_model_json(text)
    except ModelJSONError:
        return text
    return value if _fits(value, types) else text


def _properties(tools: ToolSchemas | None, name: str) -> Mapping[str, Any] | None:
    parameters = tools.get(name) if isinstance(tools, Mapping) else None
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    return properties if isinstance(properties, Mapping) else None


# -- calls ------------------------------------------------------------------------------------
def _trimmed(text: str, start: int, end: int) -> str:
    """`text[start:end]` less one newline at each end (the template puts values on their own lines)."""
    if start < end and text[start] == "\n":
        start += 1
    if start < end and text[end - 1] == "\n":
        end -= 1
    return text[start:end]


def _function_call(text: str, span: tuple[int, str, int, int], index: int, tools: ToolSchemas | None,
                   ) -> ToolCall | ParseIssue:
    tag, raw_name, body_start, body_end = span
    snippet = text[tag : min(tag + 200, body_end)]
    name = raw_name.strip()
    if not name:
        return ParseIssue("<function=...> needs a tool name, e.g. <function=search>", snippet)
    if body_end - body_start > MAX_CALL_CHARS:
        return ParseIssue(f"tool call is {body_end - body_start} characters long; the limit is {MAX_CALL_CHARS}",
                          snippet)
    properties = _properties(tools, name)
    arguments: dict[str, object] = {}
    for _, raw_key, value_start, value_end, _ in _elements(text, body_start, body_end, _PARAMETER, _PARAMETER_END):
        key = raw_key.strip()
        if not key:
            return ParseIssue(f"a <parameter=...> of {shown_name(name)} has no name, e.g. <parameter=query>", snippet)
        if key in arguments:
            return ParseIssue(f"parameter {shown_name(key)} of {shown_name(name)} is given twice; give it once",
                              snippet)
        value = _trimmed(text, value_start, value_end)
        schema = properties.get(key) if properties is not None else None
        arguments[key] = untyped_value(value) if schema is None else typed_value(value, schema)
    return ToolCall(name=name, arguments=arguments, id=f"call_{index}")


def _read_block(text: str, start: int, end: int, found: list[ToolCall | ParseIssue],
                tools: ToolSchemas | None) -> None:
    """Append the calls and issues of the block `text[start:end]` to `found`."""
    seen = False
    for tag, name, body_start, body_end, closed in _elements(text, start, end, _FUNCTION, _FUNCTION_END):
        seen = True
        if len(found) > MAX_PARSED_CALLS:
            return
        if closed:
            found.append(_function_call(text, (tag, name, body_start, body_end), len(found), tools))
        else:
            found.append(ParseIssue("<function=...> is not closed with </function>",
                                    text[tag : min(tag + 200, body_end)]))
    if not seen:
        found.append(ParseIssue("<tool_call> holds no <function=NAME>...</function>; expected "
                                "<tool_call><function=NAME><parameter=ARG>value</parameter></function></tool_call>",
                                text[start : min(start + 200, end)]))


def parse_qwen3_coder(text: str, tools: ToolSchemas | None = None) -> ParsedTurn:
    """Qwen3-Coder calls: `<tool_call><function=NAME><parameter=ARG>value</parameter></function></tool_call>`.

    Args:
        text: The model's turn.
        tools: Tool name -> JSON Schema of its parameters, used to type the values; without it
            (or for a tool it does not name) a value is JSON when it is JSON, else text.

    Example:
        >>> turn = parse_qwen3_coder("<tool_call><function=f><parameter=x>\\n3\\n</parameter></function></tool_call>",
        ...                          {"f": {"type": "object", "properties": {"x": {"type": "string"}}}})
        >>> turn.calls[0].arguments
        {'x': '3'}
    """
    found: list[ToolCall | ParseIssue] = []
    first = text.find(_OPEN)
    pos = first
    while pos >= 0 and len(found) <= MAX_PARSED_CALLS:
        body_start = pos + len(_OPEN)
        end = text.find(_CLOSE, body_start)
        if end < 0:
            found.append(ParseIssue("tool call is not closed with </tool_call>", text[body_start : body_start + 200]))
            break
        _read_block(text, body_start, end, found, tools)
        pos = text.find(_OPEN, end + len(_CLOSE))
    return turn_from((text if first < 0 else text[:first]).strip(), found)
