"""Colocated mode (the hybrid engine): the engines sleep while the trainer steps on the same devices.

With `cluster.colocate` the engines free their KV cache (the embedded engine's `sleep()`; SGLang and
vLLM have the same call) before the reference pass and the update, and take it back after, so the
trainer has the memory the cache held. The weights then go to the engines in place (one process) or
through Ray's object store (rollout workers), never through disk. Per step the metrics report
`time/rollout/sleep` and `time/rollout/wake` and, as always, `time/*/weight_sync`.

On CPU there is no accelerator memory to win, but the protocol is the same one and is exercised by
the tests: the engines really free and re-allocate their cache, and a request sent to a sleeping
engine is refused rather than served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from agentrl.driver.timing import StepClock


@contextlib.contextmanager
def engines_asleep(rollout, clock: StepClock, enabled: bool) -> Iterator[None]:
    """Put the engines to sleep for the block when `enabled` (cluster.colocate), timing both ends on `clock`.

    Args:
        rollout: A `RolloutSide` or `RayRolloutSide` (`sleep()` and `wake()` return the seconds they took).
        clock: The step's clock (phases `sleep` and `wake` of the rollout role).
        enabled: cluster.colocate.
    """
    if not enabled:
        yield
        return
    clock.add("sleep", rollout.sleep(), "rollout")
    try:
        yield
    finally:
        clock.add("wake", rollout.wake(), "rollout")
