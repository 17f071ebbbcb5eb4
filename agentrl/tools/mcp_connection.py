"""The live side of MCP tools: one session per server on a thread of its own, shared and counted.

`agentrl.tools.mcp` is the user-facing half (server descriptions, `MCPTools`); this module holds
the connection it acquires: started by its first user and stopped by its last, restarted when
the server died, and the rules that turn what a server sends into text or typed errors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from agentrl.errors import ConfigError, InfrastructureFault, ToolError, ToolErrorKind

if TYPE_CHECKING:
    from agentrl.tools.mcp import MCPServer

logger = logging.getLogger("agentrl.tools.mcp")

_STOP_GRACE_S = 10.0

def _import_mcp() -> Any:
    try:
        import mcp  # noqa: F401
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client
    except ImportError as exc:
        raise ConfigError(f"MCP tools need the mcp package ({exc}); install it with "
                          "pip install 'agentrl[mcp]'") from None
    return ClientSession, StdioServerParameters, stdio_client, streamable_http_client


class _Connection:
    """One live session with a server, on a thread of its own; restarted when it dies."""

    def __init__(self, server: MCPServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agentrl-mcp", daemon=True)
        self.thread.start()
        self._restart = threading.Lock()
        self._session: Any = None
        self._stop: asyncio.Event | None = None
        self._runner: concurrent.futures.Future | None = None
        self.dead = True
        self.tool_list: list[Any] = []

    def _submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self) -> None:
        """Connect and list the tools (bounded by connect_timeout_s); raises InfrastructureFault."""
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._runner = self._submit(self._run(ready))
        try:  # `_run` bounds the connection itself; the extra time is for stopping what it started
            self.tool_list = ready.result(timeout=self.server.connect_timeout_s + 2 * _STOP_GRACE_S)
        except TimeoutError:  # the connection's own bound (anyio's), or ours above it
            self._end_runner()
            raise InfrastructureFault(f"the MCP server {self.server.describe()!r} did not connect and list its tools "
                                      f"within {self.server.connect_timeout_s:g} s") from None
        except Exception as exc:  # noqa: BLE001 - whatever the SDK or transport raised
            self._end_runner()
            raise InfrastructureFault(f"cannot connect to the MCP server {self.server.describe()!r}: "
                                      f"{_first_line(exc)}") from None
        self.dead = False

    async def _run(self, ready: concurrent.futures.Future) -> None:
        ClientSession, StdioServerParameters, stdio_client, streamable_http_client = _import_mcp()
        import anyio
        self._stop = asyncio.Event()
        s = self.server
        if s.url is not None:
            transport = streamable_http_client(s.url)
        else:
            params = StdioServerParameters(command=s.command[0], args=list(s.command[1:]), env=dict(s.env) or None,
                                           cwd=s.cwd)
            transport = stdio_client(params, errlog=_DEVNULL)
        try:
            async with transport as streams, ClientSession(streams[0], streams[1],
                                                           message_handler=self._on_message) as session:
                # anyio's cancel scope, not asyncio's: the SDK's shutdown (which stops the process)
                # is shielded against it, and would not be against a native task cancellation
                with anyio.fail_after(s.connect_timeout_s):
                    await session.initialize()
                    tools = await _list_all(session)
                self._session = session
                ready.set_result(tools)
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - a dead server must not take the thread down
            if not ready.done():
                leaf = _leaf(exc)
                ready.set_exception(leaf if isinstance(leaf, Exception) else RuntimeError(repr(leaf)))
        finally:
            self._session = None
            self.dead = True

    async def _on_message(self, message: Any) -> None:
        # What the transport could not read (bytes that are not JSON-RPC): the call it was meant to
        # answer runs into its timeout; one line in the log says why.
        if isinstance(message, Exception):
            logger.warning("MCP server %r sent something unreadable: %s", self.server.describe(),
                           _first_line(message)[:200])

    def _end_runner(self, timeout_s: float = _STOP_GRACE_S) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        try:
            runner.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            runner.cancel()  # the SDK's exit stack then stops the process
            try:
                runner.result(timeout=timeout_s)
            except BaseException:  # noqa: BLE001 - cancelled, as asked
                pass
        except BaseException:  # noqa: BLE001 - the session already failed; stopping it is all that is left
            pass

    def ensure_alive(self) -> None:
        """Restart a dead server (one restart at a time); raises InfrastructureFault if it does not come back."""
        with self._restart:
            if not self.dead:
                return
            logger.warning("MCP server %r is down; restarting it", self.server.describe())
            self._end_runner()
            self.start()

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Call tool `name` on the server; the text the model reads (see the module docstring)."""
        if self.dead:
            await asyncio.to_thread(self.ensure_alive)
        session = self._session
        if session is None:
            raise InfrastructureFault(f"the MCP server {self.server.describe()!r} is not connected")
        future = asyncio.wrap_future(self._submit(session.call_tool(name, arguments)))
        try:
            result = await future
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            raise self._classify(exc) from None
        return render_result(result)

    def _classify(self, exc: Exception) -> Exception:
        from mcp.shared.exceptions import MCPError
        from pydantic import ValidationError

        text = _first_line(exc)
        if "exceeded the" in text and "byte limit" in text:  # the transport's own cap on one message
            return ToolError(ToolErrorKind.OUTPUT_TOO_LARGE, f"the MCP server's result was too large: {text[:200]}")
        if isinstance(exc, ValidationError):
            return ToolError(ToolErrorKind.RUNTIME, f"the MCP server sent a malformed result: {_first_line(exc)[:300]}")
        closed = getattr(exc, "code", None) == -32000 or "closed" in str(exc).lower() or type(exc).__name__ in (
            "ClosedResourceError", "BrokenResourceError", "EndOfStream")
        if self.dead or closed:
            self.dead = True
            return InfrastructureFault(f"the MCP server {self.server.describe()!r} closed the connection: "
                                       f"{_first_line(exc)[:200]}")
        if isinstance(exc, MCPError):
            return ToolError(ToolErrorKind.RUNTIME, f"the MCP server answered with an error: {_first_line(exc)[:500]}")
        return ToolError(ToolErrorKind.RUNTIME, f"the MCP call failed: {type(exc).__name__}: {_first_line(exc)[:300]}")

    def stop(self) -> None:
        self._end_runner()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=_STOP_GRACE_S)
        if not self.thread.is_alive():
            self.loop.close()


async def _list_all(session: Any) -> list[Any]:
    """Every tool of the server, following pagination (bounded: a server that pages forever is refused)."""
    from mcp_types import PaginatedRequestParams

    tools, cursor = [], None
    for _ in range(100):
        page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise RuntimeError("the server's tool list did not end after 100 pages")


def render_result(result: Any) -> str:
    """A `CallToolResult` as text: text blocks joined by newlines, other blocks described; an error
    result raises `ToolError(runtime)` with its text."""
    parts = []
    for block in result.content or ():
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.mime_type}, {len(block.data)} base64 characters, not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        elif kind == "resource":
            parts.append(getattr(block.resource, "text", None) or f"[resource {block.resource.uri}, not text]")
        else:
            parts.append(f"[{kind or 'unknown'} content, not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    text = "\n".join(parts)
    if result.is_error:
        raise ToolError(ToolErrorKind.RUNTIME, text or "the MCP tool reported an error")
    return text


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside the exception groups anyio's task groups wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _first_line(exc: BaseException) -> str:
    exc = _leaf(exc)
    text = f"{type(exc).__name__}: {str(exc).strip()}" if str(exc).strip() else type(exc).__name__
    return text.splitlines()[0]


class _Devnull:
    """A text sink for a stdio server's stderr (it would otherwise interleave with the run's console)."""

    def __init__(self):
        self._file = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


_DEVNULL = _Devnull()


# -- shared connections ----------------------------------------------------------------------
_LOCK = threading.Lock()
_SHARED: dict["MCPServer", tuple[_Connection, int]] = {}


def acquire(server: MCPServer) -> _Connection:
    with _LOCK:
        conn, users = _SHARED.get(server, (None, 0))
        if conn is None:
            conn = _Connection(server)
            try:
                conn.start()
            except BaseException:
                conn.stop()
                raise
        _SHARED[server] = (conn, users + 1)
        return conn


def release(server: MCPServer) -> None:
    with _LOCK:
        conn, users = _SHARED[server]
        if users > 1:
            _SHARED[server] = (conn, users - 1)
            return
        del _SHARED[server]
    conn.stop()


def running_servers() -> list[str]:
    """The servers with a live shared connection (for tests and diagnostics)."""
    with _LOCK:
        return [s.describe() for s in _SHARED]
