"""Process-wide per-tool limits: slots shared by every event loop and thread, per Tool object."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agentrl.tools.core import ToolPolicy, tool
from agentrl.tools.limits import EXIT_GRACE_S, CallSlots, tool_state

ROOT = Path(__file__).resolve().parents[2]


class Peak:
    def __init__(self):
        self.lock, self.now, self.peak, self.done = threading.Lock(), 0, 0, 0

    async def hold(self, slots: CallSlots, seconds: float) -> None:
        await slots.acquire()
        try:
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            await asyncio.sleep(seconds)
            with self.lock:
                self.now -= 1
                self.done += 1
        finally:
            slots.release()


def test_slots_bound_holders_across_loops_and_threads():
    slots, peak = CallSlots(2), Peak()

    async def many():
        await asyncio.gather(*(peak.hold(slots, 0.005) for _ in range(10)))

    threads = [threading.Thread(target=asyncio.run, args=(many(),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert peak.done == 40 and peak.peak == 2 and slots.held == 0


def test_a_waiter_cancelled_while_waiting_or_just_granted_gives_no_slot_away():
    slots = CallSlots(1)

    async def scenario():
        await slots.acquire()  # this coroutine holds the only slot
        late = asyncio.ensure_future(slots.acquire())
        timed_out = asyncio.ensure_future(asyncio.wait_for(slots.acquire(), 0.01))
        await asyncio.sleep(0.05)
        assert timed_out.done() and isinstance(timed_out.exception(), asyncio.TimeoutError)
        slots.release()  # hands the slot to `late`...
        late.cancel()  # ...which is cancelled before it could run: it must hand the slot back
        await asyncio.gather(late, return_exceptions=True)
        assert slots.held == 0
        await asyncio.wait_for(slots.acquire(), 0.1)  # free again
        slots.release()

    asyncio.run(scenario())
    assert slots.held == 0


def test_state_is_per_tool_object():
    @tool(policy=ToolPolicy(max_concurrency=3))
    def f() -> str:
        """F."""
        return ""

    twin = dataclasses.replace(f)  # equal, but another object: its own limits
    assert tool_state(f, f.name, 3) is tool_state(f, f.name, 3)
    assert tool_state(twin, f.name, 3) is not tool_state(f, f.name, 3)
    assert tool_state(f, f.name, 3).slots.limit == 3


EXIT_SCRIPT = '''
import asyncio, sys, time
from agentrl.tools.core import ToolCall, ToolPolicy, tool
from agentrl.tools.executor import ToolExecutor

@tool(policy=ToolPolicy(timeout_s=0.1))
def slow(seconds: float) -> str:
    """Sleep, then leave a mark."""
    time.sleep(seconds)
    open(sys.argv[1], "w").write("returned")
    return "done"

[r] = asyncio.run(ToolExecutor([slow]).execute([ToolCall("slow", {"seconds": float(sys.argv[2])})]))
print(r.error_kind.value, flush=True)
'''


@pytest.mark.parametrize("seconds, returns", [(0.6, True), (60.0, False)])
def test_exit_waits_a_bounded_time_for_abandoned_threads(tmp_path, seconds, returns):
    mark = tmp_path / "mark"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(mark), str(seconds)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.monotonic() - t0
    assert proc.returncode == 0 and proc.stdout.strip() == "timeout", proc.stderr
    # A thread about to return is given the time to (it is not cut off mid-way at exit); a hung one
    # delays exit by at most EXIT_GRACE_S, and the exit says so.
    assert mark.exists() == returns
    if not returns:
        assert EXIT_GRACE_S <= took < EXIT_GRACE_S + 20
        assert "exiting with 1 abandoned tool threads still running: {'slow': 1}" in proc.stderr
