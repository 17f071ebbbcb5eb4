"""Asynchronous training: episodes for later steps are played while the trainer updates.

`AsyncCollector` plays the steps' episodes in order on a background thread (`collect(rollout, s)`,
the same tasks and seeds as the synchronous loop) and hands them to the trainer step by step. It
starts step s only once the engine holds policy version `s - max_staleness` or newer, so no token
the trainer sees was sampled more than `max_staleness` versions before the policy being updated:

    max_staleness 0: step s is played after the update of step s-1 (the synchronous schedule,
                     with the rollout of s overlapping nothing);
    max_staleness 1: step s+1 is played while step s trains; its first tokens come from version s,
                     the ones after the weight push from s+1 (each token keeps its version, so the
                     staleness histogram shows both).

New weights reach requests already in flight: the built-in engine swaps them in place between two
decode steps, so an episode's turn goes on with the new policy and records per token which version
sampled it (`weight_versions`); nothing is aborted or replayed. The loss corrects for the sampling
policy with the recorded rollout logprobs (truncated importance sampling, `algorithm.tis`).

The same holds on Ray rollout workers (`RayRolloutSide`): the producer's `play` hands slices to the
workers while the trainer's thread pushes each step's weights (one `ray.put`, the same object to
every worker, copied into each engine from a thread of the worker's own between two engine steps).
A push returns once every live worker holds the version, and a worker that restarts is given the
newest weights before it plays again, so the gate holds for every engine. Worker losses, hangs and
re-runs are counted in the metrics of the step whose play met them.

What the asynchronous schedule does not give: bit-exact reproducibility (which version samples a
token depends on timing), so `--resume` restarts the producer at the checkpoint's step and the
continued run differs from an uninterrupted one.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from agentrl.driver.collect import collect
from agentrl.driver.rollout_side import RolloutSide
from agentrl.errors import TrainerError
from agentrl.rollout.trajectory import Trajectory


class AsyncCollector:
    """Steps `start`..`stop - 1` played ahead of the trainer, at most `max_staleness` versions ahead.

    Example:
        >>> collector = AsyncCollector(rollout, start=0, stop=20, max_staleness=1)   # doctest: +SKIP
        >>> trajectories, metrics = collector.get(0)                                 # doctest: +SKIP
        >>> collector.weights_pushed(1)                                              # doctest: +SKIP
    """

    def __init__(self, rollout: RolloutSide, start: int, stop: int, max_staleness: int):
        self.rollout, self.max_staleness = rollout, max_staleness
        self._cv = threading.Condition()
        self._version = start  # the policy version the engine holds
        self._ready: dict[int, tuple[list[Trajectory], dict[str, Any]] | BaseException] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._produce, args=(start, stop), name="agentrl-async-rollout",
                                        daemon=True)
        self._thread.start()

    def _produce(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._version >= step - self.max_staleness)
                if self._closed:
                    return
            try:
                trajectories, metrics = collect(self.rollout, step)
                result: Any = (trajectories, metrics | self.rollout.worker_metrics())  # workers lost, rerun (Ray)
            except BaseException as exc:  # noqa: BLE001 - handed to the trainer's thread, which raises it
                result = exc
            with self._cv:
                self._ready[step] = result
                self._cv.notify_all()
            if isinstance(result, BaseException):
                return

    def get(self, step: int) -> tuple[list[Trajectory], dict[str, Any]]:
        """Step `step`'s episodes and rollout metrics (waiting for them); a rollout error is raised here.

        The seconds spent waiting are in the metrics as `time/trainer/wait_rollout`.
        """
        t0 = time.perf_counter()
        with self._cv:
            self._cv.wait_for(lambda: step in self._ready or not self._thread.is_alive())
            result = self._ready.pop(step, None)
        if result is None:
            raise TrainerError(f"the asynchronous rollout stopped before step {step + 1}")
        if isinstance(result, BaseException):
            raise result
        trajectories, metrics = result
        return trajectories, {**metrics, "time/trainer/wait_rollout": time.perf_counter() - t0}

    def weights_pushed(self, version: int) -> None:
        """The engine now holds policy `version`: steps up to `version + max_staleness` may start."""
        with self._cv:
            self._version = version
            self._cv.notify_all()

    def close(self) -> None:
        """Stop producing: the step in flight is aborted (its episodes end early) and the thread joined."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self.rollout.abort()
            self._thread.join()


def check_staleness(metrics: dict[str, Any], max_staleness: int, step: int) -> None:
    """Refuse a batch with a token older than the schedule allows (the producer's gate makes this a bug)."""
    worst = metrics.get("staleness/max", 0)
    if worst > max_staleness:
        raise TrainerError(f"step {step + 1} holds tokens {worst:g} policy versions old; train.max_staleness is "
                           f"{max_staleness}. This is a bug in the asynchronous schedule: please report it")
