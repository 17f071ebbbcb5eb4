"""From a step's trajectories to the trainer's `TrainBatch`, once.

The rollout side hands over `Trajectory`s, the trainer takes tensors; this is the one place the
first become the second. Rewards stay where they happened: each turn's env reward on the turn's
last model token (`TrainBatch.token_rewards`), for the estimators that assign credit per turn or
per token (`turn_rloo`, `gae`); the outcome estimators see each episode's score, its reward (minus
any penalties of `RewardShaping`, and minus `kl_coef` times its summed KL to the reference when the KL is
part of the reward, `algorithm.kl_mode: reward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agentrl.config import AlgorithmConfig
from agentrl.driver.trainer_side import TrainerSide
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.algos import TOKEN_REWARD_ESTIMATORS
from agentrl.trainer.update import (compute_advantages, compute_gae, compute_turn_advantages, episode_kl,
                                    token_kl_penalty)


#: Truncations that a token budget made: the policy did not end its turn, or its episode, in time.
BUDGET_TRUNCATIONS = ("max_tokens_per_turn", "max_total_tokens")


@dataclass(frozen=True)
class RewardShaping:
    """What the trainer takes off the env's rewards for what the policy did.

    Attributes:
        tool_error_penalty: Per tool error of `tool_error_kinds`, off the turn that made it.
        tool_error_kinds: The tool error kinds penalised.
        truncation_penalty: Off the last token of an episode a token budget cut short (`BUDGET_TRUNCATIONS`).
    """

    tool_error_penalty: float = 0.0
    tool_error_kinds: tuple[str, ...] = ()
    truncation_penalty: float = 0.0

    @classmethod
    def of(cls, algo: AlgorithmConfig) -> RewardShaping:
        return cls(algo.tool_error_penalty, algo.tool_error_kinds, algo.truncation_penalty)

    def turn_penalties(self, t: Trajectory) -> list[float]:
        """What each rewarded turn of `t` loses to tool errors."""
        if not self.tool_error_penalty:
            return [0.0] * len(t.turn_rewards)
        errors = t.turn_tool_errors or ({},) * len(t.turn_rewards)
        return [self.tool_error_penalty * sum(n for kind, n in e.items() if kind in self.tool_error_kinds)
                for e in errors]

    def cut_penalty(self, t: Trajectory) -> float:
        return self.truncation_penalty if t.truncation in BUDGET_TRUNCATIONS else 0.0


def _turn_rows(t: Trajectory, shaping: RewardShaping) -> tuple[list[float], list[int], float]:
    """Token layout: each rewarded turn's reward (less its penalties) on its last model token, and each
    model token's turn number (-1 elsewhere); and the episode's shaped score. A turn cut short (no env
    step) has a turn number but no reward of its own."""
    rewards, turns = [0.0] * len(t.token_ids), [-1] * len(t.token_ids)
    if t.failure is not None:
        return rewards, turns, t.reward
    penalties = shaping.turn_penalties(t)
    for k, (start, end) in enumerate(t.turn_spans):
        turns[start:end] = [k] * (end - start)
        if k < len(t.turn_rewards) and end > start:
            rewards[end - 1] = t.turn_rewards[k] - penalties[k]
    cut = shaping.cut_penalty(t)
    if cut and t.turn_spans:
        rewards[t.turn_spans[-1][1] - 1] -= cut
    shaped = sum(penalties) + cut
    return rewards, turns, (t.reward - shaped if shaped else t.reward)


def to_batch(trajectories: Sequence[Trajectory], shaping: RewardShaping = RewardShaping()) -> TrainBatch:
    """The trajectories' tokens, masks, rollout logprobs and versions as one padded batch, scored by
    reward, with each turn's reward on the turn's last model token (`TrainBatch.token_rewards`).

    `shaping` takes its penalties off the turn (tool errors) or the last token (an episode cut short
    by a token budget) where they happened, and off the episode's score. A failed trajectory here
    (kept with zero loss, see `agentrl.driver.failures`) gets an all-zero mask and no rewards, so it
    carries no gradient, and a group of its own, so it does not move its task group's mean or std: an
    infrastructure failure is never a sample of what the policy did.
    """
    masks = [t.loss_mask if t.failure is None else (0,) * len(t.loss_mask) for t in trajectories]
    fresh = max((t.group_id for t in trajectories), default=0) + 1  # ids no task group has
    groups = [t.group_id if t.failure is None else fresh + i for i, t in enumerate(trajectories)]
    rows = [_turn_rows(t, shaping) for t in trajectories]
    return TrainBatch.from_rows([t.token_ids for t in trajectories], masks,
                                [t.rollout_logprobs for t in trajectories], [t.weight_versions for t in trajectories],
                                [s for _, _, s in rows], groups, token_rewards=[r for r, _, _ in rows],
                                turn_index=[k for _, k, _ in rows])


def score(batch: TrainBatch, trainer: TrainerSide, algo: AlgorithmConfig) -> tuple[TrainBatch, bool]:
    """The batch with advantages filled (and reference logprobs attached when the KL is a loss
    term; the critic's values and returns with `gae`); returns it and whether the loss needs the KL term.

    With the KL in the reward, outcome estimators see it taken off each episode's score and the
    per-token estimators (`gae`, `turn_rloo`) off each token's reward.
    """
    per_token = algo.advantage in TOKEN_REWARD_ESTIMATORS
    if algo.kl_coef > 0:
        ref = trainer.reference_logprobs(batch)  # [B, T]
        if algo.kl_mode == "reward" and per_token:
            batch = token_kl_penalty(batch, ref, algo.kl_kind, algo.kl_coef)
        elif algo.kl_mode == "reward":  # the KL becomes part of each episode's score
            batch = batch.with_(scores=batch.scores - algo.kl_coef * episode_kl(batch, ref, algo.kl_kind))
        else:
            batch = batch.with_(ref_logprobs=ref)
    kl_in_loss = algo.kl_coef > 0 and algo.kl_mode == "loss"
    if algo.advantage == "gae":
        return compute_gae(batch, trainer.values(batch), algo.gamma, algo.lam, algo.whiten_advantages), kl_in_loss
    if algo.advantage == "turn_rloo":
        return compute_turn_advantages(batch, algo.gamma, algo.norm_by_std), kl_in_loss
    options = {"norm_by_std": algo.norm_by_std} if algo.advantage == "grpo" else {}
    return compute_advantages(batch, algo.advantage, **options), kl_in_loss
