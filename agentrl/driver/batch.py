"""From a step's trajectories to the trainer's `TrainBatch`, once.

The rollout side hands over `Trajectory`s, the trainer takes tensors; this is the one place the
first become the second. The scores an estimator sees are the rewards, minus `kl_coef` times each
episode's summed KL to the reference when the KL is part of the reward (`algorithm.kl_mode: reward`).
"""

from __future__ import annotations

from collections.abc import Sequence

from agentrl.config import AlgorithmConfig
from agentrl.driver.trainer_side import TrainerSide
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.update import compute_advantages, episode_kl


def to_batch(trajectories: Sequence[Trajectory]) -> TrainBatch:
    """The trajectories' tokens, masks, rollout logprobs and versions as one padded batch, scored by reward.

    A failed trajectory here (kept with zero loss, see `agentrl.driver.failures`) gets an all-zero
    mask, so it carries no gradient, and a group of its own, so it does not move its task group's
    mean or std: an infrastructure failure is never a sample of what the policy did.
    """
    masks = [t.loss_mask if t.failure is None else (0,) * len(t.loss_mask) for t in trajectories]
    fresh = max((t.group_id for t in trajectories), default=0) + 1  # ids no task group has
    groups = [t.group_id if t.failure is None else fresh + i for i, t in enumerate(trajectories)]
    return TrainBatch.from_rows([t.token_ids for t in trajectories], masks,
                                [t.rollout_logprobs for t in trajectories], [t.weight_versions for t in trajectories],
                                [t.reward for t in trajectories], groups)


def score(batch: TrainBatch, trainer: TrainerSide, algo: AlgorithmConfig) -> tuple[TrainBatch, bool]:
    """The batch with advantages filled (and reference logprobs attached when the KL is a loss
    term); returns it and whether the loss needs the KL term."""
    if algo.kl_coef > 0:
        ref = trainer.reference_logprobs(batch)  # [B, T]
        if algo.kl_mode == "reward":  # the KL becomes part of each episode's score
            batch = batch.with_(scores=batch.scores - algo.kl_coef * episode_kl(batch, ref, algo.kl_kind))
        else:
            batch = batch.with_(ref_logprobs=ref)
    options = {"norm_by_std": algo.norm_by_std} if algo.advantage == "grpo" else {}
    return compute_advantages(batch, algo.advantage, **options), algo.kl_coef > 0 and algo.kl_mode == "loss"
