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

from agentrl.tools.context import ToolContext

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


def context_parameter(fn: Callable[..., Any]) -> str | None:
    """The name of `fn`'s parameter annotated `ToolContext` (left out of its schema), or None.

    Raises:
        TypeError: more than one parameter asks for the context.
    """
    hints = typing.get_type_hints(fn, include_extras=True)
    names = [p for p in inspect.signature(fn).parameters if _is_context(hints.get(p))]
    if len(names) > 1:
        raise TypeError(f"tool {fn.__name__!r}: only one parameter may take the ToolContext, got {names}")
    return names[0] if names else None


def _is_context(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp is ToolContext


def function_schema(fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> dict[str, Any]:
    """Build `{"name", "description", "parameters"}` for `fn`.

    A parameter annotated `ToolContext` is not described: the executor fills it (see
    `agentrl.tools.context`).

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
        if _is_context(hints.get(pname)):
            continue
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


# -- integral floats for integer parameters --------------------------------------------------
# JSON Schema calls 2.0 an integer, so validation lets it through to a parameter typed `int`; the
# function must still receive an int. Every float up to 2**53 in magnitude holds its integer
# exactly; beyond, `1e300` may not be the integer the model wrote, so it is refused instead.
MAX_EXACT_FLOAT_INT = 2**53
_MAX_WALK_DEPTH = 100


class InexactIntegerError(ValueError):
    """A float too large to stand for the integer a schema asks for; `str()` is model-facing."""


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for key in ("anyOf", "oneOf") for b in (schema.get(key) or ()) if isinstance(b, dict)]


def _kinds(node: dict[str, Any]) -> set[str] | None:
    """The JSON types one schema node names (`type`, or the members of `enum`/`const`); None: any."""
    declared = node.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    members = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]] if "const" in node else None
    if members is None:
        return None
    return {"number" if isinstance(v, float) else "integer" if isinstance(v, int) and not isinstance(v, bool)
            else "other" for v in members}


def _integer_only(schema: dict[str, Any]) -> bool:
    """Whether a number at `schema` may only be an integer (no `anyOf`/`oneOf` branch admits a float)."""
    kinds = _kinds(schema) or set()
    branches = _branches(schema)
    if not kinds and not branches:
        return False
    for branch in branches:
        more = _kinds(branch)
        if more is None:
            return False  # a branch without a type admits any value, floats included
        kinds |= more
    return "integer" in kinds and "number" not in kinds


def _child_schema(schema: dict[str, Any], key: str | None) -> Any:
    """The schema of property `key` (or of the items of an array when `key` is None)."""
    for node in [schema, *_branches(schema)]:
        if key is None:
            if isinstance(node.get("items"), dict):
                return node["items"]
            continue
        properties = node.get("properties")
        if isinstance(properties, dict) and key in properties:
            return properties[key]
        if isinstance(node.get("additionalProperties"), dict):
            return node["additionalProperties"]
    return None


def integral_floats_to_int(value: Any, schema: Any, path: str = "$", depth: int = 0) -> Any:
    """`value` with every integral float that `schema` admits only as an integer made an int.

    Call it after validation: the schema then admits the value, and the result still satisfies it.
    Dicts and lists are rebuilt where they hold such a float; everything else is returned as is.

    Raises:
        InexactIntegerError: an integral float beyond 2**53 where an integer is expected.

    Example:
        >>> integral_floats_to_int({"n": 2.0, "x": 2.0}, {"properties": {"n": {"type": "integer"},
        ...                                                            "x": {"type": "number"}}})
        {'n': 2, 'x': 2.0}
    """
    if not isinstance(schema, dict) or depth > _MAX_WALK_DEPTH:
        return value
    if isinstance(value, float):
        if not (value.is_integer() and _integer_only(schema)):
            return value
        if abs(value) > MAX_EXACT_FLOAT_INT:
            raise InexactIntegerError(f"at {path}: {value!r} is an integer written as a float beyond 2**53, where "
                                      "floats skip integers; write the integer's digits, without a decimal point "
                                      "or exponent")
        return int(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            child = _child_schema(schema, key)
            out[key] = item if child is None else integral_floats_to_int(item, child, f"{path}[{key!r}]", depth + 1)
        return out
    if isinstance(value, list):
        items = _child_schema(schema, None)
        if items is None:
            return value
        return [integral_floats_to_int(v, items, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    return value
