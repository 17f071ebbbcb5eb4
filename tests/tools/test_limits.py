"""Process-wide per-tool limits: slots shared by every event loop and thread, per Tool object."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from agentrl.tools.core import ToolPolicy, tool
from agentrl.tools.limits import CallSlots, tool_state


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
