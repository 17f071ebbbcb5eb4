"""Real MCP servers for the MCP tool tests, run as their own processes.

    python mcp_servers.py stdio          an SDK server over stdin/stdout
    python mcp_servers.py http PORT      the same server over streamable HTTP on 127.0.0.1:PORT
    python mcp_servers.py raw            a hand-written JSON-RPC server that answers with garbage

The SDK server's tools behave (add, echo, fail) and misbehave (hang, crash, huge); the raw server
writes what no SDK server would: bytes that are not JSON, and results of the wrong shape.
"""

from __future__ import annotations

import json
import os
import sys
import time


def sdk_server():
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("agentrl-test")

    @server.tool()
    def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    @server.tool()
    def echo(text: str) -> str:
        """Repeat the text."""
        return text

    @server.tool()
    def fail(reason: str) -> str:
        """Raise an error."""
        raise ValueError(f"failed on purpose: {reason}")

    @server.tool()
    def hang() -> str:
        """Never answer."""
        time.sleep(3600)
        return "never"

    @server.tool()
    def crash() -> str:
        """Kill the server process."""
        os._exit(3)

    @server.tool()
    def huge(megabytes: int) -> str:
        """Answer with this many megabytes of text."""
        return "x" * (megabytes << 20)

    @server.tool()
    def pid() -> str:
        """The server's process id."""
        return str(os.getpid())

    return server


def raw_server():
    """JSON-RPC over stdio by hand: a correct handshake, then hostile answers to tools/call."""
    tools = [{"name": n, "description": d, "inputSchema": {"type": "object", "properties": {}}}
             for n, d in (("garbage", "answers with bytes that are not JSON"),
                          ("bad_shape", "answers with a result of the wrong shape"),
                          ("fine", "answers properly"))]

    def send(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        msg = json.loads(line)
        method, mid = msg.get("method"), msg.get("id")
        if mid is None:
            continue  # a notification
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": mid, "result": {
                "protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw", "version": "0"}}})
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": mid, "result": {"tools": tools}})
        elif method == "tools/call":
            name = msg["params"]["name"]
            if name == "garbage":
                sys.stdout.write("this is not JSON {{{\n")
                sys.stdout.flush()
            elif name == "bad_shape":
                send({"jsonrpc": "2.0", "id": mid, "result": {"content": "not a list", "isError": "maybe"}})
            else:
                send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": "fine"}]}})
        else:
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": f"no method {method}"}})


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "raw":
        raw_server()
    elif mode == "stdio":
        sdk_server().run("stdio")
    else:
        sdk_server().run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
