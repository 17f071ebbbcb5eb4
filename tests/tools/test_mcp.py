"""MCP tools against real servers (tests/tools/mcp_servers.py): stdio and streamable HTTP on 127.0.0.1,
well-behaved and hostile (crash, hang, garbage, a 10 MB result), shared per process, stopped cleanly."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agentrl.envs.core import Task
from agentrl.envs.tool_env import ToolEnv
from agentrl.errors import ConfigError, InfrastructureFault
from agentrl.tools.core import ToolPolicy
from agentrl.tools.mcp import MCPTools, http_server, running_servers, stdio_server

SERVERS = str(Path(__file__).with_name("mcp_servers.py"))
FAST = ToolPolicy(timeout_s=2.0, retries=1, max_output_chars=1000)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_gone(pids: set[int], timeout_s: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not alive:
            return set()
        time.sleep(0.05)
    return alive


class MCPEnv(ToolEnv):
    """A ToolEnv whose only tools come from an MCP server; the answer is scored by exact match."""

    def __init__(self, server, include=None, policy=FAST):
        super().__init__([MCPTools(server, include=include, policy=policy)], max_calls_per_turn=4)

    def sample_task(self, split, seed):
        return Task(id=f"{split}-{seed}", prompt="Add 2 and 3.", answer="5", split=split)

    def score(self, task, answer):
        return float(answer.strip() == task.answer)


def _call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _step(env, name, **arguments):
    obs, reward, term, trunc, info = env.step(_call(name, **arguments))
    return obs[0].content, info["tool_errors"]


@pytest.fixture()
def stdio_env():
    before = _children()
    env = MCPEnv(stdio_server(sys.executable, SERVERS, "stdio"))
    env.reset(seed=0)
    yield env
    env.close()
    assert running_servers() == []
    assert not _wait_gone(_children() - before), "the MCP server outlived env.close()"


def test_stdio_tools_are_listed_with_their_schemas_and_run_through_the_executor(stdio_env):
    env = stdio_env
    assert [t.name for t in env.tools] == ["add", "echo", "fail", "hang", "crash", "huge", "pid"]
    add = env.tool_schemas()[0]["function"]
    assert add["parameters"]["required"] == ["a", "b"] and add["description"] == "Add two integers."
    assert _step(env, "add", a=2, b=3) == ("5", {})
    text, errors = _step(env, "add", a="two", b=3)  # validated against the server's schema before sending
    assert errors == {"invalid_arguments": 1} and "'two' is not of type 'integer'" in text
    text, errors = _step(env, "fail", reason="r")
    assert errors == {"runtime": 1} and text.startswith("Error (runtime)")
    _, reward, term, _, _ = env.step("5")
    assert (reward, term) == (1.0, True)


def test_a_hostile_stdio_server_never_crashes_the_episode(stdio_env):
    env = stdio_env
    t0 = time.monotonic()
    text, errors = _step(env, "hang")
    assert errors == {"timeout": 1} and 1.9 < time.monotonic() - t0 < 10  # the 2 s timeout, not the 60 s hang
    patient = MCPEnv(stdio_server(sys.executable, SERVERS, "stdio"),
                     policy=ToolPolicy(timeout_s=60, max_output_chars=1000))
    patient.reset(seed=0)  # the same server (shared), with time to move 10 MB through a pipe on a busy machine
    text, errors = _step(patient, "huge", megabytes=10)  # cut to the tool's output cap
    patient.close()
    assert errors == {"output_too_large": 1} and len(text) < 1100 and text.startswith("xxxx")
    [pid] = [int(_step(env, "pid")[0])]
    text, errors = _step(env, "crash")  # dies, is restarted for the retry, dies again
    assert errors == {"infrastructure": 1} and "closed the connection" in text
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _step(env, "add", a=1, b=1) == ("2", {})  # the next call gets a fresh server
    assert int(_step(env, "pid")[0]) != pid


def test_garbage_and_wrong_shapes_from_a_raw_server_are_tool_errors():
    env = MCPEnv(stdio_server(sys.executable, SERVERS, "raw"))
    try:
        env.reset(seed=0)
        text, errors = _step(env, "bad_shape")
        assert errors == {"runtime": 1} and "malformed result" in text
        text, errors = _step(env, "garbage")  # bytes that are not JSON-RPC: nothing answers the call
        assert errors == {"timeout": 1}
        assert _step(env, "fine") == ("fine", {})  # the connection survives both
    finally:
        env.close()


def test_envs_of_a_pool_share_one_server_which_stops_with_the_last():
    server = stdio_server(sys.executable, SERVERS, "stdio")
    envs = [MCPEnv(server, include=["pid"]) for _ in range(3)]
    for env in envs:
        env.reset(seed=0)
    pids = {_step(env, "pid")[0] for env in envs}
    assert len(pids) == 1 and [t.name for t in envs[0].tools] == ["pid"]
    pid = int(pids.pop())
    envs[0].close()
    envs[1].close()
    assert psutil.pid_exists(pid)
    envs[2].close()
    envs[2].close()
    assert not _wait_gone({pid}) and running_servers() == []


def test_servers_that_cannot_start_are_refused_clearly_and_leave_nothing():
    before = _children()
    with pytest.raises(InfrastructureFault, match="cannot connect"):
        MCPTools(stdio_server(sys.executable, "-c", "import sys; sys.exit(3)"))
    t0 = time.monotonic()
    with pytest.raises(InfrastructureFault, match="did not connect .* within 1 s"):
        MCPTools(stdio_server(sys.executable, "-c", "import time; time.sleep(60)", connect_timeout_s=1.0))
    assert time.monotonic() - t0 < 40  # the 1 s connect timeout held (the server sleeps 60 s)
    with pytest.raises(ConfigError, match="has no tool\\(s\\) \\['nope'\\]"):
        MCPTools(stdio_server(sys.executable, SERVERS, "raw"), include=["nope"])
    with pytest.raises(ConfigError, match="exactly one of command"):
        stdio_server()
    assert not _wait_gone(_children() - before) and running_servers() == []


@pytest.fixture()
def http_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, SERVERS, "http", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the MCP HTTP server did not listen on port {port} (exit code {proc.poll()})")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.kill()
    proc.wait()


def test_streamable_http_server_with_hang_huge_and_crash(http_url):
    env = MCPEnv(http_server(http_url))
    try:
        env.reset(seed=0)
        assert _step(env, "add", a=2, b=3) == ("5", {})
        assert _step(env, "hang")[1] == {"timeout": 1}
        text, errors = _step(env, "huge", megabytes=10)  # past the transport's 1 MiB event cap: refused early
        assert errors == {"output_too_large": 1} and "too large" in text
        assert _step(env, "echo", text="still here") == ("still here", {})
        text, errors = _step(env, "crash")  # the server is gone for good: every call is an infrastructure error
        assert errors == {"infrastructure": 1}
        assert _step(env, "add", a=1, b=1)[1] == {"infrastructure": 1}
    finally:
        env.close()
    assert running_servers() == []


def test_results_are_rendered_as_text_and_other_blocks_are_described():
    import mcp_types as t

    from agentrl.errors import ToolError
    from agentrl.tools.mcp import render_result

    result = t.CallToolResult(content=[
        t.TextContent(type="text", text="first"), t.ImageContent(type="image", data="aGk=", mime_type="image/png"),
        t.EmbeddedResource(type="resource", resource=t.TextResourceContents(uri="file:///a.txt", text="inside")),
        t.ResourceLink(type="resource_link", name="b", uri="file:///b.bin")])
    assert render_result(result) == ("first\n[image image/png, 4 base64 characters, not shown]\ninside\n"
                                     "[resource file:///b.bin]")
    assert render_result(t.CallToolResult(content=[], structured_content={"n": 3})) == '{"n": 3}'
    with pytest.raises(ToolError, match="bad input"):
        render_result(t.CallToolResult(content=[t.TextContent(type="text", text="bad input")], is_error=True))
