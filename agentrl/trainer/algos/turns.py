r"""Turn-level advantages without a critic: each turn's return-to-go against the same turn of the
other episodes of its group (a per-turn leave-one-out baseline, "turn RLOO").

Outcome estimators (GRPO, RLOO) give every token of an episode the same advantage, so a turn is
credited with rewards that came before it, and a good step in an episode that failed later is
pushed down with the rest. When an env rewards turns (a maze step, a tool call that fetched the
right page) each turn can instead be credited with what came after it.

The estimator. A group holds G episodes of one task, played by one policy. Episode i has K_i turns
(the policy decides when it stops, so K_i is random); turn k has the reward r_{i,k} (the env's step
reward, less tool-error penalties: the sum of `token_rewards` over the turn) and the return-to-go

    R_{i,k} = sum_{j >= k} gamma^(j-k) r_{i,j}                               (gamma per turn).

Of the other episodes, those that reached turn k, N_{-i,k} = {j != i : K_j > k}, give the baseline

    b_{i,k} = mean_{j in N_{-i,k}} R_{j,k}        (0 when no other episode reached turn k),

and every token of turn k gets A_{i,k} = R_{i,k} - b_{i,k}.

Why it is unbiased, whatever the episodes' lengths. The policy gradient of one episode is
E[sum_k grad log pi(a_k | s_k) R_k] (a turn's action a_k is all of its tokens; rewards before turn k
do not depend on a_k and drop out). A baseline b_k leaves it unchanged when
E[grad log pi(a_k | s_k) b_k] = 0 for every k. Here b_{i,k} is a function of the *other* episodes
alone, which were sampled independently of episode i, so b_{i,k} is independent of (s_{i,k}, a_{i,k})
and of whether episode i reached turn k; then

    E[1{K_i > k} grad log pi(a_{i,k} | s_{i,k}) b_{i,k}]
        = E[b_{i,k}] * E[1{K_i > k} E[grad log pi(a | s_{i,k}) | s_{i,k}]] = E[b_{i,k}] * 0 = 0,

since whether turn k happens is decided before a_{i,k} and a score function has mean 0. The two
tempting alternatives are biased exactly where episode lengths differ: the group mean *with*
episode i in it scales turn k's term by 1 - E[1/n_k] (n_k: episodes that reached turn k, fewer at
later turns), so late turns are under-credited; and dividing each episode's loss by its own number
of turns or tokens reweights episodes by a length the policy chose. (Aggregate the loss with
`token_mean` or `seq_mean_token_sum`, whose divisor is the same for every episode of the batch.)
`tests/trainer/algos/test_turns.py` checks both facts numerically on a bandit whose gradient is known.

`norm_by_std` divides each group's advantages by their standard deviation (over the group's
turns), as GRPO does for scores. It is the baseline that makes the estimator unbiased; the std sets
each group's step size (like GRPO's, it weighs groups by difficulty, and computed with the episode
itself it adds a bias that shrinks as groups grow). With `norm_by_std=False` the estimator is
exactly unbiased.

Shape letters: B rows, T tokens (next-token layout), K turns (the most of any row), G groups.
"""

from __future__ import annotations

import torch
from torch import Tensor


def turn_rewards(token_rewards: Tensor, turn_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per-turn sums of the token rewards, and which turns each row has.

    Args:
        token_rewards: [B, T].
        turn_index: [B, T] int64 turn of each token, -1 on tokens of no turn.

    Returns:
        (rewards [B, K] float32, exists [B, K] bool), K = 1 + the largest turn index (at least 1).
    """
    valid = turn_index >= 0
    K = max(int(turn_index.max()) + 1, 1) if turn_index.numel() else 1
    idx = turn_index.clamp(min=0)
    rewards = token_rewards.new_zeros((turn_index.shape[0], K), dtype=torch.float32)
    rewards.scatter_add_(1, idx, torch.where(valid, token_rewards.float(), 0.0))
    tokens = rewards.new_zeros(rewards.shape).scatter_add_(1, idx, valid.float())
    return rewards, tokens > 0


def returns_to_go(rewards: Tensor, exists: Tensor, gamma: float) -> Tensor:
    """[B, K] `R_k = r_k + gamma * R_{k+1}` over each row's turns (0 where a turn does not exist)."""
    out = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])  # [B]
    for k in reversed(range(rewards.shape[1])):
        running = torch.where(exists[:, k], rewards[:, k] + gamma * running, 0.0)
        out[:, k] = running
    return out


@torch.no_grad()
def turn_rloo(token_rewards: Tensor, response_mask: Tensor, turn_index: Tensor, group_ids: Tensor, *,
              gamma: float = 1.0, norm_by_std: bool = False, eps: float = 1e-6) -> Tensor:
    """Per-turn leave-one-out advantages (see the module docstring for the estimator and its proof).

    Args:
        token_rewards: [B, T] rewards where they happened (a turn's on its last token).
        response_mask: [B, T] 1 on the model's tokens.
        turn_index: [B, T] int64 turn of each model token, -1 elsewhere.
        group_ids: [B] int64 episodes of one task share one.
        gamma: Discount per turn.
        norm_by_std: Divide each group's advantages by their std over the group's turns.
        eps: Stds below it leave the group unscaled.

    Returns:
        [B, T] float32: each token carries its turn's advantage; 0 off the mask.
    """
    if not (token_rewards.shape == response_mask.shape == turn_index.shape) or token_rewards.dim() != 2:
        raise ValueError("expected token_rewards, response_mask and turn_index all [B, T]; got "
                         f"{tuple(token_rewards.shape)}, {tuple(response_mask.shape)}, {tuple(turn_index.shape)}")
    if group_ids.shape != token_rewards.shape[:1]:
        raise ValueError(f"expected group_ids [B]; got {tuple(group_ids.shape)} for {token_rewards.shape[0]} rows")
    mask = response_mask.bool()
    turn_index = torch.where(mask, turn_index, -1)
    rewards, exists = turn_rewards(token_rewards, turn_index)  # [B, K]
    R = returns_to_go(rewards, exists, gamma)  # [B, K]
    e = exists.float()
    _, inv = torch.unique(group_ids, return_inverse=True)  # inv: [B] in 0..G-1
    G = int(inv.max()) + 1 if inv.numel() else 0
    sums = R.new_zeros((G, R.shape[1])).index_add_(0, inv, R * e)  # [G, K]
    counts = R.new_zeros((G, R.shape[1])).index_add_(0, inv, e)  # [G, K]
    others = counts[inv] - e  # [B, K] other episodes of the group that reached turn k
    baseline = torch.where(others > 0, (sums[inv] - R * e) / others.clamp(min=1), 0.0)  # [B, K]
    adv = torch.where(exists, R - baseline, 0.0)  # [B, K]
    if norm_by_std:
        n = R.new_zeros(G).index_add_(0, inv, e.sum(1))  # [G] turns of the group
        mean = R.new_zeros(G).index_add_(0, inv, adv.sum(1)) / n.clamp(min=1)  # [G]
        sq = R.new_zeros(G).index_add_(0, inv, (torch.where(exists, adv - mean[inv, None], 0.0) ** 2).sum(1))
        std = (sq / (n - 1).clamp(min=1)).sqrt()  # [G]
        adv = adv / torch.where(std > eps, std, 1.0)[inv, None]
    per_token = adv.gather(1, turn_index.clamp(min=0))  # [B, T]
    return torch.where(turn_index >= 0, per_token, 0.0)
