"""Advantage estimators: scalar scores per response -> per-token advantages.

Group-relative estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) share one signature and live in the
`ADVANTAGE_ESTIMATORS` registry, so a config picks one by name. GAE needs token rewards and values,
so it is a separate function. All of them skip tokens whose mask is 0 (prompt, padding, and tool
output inside a multi-turn trajectory) and return float32 whatever the input dtype.

Shape letters: B responses in the batch, T response tokens (padded), G distinct groups or tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from agentrl.registry import Registry

AdvantageEstimator = Callable[..., Tensor]
"""`fn(scores [B], response_mask [B, T], group_ids [B], **options) -> advantages [B, T]`."""

ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")

#: Estimators that read rewards where they happened (`TrainBatch.token_rewards`) rather than one score
#: per episode, so they have signatures of their own: `gae` (with a critic's values) and `turn_rloo`.
TOKEN_REWARD_ESTIMATORS = ("gae", "turn_rloo")


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """Return the estimator registered as `name`; a typo raises `RegistryError` with a suggestion.

    Example:
        >>> fn = get_advantage_estimator("grpo")
        >>> adv = fn(scores, response_mask, group_ids, norm_by_std=False)  # doctest: +SKIP
    """
    return ADVANTAGE_ESTIMATORS.get(name)


def _check_scores(scores: Tensor, response_mask: Tensor, ids: Tensor, ids_name: str) -> None:
    if scores.dim() != 1 or response_mask.dim() != 2 or ids.shape != scores.shape:
        raise ValueError(
            f"expected scores [B], response_mask [B, T] and {ids_name} [B]; got scores "
            f"{tuple(scores.shape)}, response_mask {tuple(response_mask.shape)}, {ids_name} {tuple(ids.shape)}"
        )
    if response_mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"response_mask has {response_mask.shape[0]} rows but scores has {scores.shape[0]}; "
            "pass one score per response"
        )


def _group_moments(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row size, mean and unbiased std of the row's group.

    Args:
        scores: [B] float32.
        group_ids: [B] integer group of each row; any values, any order.

    Returns:
        (count [B], mean [B], std [B]); std is 0 for groups of size 1.
    """
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # inv: [B] in 0..G-1
    zeros = scores.new_zeros(uniq.numel())  # [G]
    count = zeros.index_add(0, inv, torch.ones_like(scores))  # [G]
    mean = zeros.index_add(0, inv, scores) / count  # [G]
    sq_dev = zeros.index_add(0, inv, (scores - mean[inv]) ** 2)  # [G]
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()  # [G]
    return count[inv], mean[inv], std[inv]


def _broadcast(per_row: Tensor, response_mask: Tensor) -> Tensor:
    """[B] -> [B, T], zero where the mask is 0."""
    return torch.where(response_mask.bool(), per_row[:, None], 0.0)


@ADVANTAGE_ESTIMATORS.decorator("grpo")
@torch.no_grad()
def grpo(
    scores: Tensor, response_mask: Tensor, group_ids: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO: `(score - group mean) / (group std + eps)`, std unbiased; a group of one gets 0.

    Args:
        scores: [B] scalar reward of each response.
        response_mask: [B, T] 1 on tokens the policy generated.
        group_ids: [B] int64; responses to the same prompt share an id.
        norm_by_std: Divide by the group std (False gives Dr. GRPO).
        eps: Added to the std so uniform groups give 0, not NaN.

    Returns:
        [B, T] float32 advantages.
    """
    _check_scores(scores, response_mask, group_ids, "group_ids")
    scores = scores.float()
    count, mean, std = _group_moments(scores, group_ids)
    adv = scores - mean  # [B]
    if norm_by_std:
        adv = adv / (std + eps)
    adv = torch.where(count > 1, adv, 0.0)
    return _broadcast(adv, response_mask)


@ADVANTAGE_ESTIMATORS.decorator("dr_grpo")
@torch.no_grad()
def dr_grpo(scores: Tensor, response_mask: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO: `score - group mean`, no std normalisation (removes GRPO's difficulty bias).

    Shapes as in `grpo`.
    """
    return grpo(scores, response_mask, group_ids, norm_by_std=False)


@ADVANTAGE_ESTIMATORS.decorator("rloo")
@torch.no_grad()
def rloo(scores: Tensor, response_mask: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO: score minus the mean of the other members of its group; a group of one gets 0.

    `s_i - (sum - s_i) / (n - 1)` equals `n / (n - 1) * (s_i - mean)`, computed in the first form.
    Shapes as in `grpo`.
    """
    _check_scores(scores, response_mask, group_ids, "group_ids")
    scores = scores.float()
    count, mean, _ = _group_moments(scores, group_ids)
    others_mean = (mean * count - scores) / (count - 1).clamp(min=1)  # [B]
    adv = torch.where(count > 1, scores - others_mean, 0.0)
    return _broadcast(adv, response_mask)


@ADVANTAGE_ESTIMATORS.decorator("reinforce_pp")
@torch.no_grad()
def reinforce_pp(scores: Tensor, response_mask: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ with a group baseline: subtract the group mean, then whiten over the batch.

    The whitening mean and (unbiased) std are taken over every valid response token of the batch,
    so a long response weighs more than a short one, as in verl's `reinforce_plus_plus_baseline`.
    Shapes as in `grpo`.
    """
    _check_scores(scores, response_mask, group_ids, "group_ids")
    scores = scores.float()
    _, mean, _ = _group_moments(scores, group_ids)
    return masked_whiten(_broadcast(scores - mean, response_mask), response_mask, eps=eps)


def _whiten_segments(values: Tensor, response_mask: Tensor, segment_ids: Tensor, eps: float) -> Tensor:
    """Whiten the masked tokens of each segment (rows sharing an id) on their own.

    Args:
        values: [B, T].
        response_mask: [B, T].
        segment_ids: [B] integer segment of each row.
        eps: Added to the std.

    Returns:
        [B, T] float32, zero where the mask is 0.
    """
    mask = response_mask.bool()
    values = torch.where(mask, values.float(), 0.0)  # [B, T]
    uniq, inv = torch.unique(segment_ids, return_inverse=True)  # inv: [B]
    zeros = values.new_zeros(uniq.numel())  # [G]
    count = zeros.index_add(0, inv, mask.sum(-1).float())  # [G] tokens per segment
    mean = zeros.index_add(0, inv, values.sum(-1)) / count.clamp(min=1)  # [G]
    centred = torch.where(mask, values - mean[inv][:, None], 0.0)  # [B, T]
    var = zeros.index_add(0, inv, (centred**2).sum(-1)) / (count - 1).clamp(min=1)  # [G]
    return centred / (var.sqrt()[inv][:, None] + eps)


@torch.no_grad()
def masked_whiten(values: Tensor, response_mask: Tensor, *, eps: float = 1e-6) -> Tensor:
    """`(x - mean) / (std + eps)` with mean and unbiased std over the masked tokens of the batch.

    Args:
        values: [B, T].
        response_mask: [B, T] 1 on tokens to include.
        eps: Added to the std.

    Returns:
        [B, T] float32, zero where the mask is 0.
    """
    return _whiten_segments(values, response_mask, values.new_zeros(values.shape[0], dtype=torch.long), eps)


@torch.no_grad()
def normalize_per_task(advantages: Tensor, response_mask: Tensor, task_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Whiten advantages within each task, for batches that mix environments.

    Tasks with different reward scales (a 0/1 verifier beside a dense score) would otherwise let
    one task dominate the gradient.

    Args:
        advantages: [B, T] from any estimator.
        response_mask: [B, T].
        task_ids: [B] integer task (environment) of each row.
        eps: Added to each task's std.

    Returns:
        [B, T] float32: zero mean and unit unbiased std over each task's masked tokens.
    """
    if task_ids.shape != advantages.shape[:1] or response_mask.shape != advantages.shape:
        raise ValueError(
            f"expected advantages [B, T], response_mask [B, T], task_ids [B]; got {tuple(advantages.shape)}, "
            f"{tuple(response_mask.shape)}, {tuple(task_ids.shape)}"
        )
    return _whiten_segments(advantages, response_mask, task_ids, eps)


@torch.no_grad()
def scale_per_task(advantages: Tensor, response_mask: Tensor, task_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Divide each task's advantages by their root mean square over its masked tokens, for batches
    that mix environments.

    Unlike `normalize_per_task` nothing is re-centred: a zero advantage (a group whose rewards were
    all equal) stays zero, and signs never flip; only the scale of each task is equalised.

    Args:
        advantages: [B, T] from any estimator.
        response_mask: [B, T].
        task_ids: [B] integer task (environment) of each row.
        eps: Added to each task's RMS (a task whose advantages are all zero stays zero).

    Returns:
        [B, T] float32, zero where the mask is 0.
    """
    if task_ids.shape != advantages.shape[:1] or response_mask.shape != advantages.shape:
        raise ValueError(
            f"expected advantages [B, T], response_mask [B, T], task_ids [B]; got {tuple(advantages.shape)}, "
            f"{tuple(response_mask.shape)}, {tuple(task_ids.shape)}"
        )
    mask = response_mask.bool()
    values = torch.where(mask, advantages.float(), 0.0)  # [B, T]
    uniq, inv = torch.unique(task_ids, return_inverse=True)  # inv: [B]
    zeros = values.new_zeros(uniq.numel())  # [G]
    count = zeros.index_add(0, inv, mask.sum(-1).float())  # [G] tokens per task
    rms = (zeros.index_add(0, inv, (values**2).sum(-1)) / count.clamp(min=1)).sqrt()  # [G]
    return values / (rms[inv][:, None] + eps)


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens only.

    Positions where the mask is 0 (tool output between turns, padding) are skipped: the recursion
    goes from one response token straight to the next, so neither their values nor their rewards
    enter it and `gamma` is applied once per response token, as in verl's multi-turn GAE. Put
    rewards on response tokens (usually the last one); a reward on a masked position is ignored.
    Advantages are not whitened here; call `masked_whiten` if wanted.

    Args:
        token_rewards: [B, T] reward of each token.
        values: [B, T] critic values (detached).
        response_mask: [B, T] 1 on tokens the policy generated.
        gamma: Discount per response token.
        lam: GAE lambda.

    Returns:
        (advantages [B, T], returns [B, T]) float32, `returns = advantages + values`, both zero
        where the mask is 0.
    """
    if not (token_rewards.shape == values.shape == response_mask.shape) or values.dim() != 2:
        raise ValueError(
            f"expected token_rewards, values and response_mask all [B, T]; got {tuple(token_rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(response_mask.shape)}"
        )
    rewards, values = token_rewards.float(), values.float()
    mask = response_mask.bool()
    next_value = values.new_zeros(values.shape[0])  # [B] value of the next response token
    next_adv = values.new_zeros(values.shape[0])  # [B] advantage of the next response token
    advantages = torch.zeros_like(values)  # [B, T]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        adv_t = delta + gamma * lam * next_adv  # [B]
        m = mask[:, t]
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
        advantages[:, t] = torch.where(m, adv_t, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns
