"""One decoding policy for JSON written by a model: strict, bounded, and never a stray exception.

Python's `json.loads` is lenient where a tool must not be: it reads `NaN`, `Infinity` and
`-Infinity` (not JSON), turns `1e999` into `inf`, lets the last of two equal keys win without a
word, and raises a bare `ValueError` on an integer of more than 4,300 digits (the interpreter's
int-from-string limit, `sys.set_int_max_str_digits`). It also recurses once per nesting level.
Every parser decodes model-written JSON through `decode_model_json`, which refuses all of these
with a `ModelJSONError` whose `reason` tells the model what to write instead:

* size: at most `MAX_JSON_CHARS` characters; depth: at most `MAX_JSON_DEPTH` nested arrays or
  objects (checked by a linear scan before decoding, so a deep document never recurses);
* numbers: `NaN`/`Infinity`/`-Infinity` are refused; a float literal that overflows a 64-bit
  float (`1e999`) is refused; an integer literal of more than `MAX_INT_DIGITS` digits is refused
  (the model is told to pass such a number as a string), so no integer conversion can be slow
  or hit the interpreter's limit;
* objects: a key given twice in one object is refused.

What decodes is made of `dict` (str keys), `list`, `str`, `int`, `float` (finite), `bool` and
`None` only. Strings may hold lone surrogates (`"\\ud800"` is valid JSON); they are kept.
"""

from __future__ import annotations

import json
import math
from typing import Any

from agentrl.errors import AgentRLError

MAX_JSON_CHARS = 1_000_000
MAX_JSON_DEPTH = 64
# Far beyond any quantity a tool needs (a 64-bit integer has 20 digits) and far below the
# interpreter's 4,300-digit limit, so `int()` is never slow and never raises here.
MAX_INT_DIGITS = 1000
_SHOWN_KEY_CHARS = 80


class ModelJSONError(AgentRLError, ValueError):
    """Model-written JSON that the policy refuses.

    Attributes:
        reason: Model-facing clause that completes a sentence whose subject is the text, e.g.
            "is not valid JSON (Expecting value at character 0)". Callers prefix the subject
            ("tool call", '"arguments" of \\'f\\'') and, where useful, the shape they expected.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _refuse_constant(name: str) -> Any:
    raise ModelJSONError(f"holds {name}, which is not a JSON number; write a finite number, or null")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        shown = literal if len(literal) <= 40 else literal[:37] + "..."
        raise ModelJSONError(f"holds the number {shown}, which is beyond the range of a 64-bit float "
                             "(about 1.8e308); write a smaller number, or pass it as a string")
    return value


def _bounded_int(literal: str) -> int:
    digits = len(literal) - (literal[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise ModelJSONError(f"holds an integer of {digits} digits; the limit is {MAX_INT_DIGITS} digits "
                             "(pass a longer number as a string)")
    try:
        return int(literal)
    except ValueError as exc:  # the interpreter's own digit limit, if a user lowered it below ours
        raise ModelJSONError(f"holds an integer of {digits} digits, too long to read here "
                             "(pass it as a string)") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                shown = key if len(key) <= _SHOWN_KEY_CHARS else key[:_SHOWN_KEY_CHARS] + "..."
                raise ModelJSONError(f"has the key {shown!r} twice in one object; give each key once")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_int=_bounded_int,
                            parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array or object in `text` is nested deeper than `limit` (strings skipped).

    One pass over the characters (about 30 ms per megabyte; a regular expression that jumps
    between structural characters is five times slower on bracket-dense text). Reads any text,
    JSON or not, and never raises.
    """
    depth = 0
    in_str = escaped = False
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
        elif ch == "[" or ch == "{":
            depth += 1
            if depth > limit:
                return False
        elif ch == "]" or ch == "}":
            depth -= 1
    return True


def decode_model_json(text: str) -> Any:
    """Decode `text` as strict JSON under the policy above.

    Raises:
        ModelJSONError: for anything the policy refuses, with a model-facing `reason`.

    Example:
        >>> decode_model_json('{"x": [1, 2.5, "t"]}')
        {'x': [1, 2.5, 't']}
        >>> decode_model_json('{"x": NaN}')
        Traceback (most recent call last):
        ...
        agentrl.tools.model_json.ModelJSONError: holds NaN, which is not a JSON number; write a finite number, or null
    """
    if len(text) > MAX_JSON_CHARS:
        raise ModelJSONError(f"is {len(text)} characters long; the limit is {MAX_JSON_CHARS}")
    if not json_depth_ok(text):
        raise ModelJSONError(f"is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ModelJSONError(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:  # only reachable when the caller's own stack is nearly full
        raise ModelJSONError(f"is nested deeper than {MAX_JSON_DEPTH} levels") from None
