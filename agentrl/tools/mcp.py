"""Tools from MCP servers: connect (stdio subprocess or streamable HTTP), list, offer, stop.

`MCPTools(server)` is a `Toolset`: it connects to an MCP server with the official `mcp` SDK, lists
its tools and turns each into an agentrl `Tool` with the server's JSON schema as its parameters,
so calls go through the same executor as native tools (schema validation, timeout, output cap,
typed errors). Give it to a `ToolEnv` with the native tools; `env.close()` releases it.

One connection serves every env of a process that names the same server: connections are shared
and counted, started by the first `MCPTools` and stopped (the subprocess ended, the HTTP session
deleted) when the last one is closed; so the envs of a pool share one server, which stops when
the pool closes. Each connection runs on its own thread and event loop, so tools work from any
loop (`ToolEnv.step` makes a fresh one per turn).

What a server can do to a call, and what the model gets:

* an `isError` result or a JSON-RPC error: a `runtime` tool error with the server's text;
* a result that is not a valid `CallToolResult`, or bytes that are not JSON-RPC: a `runtime` error
  (when the garbage cannot be tied to the call, the call runs into its timeout);
* no answer: a `timeout` error at the tool's `timeout_s` (the request is cancelled);
* a huge result: cut to the tool's `max_output_chars` like any tool's output;
* the server dies: `InfrastructureFault`; the connection is marked dead, the next attempt restarts
  the server, and a fault that outlives `ToolPolicy.retries` fails the episode as
  `tool_infrastructure` (retried by the driver, never trained on).

The live connections are in `agentrl.tools.mcp_connection`. Requires the `mcp` package
(`pip install 'agentrl[mcp]'`); it is imported only when a server is connected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from agentrl.errors import ConfigError, InfrastructureFault
from agentrl.tools.core import Tool, ToolPolicy
from agentrl.tools.mcp_connection import acquire, release, render_result, running_servers

__all__ = ["DEFAULT_POLICY", "MCPServer", "MCPTools", "http_server", "render_result", "running_servers",
           "stdio_server"]

DEFAULT_POLICY = ToolPolicy(timeout_s=30.0, retries=1)


@dataclass(frozen=True)
class MCPServer:
    """Where an MCP server is: a command to start (stdio) or a URL (streamable HTTP).

    Attributes:
        command: Program and arguments of a stdio server, e.g. ("python", "server.py").
        url: Endpoint of a streamable-HTTP server, e.g. "http://127.0.0.1:8000/mcp".
        env: Extra environment variables of a stdio server, as (name, value) pairs.
        cwd: Working directory of a stdio server.
        connect_timeout_s: Bound on starting, connecting and listing the tools.
    """

    command: tuple[str, ...] = ()
    url: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    connect_timeout_s: float = 30.0

    def __post_init__(self):
        if bool(self.command) == (self.url is not None):
            raise ConfigError("an MCPServer needs exactly one of command (a stdio server to start) and url (a "
                              f"streamable-HTTP endpoint); got command={self.command!r}, url={self.url!r}")
        if not self.connect_timeout_s > 0:
            raise ConfigError(f"MCPServer.connect_timeout_s must be > 0, got {self.connect_timeout_s!r}")

    def describe(self) -> str:
        return self.url if self.url is not None else " ".join(self.command)[:200]


def stdio_server(*command: str, env: Mapping[str, str] | None = None, cwd: str | None = None,
                 connect_timeout_s: float = 30.0) -> MCPServer:
    """An MCP server started as a subprocess and spoken to over its stdin/stdout.

    Example:
        >>> stdio_server("python", "-m", "my_mcp_server").command
        ('python', '-m', 'my_mcp_server')
    """
    return MCPServer(command=tuple(command), env=tuple(sorted((env or {}).items())), cwd=cwd,
                     connect_timeout_s=connect_timeout_s)


def http_server(url: str, connect_timeout_s: float = 30.0) -> MCPServer:
    """An MCP server reached over streamable HTTP at `url`."""
    return MCPServer(url=url, connect_timeout_s=connect_timeout_s)


@dataclass
class MCPTools:
    """The tools of one MCP server, as a `Toolset` for `ToolEnv`.

    Args:
        server: Where the server is (`stdio_server(...)` or `http_server(...)`).
        include: Names of the server's tools to offer (None: all); an unknown name is refused.
        prefix: Prepended to each tool's name (to keep two servers' tools apart).
        policy: How each call may run (timeout, output cap, retries; one retry by default, on a
            restarted server).

    Example:
        >>> tools = MCPTools(stdio_server("python", "server.py"))      # doctest: +SKIP
        >>> env = ToolEnv([calculator, tools])                          # doctest: +SKIP
    """

    server: MCPServer
    include: Sequence[str] | None = None
    prefix: str = ""
    policy: ToolPolicy = field(default=DEFAULT_POLICY)

    def __post_init__(self):
        self._conn: Any = acquire(self.server)  # a shared `mcp_connection._Connection`; None once closed
        try:
            self._tools = self._build(self._conn.tool_list)
        except BaseException:
            self.close()
            raise

    def _build(self, listed: list[Any]) -> list[Tool]:
        by_name = {t.name: t for t in listed}
        if self.include is not None:
            missing = [n for n in self.include if n not in by_name]
            if missing:
                raise ConfigError(f"the MCP server {self.server.describe()!r} has no tool(s) {missing}; it has "
                                  f"{sorted(by_name)}")
            listed = [by_name[n] for n in self.include]
        return [self._tool(t) for t in listed]

    def _tool(self, spec: Any) -> Tool:
        schema = spec.input_schema if isinstance(spec.input_schema, dict) else {}
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"the MCP server {self.server.describe()!r} gives tool {spec.name!r} an invalid input "
                              f"schema ({exc.message[:200]}); leave it out with MCPTools(include=[...])") from None
        conn, name = self._conn, spec.name

        async def call(**arguments: Any) -> str:
            if conn is None or self._conn is None:
                raise InfrastructureFault("this MCP toolset was closed")
            return await conn.call(name, arguments)

        return Tool(self.prefix + name, spec.description or "", schema, call, self.policy)

    def tools(self) -> list[Tool]:
        return list(self._tools)

    def close(self) -> None:
        """Release the shared connection (the server stops with its last user); idempotent."""
        if self._conn is not None:
            self._conn = None
            release(self.server)
