"""Per-tool limits shared by the whole process: concurrency slots and calls abandoned at their timeout.

A `ToolPolicy`'s `max_concurrency` bounds the calls of one tool running at once across every
episode of a run, so the state cannot live in an executor (one per env instance) nor in an
`asyncio.Semaphore` (bound to one event loop, while `ToolEnv.step` runs a fresh loop each turn and
training runs one loop for many envs). `CallSlots` keeps one counter under a `threading.Lock` and
wakes each waiter on its own loop with `call_soon_threadsafe`, so it serves any number of loops
and threads at once. Waiters are served first come, first served.

A thread cannot be killed, so a sync call that passes its timeout is abandoned: the call answers
the model with a timeout error while the thread runs on. `ToolState` counts such calls per tool
until their threads return (an async call that ignores cancellation counts the same way), and
the executor refuses new calls of a tool that has `max_abandoned` of them still running.

The state is keyed by the `Tool` object (define tools once, at module level, and every env
instance shares them); it is per process, so each rollout worker process has its own.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    granted: bool = False


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class CallSlots:
    """At most `limit` holders at once, shared by every event loop and thread of the process.

    Example:
        >>> slots = CallSlots(1)
        >>> async def call():
        ...     await slots.acquire()
        ...     try:
        ...         ...  # at most one of these runs at a time, whichever loop it is on
        ...     finally:
        ...         slots.release()
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._held = 0
        self._queue: deque[_Waiter] = deque()

    @property
    def held(self) -> int:
        return self._held

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._held < self.limit and not self._queue:
                self._held += 1
                return
            waiter = _Waiter(loop, loop.create_future())
            self._queue.append(waiter)
        try:
            await waiter.future
        except BaseException:  # cancelled while waiting: give back a slot handed over meanwhile
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._queue.remove(waiter)
            if granted:
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            while self._queue:
                waiter = self._queue.popleft()
                try:
                    waiter.loop.call_soon_threadsafe(_wake, waiter.future)
                except RuntimeError:  # its loop is closed, so nobody awaits it any more
                    continue
                waiter.granted = True  # the slot passes straight to the waiter
                return
            self._held -= 1


class ToolState:
    """What the process knows about one tool: its slots and its abandoned calls still running."""

    def __init__(self, name: str, max_concurrency: int):
        self.name = name
        self.slots = CallSlots(max_concurrency)
        self._lock = threading.Lock()
        self.abandoned_running = 0
        self.abandoned_total = 0

    def abandon(self, why: str, cap: int, *, on_thread: bool) -> int:
        """Count one abandoned call (`why` says how it came to that); return how many are running."""
        with self._lock:
            self.abandoned_running += 1
            self.abandoned_total += 1
            running = self.abandoned_running
        if on_thread:
            _exit_wait.add()
        logger.warning("tool %r: a call %s; it was abandoned and runs on (%d abandoned calls of this tool "
                       "still running; at %d new calls are refused)", self.name, why, running, cap)
        return running

    def abandoned_returned(self, after_s: float, *, on_thread: bool) -> None:
        with self._lock:
            self.abandoned_running -= 1
            running = self.abandoned_running
        if on_thread:
            _exit_wait.remove()
        logger.info("tool %r: an abandoned call returned after %.1f s (%d still running)", self.name, after_s, running)


class _ExitWait:
    """At interpreter exit, wait up to `EXIT_GRACE_S` for abandoned tool threads to return.

    A daemon thread that wakes while the interpreter is being torn down is ended by
    `pthread_exit`, and if that happens inside C++ code (freeing a torch tensor, say) the process
    aborts ("terminate called without an active exception"). A thread that is about to return is
    given the time to; one that stays hung never wakes, so it does no harm.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._registered = False

    def add(self) -> None:
        with self._cond:
            self._running += 1
            if not self._registered:
                atexit.register(self.wait)
                self._registered = True

    def remove(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def wait(self, timeout_s: float | None = None) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._running <= 0, timeout=EXIT_GRACE_S if timeout_s is None else timeout_s):
                logger.warning("exiting with %d abandoned tool threads still running: %s", self._running,
                               abandoned_calls())


EXIT_GRACE_S = 2.0
_exit_wait = _ExitWait()


_STATES: dict[int, tuple[weakref.ref, ToolState]] = {}
_STATES_LOCK = threading.Lock()


def tool_state(tool: object, name: str, max_concurrency: int) -> ToolState:
    """The process-wide state of `tool` (keyed by the object), created on first use."""
    with _STATES_LOCK:
        entry = _STATES.get(id(tool))
        if entry is not None and entry[0]() is tool:
            return entry[1]
        # A new tool object is rare (tools are built once), so sweeping the dead ones here is cheap;
        # no weakref callback, which could run inside this lock during garbage collection.
        for key in [k for k, (ref, _) in _STATES.items() if ref() is None]:
            del _STATES[key]
        state = ToolState(name, max_concurrency)
        _STATES[id(tool)] = (weakref.ref(tool), state)
        return state


def abandoned_calls() -> dict[str, int]:
    """Tool name -> abandoned calls still running in this process (for metrics and diagnosis)."""
    with _STATES_LOCK:
        states = [s for _, s in _STATES.values()]
    out: dict[str, int] = {}
    for s in states:
        if s.abandoned_running:
            out[s.name] = out.get(s.name, 0) + s.abandoned_running
    return out
