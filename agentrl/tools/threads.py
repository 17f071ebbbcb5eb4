"""A sync tool call on a daemon thread of its own, which the caller may abandon at its timeout.

A Python thread cannot be killed, so a call past its timeout is abandoned: the caller answers
without it, the thread runs on until the tool returns, and `ToolState` counts it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from agentrl.tools.limits import ToolState

logger = logging.getLogger(__name__)
T = TypeVar("T")


class AbandonableThread(Generic[T]):
    """`work()` on its own daemon thread, its result delivered to `future`; the call may be abandoned.

    `work` should not raise (the executor's catches everything a tool does); if it does anyway,
    the exception is logged and `fallback` is delivered instead.

    The thread holds only weak references to the caller's loop and future: an abandoned thread
    must not keep the caller's world (its loop, its episodes, an engine's tensors) alive, or that
    world would be freed on a daemon thread, possibly while the interpreter exits (which aborts
    the process when the freeing runs C++ code).
    """

    def __init__(self, work: Callable[[], T], fallback: T, state: ToolState, cap: int, future: asyncio.Future):
        self._future = weakref.ref(future)
        self._loop = weakref.ref(future.get_loop())
        self._work: Callable[[], T] | None = work
        self._fallback = fallback
        self._state, self._cap = state, cap
        self._lock = threading.Lock()
        self._finished = False
        self._abandoned_at: float | None = None
        self.seconds: float | None = None  # how long `work` ran, once it has returned

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"agentrl-tool-{self._state.name[:40]}", daemon=True).start()

    def _run(self) -> None:
        work, self._work = self._work, None
        started = time.monotonic()
        try:
            outcome = work()  # type: ignore[misc]
        except BaseException:  # noqa: BLE001 - e.g. MemoryError while rendering the result
            logger.exception("tool %r: its call failed outside the tool's own code", self._state.name)
            outcome = self._fallback
        del work
        with self._lock:
            self.seconds = time.monotonic() - started
            self._finished = True
            abandoned_at = self._abandoned_at
        if abandoned_at is not None:
            self._state.abandoned_returned(time.monotonic() - abandoned_at, on_thread=True)
            return
        future, loop = self._future(), self._loop()
        if future is None or loop is None:
            return
        try:
            loop.call_soon_threadsafe(_deliver, future, outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this outcome any more
            pass

    def abandon(self, why: str) -> bool:
        """Give up on the call unless it has finished (then its outcome is on its way)."""
        with self._lock:
            if self._finished:
                return False
            self._abandoned_at = time.monotonic()
            self._state.abandon(f"{why} (a thread cannot be stopped)", self._cap, on_thread=True)
            return True


def _deliver(future: asyncio.Future, outcome: object) -> None:
    if not future.done():
        future.set_result(outcome)
