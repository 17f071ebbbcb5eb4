"""The configuration reference (docs/configuration.md), written from the pydantic models themselves.

`agentrl/config/` is the one source of every key, default, bound and description; this module
turns it into a Markdown page, so the page cannot say anything the models do not.
`python scripts/config_reference.py` rewrites the page, and a test fails when it is stale.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

HEADER = """# Configuration reference

Every key of a run's config, generated from `agentrl/config/` by `python scripts/config_reference.py`
(do not edit by hand; `tests/test_config_reference.py` fails when this page is stale). A YAML file
holds only the keys it changes; `agentrl train CONFIG key.sub=value` overrides any key on the
command line. Unknown keys are refused with a "did you mean".
"""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"list of {inner}" if Ellipsis in args else f"({inner})"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _bounds(info: FieldInfo) -> str:
    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for meta in info.metadata:
        for attr, sign in marks.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(out)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`".replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    rows, sections = [], []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            sections.append((key, tp))
            continue
        text = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(tp)} | {_default(info)} | {_bounds(info)} | {text} |")
    return rows, sections


def _section(title: str, model: type[BaseModel], prefix: str) -> list[str]:
    rows, sections = _rows(model, prefix)
    doc = " ".join((model.__doc__ or "").split()) if model.__doc__ and "pydantic" not in model.__doc__ else ""
    out = [f"## `{title}`", ""] + ([doc, ""] if doc else [])
    if rows:
        out += ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|", *rows, ""]
    for key, sub in sections:
        out += _section(key, sub, f"{key}.")
    return out


def reference() -> str:
    """The whole page as Markdown."""
    from agentrl.config import Config, TaskEnvConfig

    lines = [HEADER]
    top, sections = _rows(Config, "")
    for key, model in sections:
        lines += _section(key, model, f"{key}.")
    lines += _section("envs[]", TaskEnvConfig, "envs[].")
    lines += ["## Top-level keys", "", "| key | type | default | bounds | meaning |", "|---|---|---|---|---|", *top, ""]
    return "\n".join(lines).rstrip() + "\n"
