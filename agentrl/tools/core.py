"""The tool contract: a typed function plus the policy that bounds how it runs.

A `Tool` is built from a plain (sync or async) Python function with `@tool`; its schema comes from
the signature and docstring. `ToolCall` is what a parser extracts from model text and
`ToolResult` is what goes back to the model as a tool message.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from agentrl.errors import ConfigError, ToolErrorKind
from agentrl.registry import Registry
from agentrl.tools.schema import context_parameter, function_schema


@dataclass(frozen=True)
class ToolPolicy:
    """How a tool may run (the executor enforces it; see docs/tools.md for what holds exactly).

    Attributes:
        timeout_s: Wall-clock limit of one attempt; past it the model gets a `timeout` error.
            A sync tool's thread cannot be killed: it is abandoned and runs on until it returns.
        max_concurrency: Calls of this tool in progress at once, across every episode and env
            instance of the process that holds this `Tool` object. Queued calls wait their turn;
            an abandoned call gives its slot back at its timeout.
        max_output_chars: Longer output is truncated with a marker.
        retries: Extra attempts after an infrastructure fault (not after a model's bad input).
        max_abandoned: While this many calls of the tool that passed their timeout are still
            running, new calls are refused with an `unavailable` error instead of piling up
            threads; they are accepted again as the abandoned ones return.
    """

    timeout_s: float = 10.0
    max_concurrency: int = 64
    max_output_chars: int = 4096
    retries: int = 0
    max_abandoned: int = 8

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"ToolPolicy.timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        for name, low in (("max_concurrency", 1), ("max_output_chars", 1), ("retries", 0), ("max_abandoned", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"ToolPolicy.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Tool:
    """A callable the model may invoke by name."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    policy: ToolPolicy = field(default_factory=ToolPolicy)
    #: The parameter that receives the calling episode's `ToolContext` (not in `parameters`), or None.
    context_arg: str | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def schema(self) -> dict[str, Any]:
        """OpenAI-style `{"type": "function", "function": {...}}` entry for chat templates."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    policy: ToolPolicy | None = None,
) -> Any:
    """Turn a typed function into a `Tool`.

    Example:
        >>> @tool(policy=ToolPolicy(timeout_s=2))
        ... def echo(text: str) -> str:
        ...     '''Repeat the text.
        ...
        ...     Args:
        ...         text: What to repeat.
        ...     '''
        ...     return text
        >>> echo.parameters["required"]
        ['text']
    """

    def build(f: Callable[..., Any]) -> Tool:
        schema = function_schema(f, name=name, description=description)
        return Tool(schema["name"], schema["description"], schema["parameters"], f, policy or ToolPolicy(),
                    context_parameter(f))

    return build(fn) if fn is not None else build


@runtime_checkable
class Toolset(Protocol):
    """Tools that share a resource the env must release (an MCP server, a connection pool).

    `ToolEnv` offers `tools()` and calls `close()` when the env is closed.
    """

    def tools(self) -> Sequence[Tool]: ...

    def close(self) -> None: ...


#: The attribute `env_tool` sets on a method: the keyword arguments it passes to `tool()`.
ENV_TOOL_MARK = "__agentrl_env_tool__"


def env_tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    policy: ToolPolicy | None = None,
) -> Any:
    """Mark a method of a `ToolEnv` subclass as one of that env's tools.

    Each env instance offers the method bound to itself (`self` is not in the schema), next to the
    tools given to `ToolEnv.__init__`. Like any tool it may take a `ToolContext` parameter to read
    and change the calling episode's state; keep per-episode state there rather than on `self`
    (`agentrl.tools.context` says why).

    Example:
        >>> class Game(ToolEnv):                       # doctest: +SKIP
        ...     @env_tool(policy=ToolPolicy(timeout_s=1))
        ...     def guess(self, word: str, ctx: ToolContext) -> str:
        ...         '''Guess the secret word.
        ...
        ...         Args:
        ...             word: Your guess.
        ...         '''
        ...         return "correct" if word == ctx.state["secret"] else "wrong"
    """

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        setattr(f, ENV_TOOL_MARK, {"name": name, "description": description, "policy": policy})
        return f

    return mark(fn) if fn is not None else mark


def bound_env_tools(env: object) -> list[Tool]:
    """The `env_tool` methods of `env`'s class, bound to `env`, in the order they are defined
    (base classes first)."""
    seen: dict[str, Tool] = {}
    for cls in reversed(type(env).__mro__):
        for attr, value in vars(cls).items():
            options = getattr(value, ENV_TOOL_MARK, None)
            if options is not None and callable(value):
                seen[attr] = tool(getattr(env, attr), **options)
    return list(seen.values())


#: Tool-call ids are this many alphanumeric characters: the strictest format templates ask for
#: (Mistral's refuse any other), and one every other template accepts.
CALL_ID_LENGTH = 9
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def call_id(n: int) -> str:
    """The id of an episode's `n`-th tool call: `call` and `n` in five base-36 digits (`call0000a`).

    Nine alphanumeric characters, unique for the first 36**5 calls of an episode, and a pure
    function of `n`, so seeded episodes stay deterministic.

    Example:
        >>> call_id(0), call_id(35), call_id(36)
        ('call00000', 'call0000z', 'call00010')
    """
    n %= 36**5
    digits = "".join(_BASE36[(n // 36**k) % 36] for k in reversed(range(5)))
    return "call" + digits


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from the model's text.

    `id` answers the call in its tool message (`ToolResult.call_id`). Parsers give positional
    placeholders; `ToolEnv` replaces them with `call_id(n)` before running the calls.
    """

    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call, rendered to the model as a tool message.

    `call_id` is the id of the call it answers ('' for an unreadable call, which has none).
    """

    name: str
    content: str
    call_id: str = ""
    error_kind: ToolErrorKind | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None


TOOLS: Registry[Tool] = Registry("tool", group="agentrl.tools")


def register(id: str, entry_point: str | Tool) -> None:
    """Register a tool by id so configs and envs can name it."""
    TOOLS.register(id, entry_point)


def get_tool(id: str) -> Tool:
    obj = TOOLS.get(id)
    if not isinstance(obj, Tool):
        obj = tool(obj)
    return obj
