"""Reading a config: YAML bounded against hostile input, `dotted.key=value` overrides, errors that say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from agentrl.errors import ConfigError, did_you_mean
from agentrl.config.run import Config

# A config holds overrides: a few hundred values at most. These bounds are far above any real one
# and far below what hurts: PyYAML's composer recurses per nesting level (a RecursionError near
# depth 1000), and aliases are shared on load but copied by validation and JSON dumps, so nine
# nested aliases of nine items each ("billion laughs") become a MemoryError after a long stall.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


def _scan_depth(text: str, where: str) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH, reading events (the event parser does not recurse)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where} nests more than {MAX_YAML_DEPTH} levels deep (line "
                                  f"{event.start_mark.line + 1}); a config holds sections of plain values")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Count the nodes `root` expands to with aliases resolved, refusing cycles, expansions past
    MAX_YAML_NODES and duplicate keys, without expanding anything (memoised over the node graph)."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: alias chains may be far deeper than the text's nesting
        node, done = stack.pop()
        key = id(node)
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_NODES:
                raise ConfigError(f"{where} expands to more than {MAX_YAML_NODES} values through YAML aliases "
                                  f"(line {node.start_mark.line + 1}); write the values out or use fewer aliases")
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{where} has a YAML alias that contains itself (line {node.start_mark.line + 1})")
        if isinstance(node, yaml.MappingNode):
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if dup is not None:
                raise ConfigError(f"{where} gives the key {dup!r} twice in one section (line "
                                  f"{node.start_mark.line + 1}); keep one")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def safe_yaml(text: str, where: str) -> Any:
    """Parse config YAML with bounds: depth, alias expansion, duplicate keys, plain types only.

    Args:
        text: The YAML text.
        where: How to name it in errors ("configs/a.yaml", "override 'x=...'").
    """
    try:
        _scan_depth(text, where)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return None
        _check_nodes(root, where)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.steps=5", "model.path=x"]` -> [("train.steps", 5), ("model.path", "x")] (YAML-typed values)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        value = safe_yaml(raw, f"override {item[:80]!r}") if raw.strip() else ""
        out.append((key.strip(), value))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    """All problems of a config on one line: `field: what is wrong (got X)`, with "did you mean" for typos."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent: Any = model
            for p in e["loc"][:-1]:
                field = parent.model_fields.get(str(p)) if isinstance(parent, type) else None
                parent = field.annotation if field is not None else None
            if isinstance(parent, type) and issubclass(parent, BaseModel):
                msg = (f"unknown key.{did_you_mean(str(e['loc'][-1]), parent.model_fields)} "
                       f"Known: {', '.join(parent.model_fields)}")
        elif e["type"] == "missing":
            msg = "required; set it in the config file or as an override"
        elif not e["type"].startswith("value_error") and not isinstance(e.get("input"), dict):
            msg += f" (got {_short(e.get('input'))})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The override tree of a YAML config file, refused clearly when it is not a small text mapping."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a file; pass the path of a YAML file")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(p)!r} is {p.stat().st_size} bytes, more than a config's "
                              f"limit of {MAX_CONFIG_BYTES}; a config holds overrides, not data")
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); "
                          "is it a binary file?") from None
    if "\x00" in text:
        raise ConfigError(f"config file {str(p)!r} holds NUL bytes; it is not a YAML text file")
    loaded = safe_yaml(text, str(p)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (model:, env:, ...), got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file of overrides, apply `key=value` overrides, and validate."""
    tree: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, Config)) from None
