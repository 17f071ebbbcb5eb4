"""An asyncio event loop on a daemon thread, for clients that are bound to the loop they start on.

vLLM's `AsyncLLM` starts its output handler as a task of the loop it is created on, and an
`httpx.AsyncClient` keeps its connections on one loop too. agentrl calls `generate` from whatever
loop the caller runs (each `asyncio.run` makes a new one), and `update_weights`, `sleep`, `abort`
from plain threads. So the backend owns one loop for its whole life and hands every coroutine to
it; callers wait on the returned future from their own loop or thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """One event loop running forever on its own daemon thread until `close()`."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; returns a thread-safe future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result from another thread (never the loop's own)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop: await the coroutine instead")
        return self.submit(coro).result(timeout)

    async def wrap(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro`, run on this loop, from the caller's loop; cancelling the caller cancels it."""
        if asyncio.get_running_loop() is self.loop:
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what still runs on the loop, stop it and join the thread. Idempotent."""
        if not self.alive:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.submit(cancel_all()).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
