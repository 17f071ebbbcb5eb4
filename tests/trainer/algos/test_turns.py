"""Tests of agentrl/trainer/algos/turns.py: the per-turn leave-one-out estimator by hand, its agreement
with RLOO on one-turn episodes, and its unbiasedness on a bandit whose policy gradient is known exactly
(where the group mean with the episode itself in it is measurably biased)."""

from __future__ import annotations

import pytest
import torch

from agentrl.trainer.algos import get_advantage_estimator, turn_rloo


def _rows(episodes: list[list[float]], tokens_per_turn: int = 2, gap: int = 1):
    """Rows of turns (each `tokens_per_turn` model tokens, reward on the last) separated by `gap`
    observation tokens: (token_rewards, mask, turn_index), each [B, T]."""
    T = max(len(e) for e in episodes) * (tokens_per_turn + gap)
    B = len(episodes)
    rewards, mask, turns = torch.zeros(B, T), torch.zeros(B, T), torch.full((B, T), -1)
    for b, ep in enumerate(episodes):
        for k, r in enumerate(ep):
            start = k * (tokens_per_turn + gap)
            mask[b, start:start + tokens_per_turn] = 1
            turns[b, start:start + tokens_per_turn] = k
            rewards[b, start + tokens_per_turn - 1] = r
    return rewards, mask, turns


def _per_turn(adv: torch.Tensor, turns: torch.Tensor, b: int) -> list[float]:
    """The advantage of each turn of row b (checking every token of the turn carries it)."""
    out = []
    for k in range(int(turns[b].max()) + 1):
        values = adv[b][turns[b] == k]
        assert torch.allclose(values, values[0].expand_as(values))
        out.append(round(float(values[0]), 5))
    return out


# Group 0: A has turn rewards [1, 0, 2], B [0, 1], C [3]; group 1: D [1], E [0, 5] (rows interleaved).
EPISODES = [[1.0, 0.0, 2.0], [1.0], [0.0, 1.0], [3.0], [0.0, 5.0]]
GROUPS = torch.tensor([0, 1, 0, 0, 1])


def test_hand_computed_undiscounted():
    # gamma 1: returns-to-go A [3, 2, 2], B [1, 1], C [3]; D [1], E [5, 5].
    # Turn 0 (all of group 0): A 3 - (1 + 3)/2 = 1; B 1 - (3 + 3)/2 = -2; C 3 - (3 + 1)/2 = 1.
    # Turn 1 (A, B): A 2 - 1 = 1; B 1 - 2 = -1. Turn 2 (A only): no other episode got there: 2 - 0 = 2.
    # Group 1, turn 0: D 1 - 5 = -4, E 5 - 1 = 4; turn 1 (E only): 5.
    rewards, mask, turns = _rows(EPISODES)
    adv = turn_rloo(rewards, mask, turns, GROUPS)
    assert [_per_turn(adv, turns, b) for b in range(5)] == [[1, 1, 2], [-4], [-2, -1], [1], [4, 5]]
    assert (adv[mask == 0] == 0).all()  # observation tokens and padding carry nothing


def test_hand_computed_discounted():
    # gamma 0.5: A [1 + 0.5 * (0 + 0.5 * 2), 0 + 0.5 * 2, 2] = [1.5, 1, 2]; B [0.5, 1]; C [3]; D [1]; E [2.5, 5].
    # Turn 0: A 1.5 - (0.5 + 3)/2 = -0.25; B 0.5 - (1.5 + 3)/2 = -1.75; C 3 - (1.5 + 0.5)/2 = 2.
    # Turn 1: A 1 - 1 = 0; B 1 - 1 = 0. Turn 2: A 2. Group 1: D 1 - 2.5 = -1.5; E 2.5 - 1 = 1.5, then 5.
    rewards, mask, turns = _rows(EPISODES)
    adv = turn_rloo(rewards, mask, turns, GROUPS, gamma=0.5)
    assert [_per_turn(adv, turns, b) for b in range(5)] == [[-0.25, 0, 2], [-1.5], [-1.75, 0], [2], [1.5, 5]]


def test_norm_by_std_scales_each_group_by_its_advantages_std():
    # Group 0's turn advantages (gamma 1) are [1, 1, 2, -2, -1, 1]: mean 1/3, squared deviations
    # 4/9 + 4/9 + 25/9 + 49/9 + 16/9 + 4/9 = 102/9, unbiased var 102/45, std 1.505545.
    # Group 1's are [-4, 4, 5]: mean 5/3, squared deviations 289/9 + 49/9 + 100/9 = 438/9, var 438/18,
    # std 4.932883.
    rewards, mask, turns = _rows(EPISODES)
    adv = turn_rloo(rewards, mask, turns, GROUPS, norm_by_std=True)
    s0, s1 = 1.505545, 4.932883
    want = [[1 / s0, 1 / s0, 2 / s0], [-4 / s1], [-2 / s0, -1 / s0], [1 / s0], [4 / s1, 5 / s1]]
    for b in range(5):
        assert _per_turn(adv, turns, b) == pytest.approx(want[b], abs=1e-4)


def test_one_turn_episodes_give_rloo():
    """With one turn per episode the estimator is RLOO of the episode rewards (self-consistency)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=gen)
    groups = torch.arange(12) // 4
    rewards, mask, turns = _rows([[float(s)] for s in scores], tokens_per_turn=3)
    ours = turn_rloo(rewards, mask, turns, groups)
    torch.testing.assert_close(ours, get_advantage_estimator("rloo")(scores, mask, groups), atol=1e-6, rtol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="all \\[B, T\\]"):
        turn_rloo(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="group_ids \\[B\\]"):
        turn_rloo(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(3))


# --- unbiasedness on a bandit with a known gradient --------------------------------------------------
# Three turns at most. At turn k the policy picks one of three actions with softmax(THETA[k]); action 0
# stops the episode, 1 and 2 go on (turn 2 ends it whatever the action). The reward of (k, a) is
# BASE[k, a] plus Gaussian noise, so episodes differ in length and in return, as the policy decides.
THETA = torch.tensor([[0.3, -0.2, 0.4], [0.1, 0.5, -0.3], [-0.2, 0.0, 0.6]], dtype=torch.float64)
BASE = torch.tensor([[0.5, -1.0, 0.8], [1.5, 0.2, -0.4], [2.0, -1.0, 3.0]], dtype=torch.float64)
NOISE = 0.5


def exact_gradient(gamma: float) -> torch.Tensor:
    """What the estimator's mean must be, exactly: sum_k P(reach k) E_{a ~ pi_k}[grad log pi_k(a) Q_k(a)],
    Q_k(a) = BASE[k, a] + gamma * [a goes on] * V_{k+1}, each turn's term weighted as the estimator weighs
    it (the usual convention, as in GAE, of no gamma^k in front of turn k). [3, 3]"""
    goes_on = [torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)] * 2 + [torch.zeros(3, dtype=torch.float64)]
    pi = torch.softmax(THETA, -1)
    q, value = [None] * 3, torch.zeros((), dtype=torch.float64)
    for k in reversed(range(3)):
        q[k] = BASE[k] + gamma * goes_on[k] * value
        value = (pi[k] * q[k]).sum()
    reach = [1.0, 1.0 - float(pi[0, 0]), (1.0 - float(pi[0, 0])) * (1.0 - float(pi[1, 0]))]
    # grad of E_pi[Q] with Q fixed, through the softmax: pi * (Q - E_pi[Q]).
    return torch.stack([reach[k] * pi[k] * (q[k] - (pi[k] * q[k]).sum()) for k in range(3)])


def objective_gradient() -> torch.Tensor:
    """d J / d THETA for J = E[sum_k r_k], by autograd through the enumerated chain. [3, 3]"""
    theta = THETA.clone().requires_grad_(True)
    value = torch.zeros((), dtype=torch.float64)
    for k in reversed(range(3)):
        pi = torch.softmax(theta[k], -1)
        goes_on = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64) if k < 2 else torch.zeros(3, dtype=torch.float64)
        value = (pi * (BASE[k] + goes_on * value)).sum()
    value.backward()
    return theta.grad


def test_the_known_answer_is_the_policy_gradient_when_undiscounted():
    torch.testing.assert_close(exact_gradient(1.0), objective_gradient())


def sample_groups(n: int, g: int, seed: int):
    """n groups of g episodes: (actions [n*g, 3], alive [n*g, 3], rewards [n*g, 3]); dead turns have reward 0."""
    gen = torch.Generator().manual_seed(seed)
    pi = torch.softmax(THETA, -1)  # [3, 3]
    actions = torch.stack([torch.multinomial(pi[k], n * g, replacement=True, generator=gen) for k in range(3)], 1)
    alive = torch.ones(n * g, 3, dtype=torch.bool)
    alive[:, 1] = actions[:, 0] != 0
    alive[:, 2] = alive[:, 1] & (actions[:, 1] != 0)
    noise = torch.randn(n * g, 3, generator=gen, dtype=torch.float64) * NOISE
    rewards = torch.where(alive, BASE[torch.arange(3), actions] + noise, 0.0)
    return actions, alive, rewards


def per_group_gradients(adv: torch.Tensor, actions: torch.Tensor, alive: torch.Tensor, n: int, g: int) -> torch.Tensor:
    """Each group's estimate (1/g) sum_episodes sum_turns A_k grad log pi(a_k | k): [n, 3, 3]."""
    pi = torch.softmax(THETA, -1)
    score = torch.nn.functional.one_hot(actions, 3).double() - pi  # [B, 3 turns, 3 actions]
    terms = (adv * alive)[..., None] * score  # [B, 3, 3]
    return terms.view(n, g, 3, 3).mean(1)


def self_included_baseline(rewards: torch.Tensor, alive: torch.Tensor, n: int, g: int, gamma: float) -> torch.Tensor:
    """The tempting alternative: each turn's return-to-go minus the mean over the group's episodes that
    reached that turn, the episode itself included. [B, 3]"""
    R = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for k in reversed(range(3)):
        running = torch.where(alive[:, k], rewards[:, k] + gamma * running, 0.0)
        R[:, k] = running
    sums = (R * alive).view(n, g, 3).sum(1, keepdim=True)
    counts = alive.view(n, g, 3).sum(1, keepdim=True).clamp(min=1)
    return torch.where(alive, R - (sums / counts).expand(n, g, 3).reshape(-1, 3), 0.0)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_unbiased_on_a_bandit_with_a_known_gradient(gamma):
    n, g = 100_000, 4
    actions, alive, rewards = sample_groups(n, g, seed=11)
    # One token per turn, so the [B, T] batch is the [B, K] table itself.
    turns = torch.where(alive, torch.arange(3).expand(n * g, 3), -1)
    groups = torch.arange(n).repeat_interleave(g)
    adv = turn_rloo(rewards.float(), alive.float(), turns, groups, gamma=gamma).double()
    exact = exact_gradient(gamma)
    est = per_group_gradients(adv, actions, alive, n, g)  # [n, 3, 3] independent group estimates
    mean, se = est.mean(0), est.std(0) / n ** 0.5
    z = ((mean - exact) / se).abs()
    assert (z < 4.5).all(), f"the estimator is off by {z.max():.1f} standard errors:\n{mean}\n{exact}"
    assert exact.abs().max() > 20 * se.max()  # the gradient is resolved, so a bias of a few percent would show
    # The same test catches a biased estimator: with the episode in its own baseline, turn k's term shrinks
    # by 1 - E[1/n_k], more at later turns (fewer episodes reach them).
    naive = per_group_gradients(self_included_baseline(rewards, alive, n, g, gamma), actions, alive, n, g)
    z_naive = ((naive.mean(0) - exact) / (naive.std(0) / n ** 0.5)).abs()
    assert z_naive.max() > 10, f"the self-included baseline should be visibly biased, z = {z_naive.max():.1f}"
