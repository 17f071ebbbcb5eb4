"""An abandoned tool thread runs on, is counted until it returns, and keeps nothing of its caller alive."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

from agentrl.tools.limits import ToolState
from agentrl.tools.threads import AbandonableThread


def test_an_abandoned_thread_holds_no_reference_to_the_callers_loop():
    release = threading.Event()
    state = ToolState("waits", max_concurrency=1)

    async def call() -> bool:
        future = asyncio.get_running_loop().create_future()
        thread = AbandonableThread(lambda: release.wait(10), False, state, cap=4, future=future)
        thread.start()
        done, _ = await asyncio.wait({future}, timeout=0.05)
        assert not done
        return thread.abandon("passed its 0.05 s timeout")

    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(call())
    assert state.abandoned_running == 1
    loop.close()
    dead = weakref.ref(loop)
    del loop
    gc.collect()
    # The thread still runs, yet the loop (and whatever its tasks held) could be freed here, on the
    # main thread, not later on a daemon thread that may outlive the interpreter's shutdown.
    assert dead() is None
    release.set()
    deadline = time.monotonic() + 5
    while state.abandoned_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.abandoned_running == 0 and state.abandoned_total == 1


def test_a_call_that_finishes_in_time_delivers_its_result_and_is_not_abandoned():
    state = ToolState("quick", max_concurrency=1)

    async def call():
        future = asyncio.get_running_loop().create_future()
        thread = AbandonableThread(lambda: "result", "fallback", state, cap=4, future=future)
        thread.start()
        value = await asyncio.wait_for(future, 5)
        return value, thread.abandon("too late")

    assert asyncio.run(call()) == ("result", False)
    assert state.abandoned_total == 0


def test_work_that_raises_delivers_the_fallback(caplog):
    state = ToolState("broken", max_concurrency=1)

    def work():
        raise MemoryError

    async def call():
        future = asyncio.get_running_loop().create_future()
        AbandonableThread(work, "fallback", state, cap=4, future=future).start()
        return await asyncio.wait_for(future, 5)

    assert asyncio.run(call()) == "fallback"
    assert "tool 'broken': its call failed outside the tool's own code" in caplog.text
