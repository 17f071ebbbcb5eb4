"""Weights from the trainer side to the rollout side.

In one process the engine copies the trainer's tensors into its own parameters in place (no disk,
no serialisation). With Ray rollout workers the full state dict is put once into Ray's object
store and every worker copies the same object into its engine (`RayRolloutSide.update_weights`);
with several trainer ranks the full weights are first gathered from their FSDP2 shards. No disk
either way. CUDA IPC handles and an NCCL broadcast between trainer and engines are not built. The
time a push takes is reported per step as `time/trainer/weight_sync` and `time/rollout/weight_sync`
(both roles take part).
"""

from __future__ import annotations

import time


def push_weights(trainer, rollout, version: int) -> float:
    """Give the engines the trainer's current weights as policy `version`; returns the seconds it took.

    Args:
        trainer: A `TrainerSide` or `RayTrainerSide` (anything with `weights()`).
        rollout: A `RolloutSide` or `RayRolloutSide` (anything with `update_weights(state_dict, version)`).
    """
    t0 = time.perf_counter()
    rollout.update_weights(trainer.weights(), version=version)
    return time.perf_counter() - t0
