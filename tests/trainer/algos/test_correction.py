"""Tests of agentrl/trainer/algos/correction.py: truncated importance weights, token and sequence level."""

import math

import pytest
import torch

from agentrl.errors import ConfigError
from agentrl.trainer.algos.correction import tis_weights


def test_token_level_hand_computed():
    # old = 0; rollout [ln 2, -ln 1.5, -ln 4, garbage] -> pi_old / pi_rollout = [0.5, 1.5, 4, masked].
    # Truncated at cap 2: [0.5, 1.5, 2, 0]. weight_mean (0.5 + 1.5 + 2) / 3 = 1.333333; clip_frac 1/3.
    # rollout_kl = mean of e^x - x - 1 with x = ln(pi_old / pi_rollout):
    #   0.5 + 0.693147 - 1 = 0.193147; 1.5 - 0.405465 - 1 = 0.094535; 4 - 1.386294 - 1 = 1.613706
    #   -> 1.901388 / 3 = 0.633796.
    old = torch.zeros(1, 4)
    rollout = torch.tensor([[math.log(2), -math.log(1.5), -math.log(4), -1e9]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, metrics = tis_weights(old, rollout, mask, level="token", cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 1.5, 2.0, 0.0]]))
    assert metrics["tis_weight_mean"] == pytest.approx(4 / 3)
    assert metrics["tis_clip_frac"] == pytest.approx(1 / 3)
    assert metrics["rollout_kl"] == pytest.approx(0.633796, abs=1e-5)


def test_sequence_level_uses_the_product_over_masked_tokens():
    # Row 0: ratios 1.2 and 1.5 around a masked gap (whose log ratio 100 must be ignored):
    #   product 1.8 < cap 2 -> 1.8 on both response tokens.
    # Row 1: 1.5^3 = 3.375 -> truncated to 2 on all three tokens.
    # Row 2: all masked -> 0.
    # weight_mean over 5 tokens (1.8 * 2 + 2 * 3) / 5 = 1.92; clip_frac 3 / 5.
    l12, l15 = math.log(1.2), math.log(1.5)
    old = torch.tensor([[l12, 100.0, l15], [l15, l15, l15], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]])
    weights, metrics = tis_weights(old, torch.zeros(3, 3), mask, level="sequence", cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.8, 0.0, 1.8], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
    assert metrics["tis_weight_mean"] == pytest.approx(1.92)
    assert metrics["tis_clip_frac"] == pytest.approx(0.6)


def test_weights_are_detached_and_long_sequences_do_not_overflow():
    # 1000 tokens of log ratio 1 sum to 1000; exp(1000) overflows float32, the log-space cap does not.
    old = torch.ones(1, 1000, requires_grad=True)
    weights, metrics = tis_weights(old, torch.zeros(1, 1000), torch.ones(1, 1000), level="sequence", cap=3.0)
    assert not weights.requires_grad
    torch.testing.assert_close(weights, torch.full((1, 1000), 3.0))
    assert all(math.isfinite(v) for v in metrics.values())


def test_same_policy_gives_unit_weights_in_any_dtype():
    logp = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
    weights, metrics = tis_weights(logp, logp.clone(), torch.ones(2, 5), level="token")
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.ones(2, 5))
    assert metrics["rollout_kl"] == 0.0 and metrics["tis_clip_frac"] == 0.0


def test_bad_options_raise_config_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="Did you mean 'sequence'"):
        tis_weights(x, x, x, level="sequences")
    with pytest.raises(ConfigError, match="positive"):
        tis_weights(x, x, x, cap=0.0)
