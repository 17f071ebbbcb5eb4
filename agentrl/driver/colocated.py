"""Colocated mode (the hybrid engine): the engines sleep while the trainer steps on the same devices.

With `cluster.colocate` the engines free their KV cache (the embedded engine's `sleep()`; SGLang and
vLLM have the same call) before the reference pass and the update, and take it back after, so the
trainer has the memory the cache held. The weights then go to the engines in place (one process) or
through Ray's object store (rollout workers), never through disk. Per step the metrics report
`sleep_s`, `wake_s` and, as always, `weight_sync_s`.

On CPU there is no accelerator memory to win, but the protocol is the same one and is exercised by
the tests: the engines really free and re-allocate their cache, and a request sent to a sleeping
engine is refused rather than served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def engines_asleep(rollout, metrics: dict[str, Any], enabled: bool) -> Iterator[None]:
    """Put the engines to sleep for the block when `enabled` (cluster.colocate); records sleep_s / wake_s.

    Args:
        rollout: A `RolloutSide` or `RayRolloutSide`.
        metrics: The step's metrics, updated in place.
        enabled: cluster.colocate.
    """
    if not enabled:
        yield
        return
    metrics["sleep_s"] = rollout.sleep()
    try:
        yield
    finally:
        metrics["wake_s"] = rollout.wake()
