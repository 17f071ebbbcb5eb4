"""Running tool code from synchronous code, and telling a user's Ctrl-C from a tool's KeyboardInterrupt.

`run_blocking` is `asyncio.run` with one difference: at shutdown it waits at most `grace_s` for
tasks that ignore cancellation. `asyncio.run` cancels the tasks left over and then waits for
them without a limit, so one async tool that swallows `CancelledError` would keep `ToolEnv.step`
from ever returning. Ctrl-C behaves as under `asyncio.run`: the first cancels the main task and
then raises `KeyboardInterrupt`, a second raises at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
SHUTDOWN_GRACE_S = 0.25


def ctrl_c_raises_here() -> bool:
    """Whether a `KeyboardInterrupt` seen now could be the user's Ctrl-C rather than a tool's own.

    Only Python's default SIGINT handler raises `KeyboardInterrupt`, and only in the main thread.
    `asyncio.run`, `asyncio.Runner` and `run_blocking` replace it while they run (Ctrl-C then
    cancels the main task), so inside them a `KeyboardInterrupt` was raised by code, not by a key.
    """
    return threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler


def run_blocking(coro: Coroutine[Any, Any, T], *, grace_s: float = SHUTDOWN_GRACE_S) -> T:
    """Run `coro` on a fresh event loop and return its result, like `asyncio.run`.

    Args:
        coro: The coroutine to run.
        grace_s: How long shutdown waits for left-over tasks after cancelling them; tasks still
            running then are left behind (logged), and the loop is closed.

    Example:
        >>> async def two():
        ...     return 2
        >>> run_blocking(two())
        2
    """
    loop = asyncio.new_event_loop()
    try:
        main = loop.create_task(coro)
    except BaseException:
        loop.close()
        raise
    interrupts = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and not main.done():
            main.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wake the selector
            return
        raise KeyboardInterrupt

    previous = None
    if ctrl_c_raises_here():
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(main)
        except asyncio.CancelledError:
            if interrupts:
                raise KeyboardInterrupt from None
            raise
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)
        try:
            _shutdown(loop, grace_s)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _shutdown(loop: asyncio.AbstractEventLoop, grace_s: float) -> None:
    left = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.wait(left, timeout=grace_s))
        stuck = [t for t in left if not t.done()]
        if stuck:
            logger.warning("%d task(s) still ran %g s after being cancelled (a tool that ignores cancellation?); "
                           "the event loop is closed without them: %s", len(stuck), grace_s,
                           ", ".join(t.get_name() for t in stuck[:5]))
        for task in left:
            if task.done() and not task.cancelled() and task.exception() is not None:
                loop.call_exception_handler({"message": "unhandled exception in a left-over task",
                                             "exception": task.exception(), "task": task})
    for finish in (loop.shutdown_asyncgens, loop.shutdown_default_executor):
        try:
            loop.run_until_complete(asyncio.wait_for(finish(), timeout=grace_s))
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("%s did not finish within %g s; the event loop is closed without it", finish.__name__, grace_s)
