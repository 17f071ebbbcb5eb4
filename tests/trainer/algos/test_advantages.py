"""Tests of agentrl/trainer/algos/advantages.py: hand-computed estimators and a slow GAE reference."""

import pytest
import torch

from agentrl.errors import RegistryError
from agentrl.trainer.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae,
    get_advantage_estimator,
    masked_whiten,
    normalize_per_task,
)

# Two groups of three, interleaved to prove group membership comes from ids, not position.
# Group 7 holds scores [1, 2, 3] (rows 0, 2, 4); group 3 holds [0, 0, 1] (rows 1, 3, 5).
SCORES = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 1.0])
GROUPS = torch.tensor([7, 3, 7, 3, 7, 3])
MASK = torch.ones(6, 2)


def first_token(adv: torch.Tensor) -> torch.Tensor:
    return adv[:, 0]


def test_grpo_hand_computed():
    # Group 7: mean 2, unbiased var ((-1)^2 + 0 + 1^2) / 2 = 1, std 1 -> [-1, 0, 1].
    # Group 3: mean 1/3, deviations [-1/3, -1/3, 2/3], var (1/9 + 1/9 + 4/9) / 2 = 1/3,
    #   std 0.577350 -> [-0.577350, -0.577350, 1.154701].
    adv = get_advantage_estimator("grpo")(SCORES, MASK, GROUPS)
    expected = torch.tensor([-1.0, -0.577350, 0.0, -0.577350, 1.0, 1.154701])
    torch.testing.assert_close(first_token(adv), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[:, 1], adv[:, 0])  # broadcast over tokens


def test_grpo_without_std_equals_dr_grpo():
    # Group 7: [1, 2, 3] - 2 = [-1, 0, 1]; group 3: [0, 0, 1] - 1/3 = [-1/3, -1/3, 2/3].
    expected = torch.tensor([-1.0, -1 / 3, 0.0, -1 / 3, 1.0, 2 / 3])
    dr = get_advantage_estimator("dr_grpo")(SCORES, MASK, GROUPS)
    plain = get_advantage_estimator("grpo")(SCORES, MASK, GROUPS, norm_by_std=False)
    torch.testing.assert_close(first_token(dr), expected)
    torch.testing.assert_close(plain, dr)


def test_rloo_hand_computed():
    # Group 7 [1, 2, 3]: baselines (2+3)/2=2.5, (1+3)/2=2, (1+2)/2=1.5 -> [-1.5, 0, 1.5].
    # Group 3 [0, 0, 1]: baselines (0+1)/2=0.5, 0.5, (0+0)/2=0 -> [-0.5, -0.5, 1].
    adv = get_advantage_estimator("rloo")(SCORES, MASK, GROUPS)
    torch.testing.assert_close(first_token(adv), torch.tensor([-1.5, -0.5, 0.0, -0.5, 1.5, 1.0]))


def test_reinforce_pp_whitens_over_tokens_not_rows():
    # Group 0 scores [1, 3] -> centred [-1, 1]; group 1 scores [0, 0] -> [0, 0].
    # Row lengths 2, 1, 1, 1, so the masked tokens are [-1, -1, 1, 0, 0].
    # Token mean (-1 - 1 + 1) / 5 = -0.2; deviations [-0.8, -0.8, 1.2, 0.2, 0.2];
    # squares sum .64 + .64 + 1.44 + .04 + .04 = 2.8; unbiased var 2.8 / 4 = 0.7, std 0.836660.
    # Whitened: -0.8 / 0.836660 = -0.956183, 1.2 / 0.836660 = 1.434274, 0.2 / 0.836660 = 0.239046.
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]])
    adv = get_advantage_estimator("reinforce_pp")(scores, mask, groups)
    expected = torch.tensor([[-0.956183, -0.956183], [1.434274, 0.0], [0.239046, 0.0], [0.239046, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_singleton_and_uniform_groups_get_zero(name):
    # Group 5 has one member; group 6 has three equal scores: no signal in either.
    scores = torch.tensor([4.0, 2.0, 2.0, 2.0])
    groups = torch.tensor([5, 6, 6, 6])
    adv = get_advantage_estimator(name)(scores, torch.ones(4, 3), groups)
    assert torch.equal(adv, torch.zeros(4, 3))


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.ids())
def test_every_estimator_honours_the_contract(name):
    # [B, T] float32 output, zero where the mask is 0 (including an all-masked row), any input dtype.
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([1.0, 0.0, 5.0, 2.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    adv = get_advantage_estimator(name)(scores, mask, groups)
    assert adv.shape == (4, 3) and adv.dtype == torch.float32
    assert torch.isfinite(adv).all()
    assert (adv[~mask] == 0).all()
    torch.testing.assert_close(get_advantage_estimator(name)(scores.bfloat16(), mask, groups), adv, atol=0.05, rtol=0)


def test_unknown_estimator_suggests_the_closest_name():
    with pytest.raises(RegistryError, match="Did you mean 'grpo'"):
        get_advantage_estimator("gpro")


def test_masked_whiten_ignores_masked_values():
    # Masked tokens [1, 3] (the 100 is masked out): mean 2, unbiased std sqrt(2) -> [-0.707107, 0.707107].
    values = torch.tensor([[1.0, 100.0], [3.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    out = masked_whiten(values, mask)
    torch.testing.assert_close(out, torch.tensor([[-0.707107, 0.0], [0.707107, 0.0]]), atol=1e-5, rtol=0)


def test_normalize_per_task_hand_computed():
    # Task 0 rows carry [1] and [3]: mean 2, unbiased std sqrt(2) = 1.414214 -> [-0.707107], [0.707107].
    # Task 1 rows carry [5, 5] and [8]: mean 18/3 = 6, deviations [-1, -1, 2], var (1+1+4)/2 = 3,
    #   std 1.732051 -> [-0.577350, -0.577350], [1.154701]. Both tasks end on one scale.
    adv = torch.tensor([[1.0, 0.0], [5.0, 5.0], [3.0, 0.0], [8.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0]])
    tasks = torch.tensor([0, 1, 0, 1])
    out = normalize_per_task(adv, mask, tasks)
    expected = torch.tensor([[-0.707107, 0.0], [-0.577350, -0.577350], [0.707107, 0.0], [1.154701, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_gae_hand_computed_with_a_tool_gap():
    # mask [1, 0, 1, 1]: position 1 is tool output, so its value 9 and reward 5 are skipped.
    # gamma 0.9, lam 0.5 (gamma * lam = 0.45), values [0.5, 9, 0.2, 0.4], rewards [0, 5, 0, 1].
    # t=3: delta = 1 + 0.9*0 - 0.4 = 0.6;            A3 = 0.6
    # t=2: delta = 0 + 0.9*0.4 - 0.2 = 0.16;         A2 = 0.16 + 0.45*0.6 = 0.43
    # t=0: next response token is 2:
    #      delta = 0 + 0.9*0.2 - 0.5 = -0.32;        A0 = -0.32 + 0.45*0.43 = -0.1265
    # returns = A + V = [0.3735, 0, 0.63, 1.0] (masked position zeroed).
    rewards = torch.tensor([[0.0, 5.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.2, 0.4]])
    mask = torch.tensor([[1, 0, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.1265, 0.0, 0.43, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[0.3735, 0.0, 0.63, 1.0]]))


def slow_gae(rewards, values, mask, gamma, lam):
    """Obviously-correct reference: list the response positions of each row, recurse backwards."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        positions = [t for t in range(values.shape[1]) if mask[b, t]]
        running, next_value = 0.0, 0.0
        for t in reversed(positions):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = values[b, t].item()
    return adv, torch.where(mask.bool(), adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.8, 0.0)])
def test_gae_matches_slow_reference_with_mask_gaps(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 12, generator=gen)
    values = torch.randn(5, 12, generator=gen)
    mask = torch.rand(5, 12, generator=gen) > 0.4  # random gaps, like interleaved tool output
    mask[0] = False  # an all-masked row
    mask[1] = True  # a row with no gap: plain GAE
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = slow_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)


def test_gae_is_detached():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.ones(2, 3), values, torch.ones(2, 3), gamma=1.0, lam=1.0)
    assert not adv.requires_grad and not ret.requires_grad
