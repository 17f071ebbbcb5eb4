"""Where a step's wall time went, per role: the phases each role was busy in, and the rest as idle.

A role is a kind of worker: `rollout` (engine and envs) and `trainer` (policy and optimizer). In one
process the phases run one after another, so each role is idle while the other works; with separate
workers the same keys say how well the two overlap. For every role, its phases plus its idle time
add up to `time/step`:

    time/step                   wall seconds of the step, first episode to checkpoint
    time/rollout/episodes       playing the step's episodes (split into engine and env by
                                `metrics.rollout_time_metrics`)
    time/rollout/weight_sync    taking the new weights into the engine
    time/rollout/idle           the rest: the engine waited on the trainer
    time/trainer/score          building the batch, reference logprobs, advantages
    time/trainer/update         the optimizer steps
    time/trainer/weight_sync    handing the weights over (in one process: the same seconds as the rollout's)
    time/trainer/checkpoint     saving a checkpoint (0 on steps that save none)
    time/trainer/idle           the rest: the trainer waited on the episodes

A role served by several workers can report each worker's phases under its own role name
(`rollout.0`, `rollout.1`, ...) through `split_times`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence

# Each role's phases in one step of the in-process loop (listed so every step has the same keys).
PHASES: dict[str, tuple[str, ...]] = {"rollout": ("episodes", "weight_sync"),
                                      "trainer": ("score", "update", "weight_sync", "checkpoint")}


def split_times(step_s: float, busy: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`time/step`, `time/<role>/<phase>` and `time/<role>/idle` = step_s minus the role's phases.

    Args:
        step_s: Wall seconds of the step.
        busy: role -> phase -> seconds; a role's phases must not overlap one another.
    """
    out = {"time/step": step_s}
    for role, phases in busy.items():
        for phase, seconds in phases.items():
            out[f"time/{role}/{phase}"] = seconds
        out[f"time/{role}/idle"] = max(0.0, step_s - sum(phases.values()))  # >= 0 up to float rounding
    return out


class StepClock:
    """Times one step from its creation; `metrics()` gives `split_times` of what was recorded.

    Example:
        >>> clock = StepClock()
        >>> with clock.phase("update", "trainer"):
        ...     pass
        >>> sorted(clock.metrics())[:2]
        ['time/rollout/episodes', 'time/rollout/idle']
    """

    def __init__(self, phases: Mapping[str, Sequence[str]] = PHASES):
        self.start = time.perf_counter()
        self.busy = {role: dict.fromkeys(names, 0.0) for role, names in phases.items()}

    def add(self, phase: str, seconds: float, *roles: str) -> None:
        """Count `seconds` of `phase` for each of `roles` (a phase both take part in names both)."""
        for role in roles:
            self.busy.setdefault(role, {})
            self.busy[role][phase] = self.busy[role].get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, phase: str, *roles: str) -> Iterator[None]:
        """Time the block as `phase` of `roles` (counted even when the block raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0, *roles)

    def seconds(self, role: str, phase: str) -> float:
        return self.busy.get(role, {}).get(phase, 0.0)

    def metrics(self) -> dict[str, float]:
        return split_times(time.perf_counter() - self.start, self.busy)
