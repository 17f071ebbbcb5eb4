"""Weights from the trainer side to the rollout side.

In one process the engine copies the trainer's tensors into its own parameters in place (no disk,
no serialisation); the time it takes is reported per step as `time/trainer/weight_sync` and
`time/rollout/weight_sync` (both roles take part).
"""

from __future__ import annotations

import time

from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.trainer_side import TrainerSide


def push_weights(trainer: TrainerSide, rollout: RolloutSide, version: int) -> float:
    """Give the engine the trainer's current weights as policy `version`; returns the seconds it took."""
    t0 = time.perf_counter()
    rollout.engine.update_weights(trainer.weights(), version=version)
    return time.perf_counter() - t0
