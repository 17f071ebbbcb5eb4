"""`run_blocking` (asyncio.run with a bounded shutdown) and Ctrl-C versus a tool's KeyboardInterrupt."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from agentrl.envs.core import Task
from agentrl.envs.tool_env import ToolEnv
from agentrl.tools.blocking import run_blocking
from agentrl.tools.core import ToolCall, ToolPolicy, tool
from agentrl.tools.executor import ToolExecutor

ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture(autouse=True)
def ctrl_c_as_at_start():
    """These tests send SIGINT: give them Python's own handler and an unblocked SIGINT, as a fresh program has.

    In a full CI run an earlier test left SIGINT ignored or replaced in this process (not found yet: the
    tests pass alone); children inherit an ignored SIGINT, so these tests failed far from the cause. What
    was found is reported as a warning, not hidden."""
    found = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if found is not signal.default_int_handler or blocked:
        warnings.warn(f"SIGINT was left {'blocked' if blocked else 'unblocked'} with handler {found!r} by an "
                      "earlier test; reset to Python's default for this test")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    yield
    signal.signal(signal.SIGINT, found if found is not None else signal.SIG_DFL)
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])



def test_returns_and_raises_like_asyncio_run():
    async def value():
        return 7

    async def fails():
        raise ValueError("boom")

    assert run_blocking(value()) == 7
    with pytest.raises(ValueError, match="boom"):
        run_blocking(fails())


def test_a_left_over_task_that_ignores_cancellation_does_not_hold_shutdown(caplog):
    async def stubborn():
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass

    async def main():
        asyncio.ensure_future(stubborn())
        return "done"

    t0 = time.perf_counter()
    assert run_blocking(main(), grace_s=0.1) == "done"
    assert time.perf_counter() - t0 < 1.0  # asyncio.run would wait the full 3 s
    assert "still ran 0.1 s after being cancelled" in caplog.text


@tool(policy=ToolPolicy(timeout_s=0.3))
async def stubborn_tool() -> str:
    """Ignore cancellation for a while."""
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            pass
    return "finally"


@tool
async def interrupting_tool() -> str:
    """Raise KeyboardInterrupt itself."""
    raise KeyboardInterrupt


class Env(ToolEnv):
    def sample_task(self, split, seed):
        return Task(id=str(seed), prompt="p", answer="", split=split)

    def score(self, task, answer):
        return 0.0


def _call(name: str) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": {}}) + "</tool_call>"


def test_step_returns_on_time_with_an_async_tool_that_ignores_cancellation():
    env = Env([stubborn_tool])
    env.reset(seed=0)
    t0 = time.perf_counter()
    obs, *_ = env.step(_call("stubborn_tool"))
    # timeout 0.3 s + the executor's 0.25 s grace + the loop shutdown's 0.25 s grace
    assert time.perf_counter() - t0 < 1.5
    assert obs[0].content.startswith("Error (timeout): 'stubborn_tool' did not finish within 0.3 s; it ignored")


def test_a_tools_keyboard_interrupt_is_a_tool_error_in_step():
    env = Env([interrupting_tool])
    env.reset(seed=0)
    obs, _, _, _, info = env.step(_call("interrupting_tool"))
    assert obs[0].content == "Error (runtime): 'interrupting_tool' failed: KeyboardInterrupt"
    assert info["tool_errors"] == {"runtime": 1}


def test_where_ctrl_c_could_raise_it_a_keyboard_interrupt_stops_the_program():
    # A bare loop in the main thread with Python's own SIGINT handler: a KeyboardInterrupt there
    # may be the user's key, which must not be swallowed (documented in agentrl.tools.executor).
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(ToolExecutor([interrupting_tool]).execute([ToolCall("interrupting_tool", {})]))
    finally:
        loop.close()


CTRL_C = textwrap.dedent('''
    import asyncio, json, os, signal, sys, threading, time
    from agentrl.envs.core import Task
    from agentrl.envs.tool_env import ToolEnv
    from agentrl.tools.core import ToolPolicy, tool

    @tool(policy=ToolPolicy(timeout_s=60))
    def hang_sync() -> str:
        """Hang."""
        time.sleep(60)

    @tool(policy=ToolPolicy(timeout_s=60))
    async def hang_async() -> str:
        """Hang."""
        await asyncio.sleep(60)

    class Env(ToolEnv):
        def sample_task(self, split, seed):
            return Task(id="0", prompt="p", answer="", split=split)
        def score(self, task, answer):
            return 0.0

    env = Env([hang_sync, hang_async])
    env.reset(seed=0)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        env.step('<tool_call>{"name": "%s", "arguments": {}}</tool_call>' % sys.argv[1])
    except KeyboardInterrupt:
        print("interrupted after %.1f s" % (time.monotonic() - t0))
        sys.exit(0)
    print("step returned")
    sys.exit(1)
''')


@pytest.mark.parametrize("name", ["hang_sync", "hang_async"])
def test_ctrl_c_still_stops_a_step_waiting_on_a_hung_tool(name):
    proc = subprocess.run([sys.executable, "-c", CTRL_C, name], capture_output=True, text=True, timeout=30,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seconds = float(proc.stdout.split()[2])
    assert seconds < 5
