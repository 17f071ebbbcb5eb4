"""JSON Schema for a typed Python function, in the OpenAI function-calling shape.

The signature gives the parameter types (ints, floats, strings, bools, lists, dicts, Literal,
Optional, Enum) and the Google-style docstring gives the descriptions. Anything that cannot be
expressed raises at registration time, not when a model first calls the tool.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

_PRIMITIVES: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
}


def type_to_schema(tp: Any) -> dict[str, Any]:
    """Translate one annotation into a JSON Schema fragment."""
    if tp in _PRIMITIVES:
        return dict(_PRIMITIVES[tp])
    if tp is Any:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_to_schema(args[0])
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [type_to_schema(a) for a in args]}
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        item = args[0] if args and origin is not tuple else (args[0] if args and len(args) == 2 and args[1] is Ellipsis else None)
        out: dict[str, Any] = {"type": "array"}
        if item is not None:
            out["items"] = type_to_schema(item)
        return out
    if origin is dict or tp is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = type_to_schema(args[1])
        return out
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    raise TypeError(f"cannot express type {tp!r} as JSON Schema; use str, int, float, bool, list, dict, Literal or Enum")


def parse_google_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (summary, {arg: description})."""
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    parts = re.split(r"^\s*(Args|Arguments|Parameters):\s*$", doc, maxsplit=1, flags=re.M)
    summary = parts[0].strip()
    summary = re.split(r"^\s*(Returns|Raises|Example|Examples):\s*$", summary, maxsplit=1, flags=re.M)[0].strip()
    descriptions: dict[str, str] = {}
    if len(parts) == 3:
        current = None
        for line in parts[2].splitlines():
            if re.match(r"^\S", line) and line.rstrip().endswith(":"):
                break  # next section (Returns:, Raises:, ...)
            m = re.match(r"^\s{0,8}(\w+)\s*(\([^)]*\))?:\s*(.*)$", line)
            if m and (current is None or len(line) - len(line.lstrip()) <= 4):
                current = m.group(1)
                descriptions[current] = m.group(3).strip()
            elif current and line.strip():
                descriptions[current] = (descriptions[current] + " " + line.strip()).strip()
    return summary, descriptions


def function_schema(fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> dict[str, Any]:
    """Build `{"name", "description", "parameters"}` for `fn`.

    Example:
        >>> def add(a: int, b: int = 0) -> int:
        ...     '''Add two numbers.
        ...
        ...     Args:
        ...         a: First term.
        ...         b: Second term.
        ...     '''
        >>> function_schema(add)["parameters"]["required"]
        ['a']
    """
    summary, arg_docs = parse_google_docstring(fn.__doc__)
    hints = typing.get_type_hints(fn, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {fn.__name__!r}: *args/**kwargs cannot be described to a model")
        if pname not in hints:
            raise TypeError(f"tool {fn.__name__!r}: parameter {pname!r} needs a type annotation")
        prop = type_to_schema(hints[pname])
        if pname in arg_docs:
            prop["description"] = arg_docs[pname]
        if param.default is param.empty:
            required.append(pname)
        elif param.default is None or isinstance(param.default, (str, int, float, bool)):
            prop["default"] = param.default
        properties[pname] = prop
    return {
        "name": name or fn.__name__,
        "description": description if description is not None else summary,
        "parameters": {"type": "object", "properties": properties, "required": required, "additionalProperties": False},
    }
