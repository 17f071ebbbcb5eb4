"""Opening the two sides of a run where `cluster.mode` says: in this process, or as Ray workers.

`local` (the default, what the quickstart and CI run): one engine and the trainer in this process.
`ray`: a Ray session (started for the run, or joined at `cluster.address`), a placement group per
role, `cluster.rollout_workers` rollout workers and, with `cluster.trainer_workers` > 1, that many
FSDP2 trainer ranks; with one trainer it stays in this process. Either way the loop gets objects
with the same interface, and everything opened here is closed when the block ends, the Ray session
(and so every worker process) included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from agentrl.config import Config
from agentrl.driver.preflight import check_device
from agentrl.driver.tasks import open_rollout_side
from agentrl.driver.trainer_side import TrainerSide


@contextlib.contextmanager
def open_sides(cfg: Config, splits: Sequence[tuple[str, str]]) -> Iterator[tuple[object, object]]:
    """(rollout side, trainer side) for the run, closed at the end of the block.

    Args:
        cfg: The run's config.
        splits: (split, where it was given) pairs the run will play (checked before anything loads).
    """
    if cfg.cluster.mode == "local":
        rollout = open_rollout_side(cfg, splits=splits)
        try:
            yield rollout, TrainerSide.open(cfg, rollout.path)
        finally:
            rollout.close()
        return
    from agentrl.driver.cluster import RaySession
    from agentrl.driver.rollout_pool import RayRolloutSide
    from agentrl.driver.trainer_group import RayTrainerSide

    c = cfg.cluster
    if c.trainer_workers == 1:
        check_device(cfg.model.device)  # the trainer runs here
    with contextlib.ExitStack() as stack:
        session = RaySession.open(c)
        stack.callback(session.close)
        placement = session.place(c)
        rollout = RayRolloutSide.open(cfg, placement.rollout, splits)
        stack.callback(rollout.close)
        if c.trainer_workers == 1:
            trainer = TrainerSide.open(cfg, cfg.model.path)
        else:
            trainer = RayTrainerSide.open(cfg, cfg.model.path, placement.trainer)
            stack.callback(trainer.close)
        yield rollout, trainer
