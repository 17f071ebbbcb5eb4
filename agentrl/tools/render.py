"""Tool results and tool exceptions as text: any Python object, bounded in size, never raising.

A tool can return anything: an integer of a million digits (whose `str` raises), a list that
contains itself, an object whose `__str__` raises or never returns, a 100 MB string, NaN.
`render_value` writes JSON-like text for the builtin types without calling any code the tool
defined (subclasses of builtins are read through the builtin's own methods, as `json.dumps`
does), stops at a character budget, and marks what it cut. Only objects of other types need
their own `__str__`; the caller decides where that may run (the executor runs it in the tool's
thread, under the tool's timeout), since no code in this process can stop a `__str__` that loops.

JSON-compatible values render exactly as `json.dumps(value, ensure_ascii=False)` does; a
top-level `str` or `bytes` is the text itself (not quoted), as is a top-level foreign object's
`str()`.
"""

from __future__ import annotations

import builtins
import json
import math
import re
from dataclasses import dataclass

MAX_DEPTH = 64
# CPython refuses to print ints over 4,300 digits (and printing is quadratic in the digits); this
# many bits is about 4,200 digits, so anything larger is described instead of printed.
MAX_PRINTED_INT_BITS = 14_000
_LOG10_2 = math.log10(2)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BUILTIN_EXCEPTIONS = frozenset(v for v in vars(builtins).values() if isinstance(v, type) and issubclass(v, BaseException))
_PLAIN_ARGS = (str, int, float, bool, type(None))


class NeedsUserCode(Exception):
    """Raised by `render_value(..., allow_user_code=False)` on an object only its own `__str__` can print."""


@dataclass(frozen=True)
class Rendered:
    """Text of a value, at most `limit` characters.

    Attributes:
        text: The text (a prefix when `cut`).
        total: The full length when known (strings, bytes); None when rendering stopped at the budget.
        cut: Whether `text` is shorter than the full rendering.
    """

    text: str
    total: int | None
    cut: bool


class _Full(Exception):
    """The budget is spent: unwind the rendering."""


def type_name(obj: object) -> str:
    """The name of `obj`'s real type, read without running code the tool defined."""
    try:
        name = type.__dict__["__name__"].__get__(type(obj))
        return name if type(name) is str else "object"
    except Exception:  # noqa: BLE001 - a type whose name cannot be read is still a type
        return "object"


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD, so it encodes as UTF-8 (tokenizers need that)."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


class _Writer:
    def __init__(self, budget: int, allow_user_code: bool):
        self.parts: list[str] = []
        self.room = budget
        self.allow_user_code = allow_user_code
        self.on_path: set[int] = set()  # containers being written, to find cycles

    def put(self, text: str) -> None:
        if len(text) > self.room:
            self.parts.append(text[: self.room])
            self.room = 0
            raise _Full
        self.parts.append(text)
        self.room -= len(text)

    def string(self, s: str) -> None:
        # Cut before escaping: escaping at most sextuples the length, so this stays bounded.
        self.put(json.dumps(str.__getitem__(s, slice(0, self.room + 1)), ensure_ascii=False))

    def value(self, v: object, depth: int) -> None:
        t = type(v)
        if v is None or t is bool:
            self.put("null" if v is None else ("true" if v else "false"))
        elif issubclass(t, str):
            self.string(v)  # type: ignore[arg-type]
        elif issubclass(t, int):
            self.put(_int_text(v))  # type: ignore[arg-type]
        elif issubclass(t, float):
            self.put(_float_text(v))  # type: ignore[arg-type]
        elif issubclass(t, (bytes, bytearray)):
            self.string(_decode_prefix(v, self.room + 1))  # type: ignore[arg-type]
        elif issubclass(t, (list, tuple, dict, set, frozenset)):
            self.container(v, t, depth)
        elif self.allow_user_code:
            self.string(_foreign_text(v, self.room + 1))
        else:
            raise NeedsUserCode(type_name(v))

    def container(self, v: object, t: type, depth: int) -> None:
        opening, closing = ("{", "}") if issubclass(t, dict) else ("[", "]")
        if id(v) in self.on_path:
            self.put(opening + "..." + closing)  # a container that holds itself, as repr() shows it
            return
        if depth >= MAX_DEPTH:
            self.put(f'"<nested deeper than {MAX_DEPTH} levels>"')
            return
        self.on_path.add(id(v))
        self.put(opening)
        if issubclass(t, dict):
            for i, (key, item) in enumerate(dict.items(v)):  # type: ignore[arg-type]
                self.put(", " if i else "")
                self.string(key if issubclass(type(key), str) else _key_text(key, self))
                self.put(": ")
                self.value(item, depth + 1)
        else:
            base = next(b for b in (list, tuple, set, frozenset) if issubclass(t, b))
            for i, item in enumerate(base.__iter__(v)):  # the builtin's iterator, not an override
                self.put(", " if i else "")
                self.value(item, depth + 1)
        self.put(closing)
        self.on_path.discard(id(v))


def _int_text(v: int) -> str:
    bits = int.bit_length(v)
    if bits <= MAX_PRINTED_INT_BITS:
        try:
            return int.__repr__(v)
        except ValueError:  # the process lowered sys.set_int_max_str_digits
            pass
    return f'"<integer of about {int(bits * _LOG10_2) + 1} digits: too long to print>"'


def _float_text(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return float.__repr__(v)


def _decode_prefix(v: bytes | bytearray, chars: int) -> str:
    # A UTF-8 character is at most 4 bytes, so this many bytes always yield `chars` characters.
    base = bytes if issubclass(type(v), bytes) else bytearray
    return bytes(base.__getitem__(v, slice(0, 4 * chars))).decode("utf-8", errors="replace")


def _key_text(key: object, writer: _Writer) -> str:
    """A non-string dict key as JSON writes it (1 -> "1", None -> "null"), others rendered."""
    sub = _Writer(200, writer.allow_user_code)
    try:
        sub.value(key, MAX_DEPTH - 1)
    except _Full:
        pass
    text = "".join(sub.parts)
    return text[1:-1] if text.startswith('"') and text.endswith('"') and len(text) >= 2 else text


def _foreign_text(v: object, chars: int) -> str:
    """`str(v)`, cut to `chars`; a description when `__str__` raises (or returns a non-string)."""
    try:
        text = str(v)
    except Exception as exc:  # noqa: BLE001 - any failure of the object's own code
        return f"<{type_name(v)} object: str() raised {type_name(exc)}>"
    return str.__getitem__(text, slice(0, chars))


def render_value(value: object, limit: int, *, allow_user_code: bool = True) -> Rendered:
    """Text of a tool's return value, at most `limit` characters; never raises for the value.

    Args:
        value: What the tool returned.
        limit: Maximum characters of text.
        allow_user_code: When False, raise `NeedsUserCode` instead of calling a foreign
            object's `__str__` (so the caller can run it where a hang is bounded).

    Example:
        >>> render_value({"a": [1, 2.5, None]}, 100).text
        '{"a": [1, 2.5, null]}'
        >>> render_value(10**5000, 100).text
        '<integer of about 5001 digits: too long to print>'
    """
    t = type(value)
    try:
        if issubclass(t, str):
            return Rendered(valid_unicode(str.__getitem__(value, slice(0, limit))), str.__len__(value),
                            str.__len__(value) > limit)
        if issubclass(t, (bytes, bytearray)):
            text = _decode_prefix(value, limit + 1)  # type: ignore[arg-type]
            whole = (bytes if issubclass(t, bytes) else bytearray).__len__(value) <= 4 * (limit + 1)
            return Rendered(text[:limit], len(text) if whole else None, len(text) > limit or not whole)
        if issubclass(t, int) and t is not bool:
            text = _int_text(value)  # type: ignore[arg-type]
            text = text[1:-1] if text.startswith('"') else text  # the description needs no JSON quotes here
            return Rendered(text[:limit], None if len(text) > limit else len(text), len(text) > limit)
        if not issubclass(t, (type(None), bool, float, list, tuple, dict, set, frozenset)):
            if not allow_user_code:
                raise NeedsUserCode(type_name(value))
            text = _foreign_text(value, limit + 1)
            return Rendered(valid_unicode(text[:limit]), None if len(text) > limit else len(text), len(text) > limit)
        writer = _Writer(limit + 1, allow_user_code)
        try:
            writer.value(value, 0)
        except _Full:
            pass
        text = "".join(writer.parts)
        return Rendered(valid_unicode(text[:limit]), None if len(text) > limit else len(text), len(text) > limit)
    except NeedsUserCode:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a container another thread resized while it was read
        return Rendered(f"<{type_name(value)} that could not be printed: {type_name(exc)}>"[:limit], None, False)


def describe_exception(exc: BaseException, limit: int = 300, *, allow_user_code: bool = True,
                       plain_types: tuple[type, ...] = ()) -> str:
    """`"TypeName: message"` of an exception, the message cut to `limit`; never raises.

    The message is `str(exc)`, which runs the exception's own `__str__` (and its arguments'); with
    `allow_user_code=False` that is done only for builtin exception types (and `plain_types`,
    exactly) holding plain arguments, and anything else raises `NeedsUserCode`.
    """
    name = type_name(exc)
    if not allow_user_code and not _plain_exception(exc, plain_types):
        raise NeedsUserCode(name)
    try:
        message = str(exc)
        if not issubclass(type(message), str):
            raise TypeError
    except Exception:  # noqa: BLE001 - an exception whose message cannot be read is still reported
        return f"{name}: <message could not be printed>"
    message = valid_unicode(str.__getitem__(message, slice(0, limit)))
    return f"{name}: {message}" if message else name


def _plain_exception(exc: BaseException, plain_types: tuple[type, ...]) -> bool:
    t = type(exc)
    if t not in _BUILTIN_EXCEPTIONS and t not in plain_types:
        return False
    args = BaseException.args.__get__(exc)
    return all(type(a) in _PLAIN_ARGS and not (type(a) is int and int.bit_length(a) > MAX_PRINTED_INT_BITS)
               for a in args)
