"""Tests of agentrl/trainer/algos/value.py: the clipped value loss, by hand and against verl's
`compute_value_loss` semantics (verl/trainer/ppo/core_algos.py, read for the facts):

    vpredclipped = clip(vpreds, values - cliprange_value, values + cliprange_value)
    vf_loss      = 0.5 * agg_loss(max((vpreds - returns)^2, (vpredclipped - returns)^2), mask, mode)
    vf_clipfrac  = masked_mean((vpredclipped - returns)^2 > (vpreds - returns)^2, mask)

with agg_loss's token-mean (masked sum / masked count), seq-mean-token-sum and seq-mean-token-mean
(per-row sum or mean, then the mean over rows with a masked token). The reference below is written
element by element from that description.
"""

import pytest
import torch

from agentrl.trainer.algos import clipped_value_loss


def verl_value_loss_reference(vpreds, returns, old, mask, clip, mode):
    """Element by element, in Python floats: (loss, clip fraction)."""
    rows = []
    hits = count = 0
    for b in range(vpreds.shape[0]):
        row = []
        for t in range(vpreds.shape[1]):
            if not mask[b, t]:
                continue
            v, r, o = float(vpreds[b, t]), float(returns[b, t]), float(old[b, t])
            vc = min(max(v, o - clip), o + clip)
            l1, l2 = (v - r) ** 2, (vc - r) ** 2
            row.append(max(l1, l2))
            hits += l2 > l1
            count += 1
        rows.append(row)
    if mode == "token_mean":
        agg = sum(sum(r) for r in rows) / max(count, 1)
    else:
        per_row = [sum(r) if mode == "seq_mean_token_sum" else sum(r) / len(r) for r in rows if r]
        agg = sum(per_row) / max(len(per_row), 1)
    return 0.5 * agg, hits / max(count, 1)


def test_hand_computed():
    # old 1.0, clip 0.2, return 2.0.
    # v = 1.5: clipped to 1.2; (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped is larger).
    # v = 3.0: clipped to 1.2; (3-2)^2 = 1.0,    (1.2-2)^2 = 0.64 -> 1.0.
    # v = 1.1: inside the range; both 0.81 -> 0.81 (not counted as clipped).
    # Masked mean (0.64 + 1.0 + 0.81) / 3 = 0.816667; times 0.5 = 0.408333; clip fraction 1/3.
    v = torch.tensor([[1.5, 3.0, 1.1, 9.0]])
    old = torch.ones(1, 4)
    ret = torch.full((1, 4), 2.0)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = clipped_value_loss(v, old, ret, mask, clip=0.2)
    assert float(loss) == pytest.approx(0.408333, abs=1e-6)
    assert m["vf_clip_frac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("clip", [0.05, 0.5, 3.0])
def test_matches_verl_semantics_on_random_inputs(mode, clip):
    gen = torch.Generator().manual_seed(int(clip * 100) + len(mode))
    B, T = 6, 17
    vpreds = torch.randn(B, T, generator=gen, dtype=torch.float64)
    old = vpreds + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    returns = torch.randn(B, T, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[2] = False  # a row without model tokens: no effect on any mode
    want, want_frac = verl_value_loss_reference(vpreds, returns, old, mask, clip, mode)
    loss, metrics = clipped_value_loss(vpreds, old, returns, mask, clip=clip, agg_mode=mode)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert metrics["vf_clip_frac"] == pytest.approx(want_frac)


def test_gradient_flows_only_through_unclipped_winners():
    # v = 1.5 above old + clip with the clipped error larger: the loss is constant in v there (grad 0);
    # v = 3.0 unclipped error larger: d/dv 0.5 * (v - R)^2 / n = (3 - 2) / 2 = 0.5 (n = 2 masked tokens).
    v = torch.tensor([[1.5, 3.0]], requires_grad=True)
    loss, _ = clipped_value_loss(v, torch.ones(1, 2), torch.full((1, 2), 2.0), torch.ones(1, 2), clip=0.2)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.5]]))


def test_scaled_token_mean_splits_over_micro_batches():
    # Two halves, each divided by the whole batch's token count, sum to the loss of the whole.
    gen = torch.Generator().manual_seed(3)
    v, old, ret = (torch.randn(4, 9, generator=gen) for _ in range(3))
    mask = torch.rand(4, 9, generator=gen) > 0.2
    whole, _ = clipped_value_loss(v, old, ret, mask, clip=0.3)
    n = float(mask.sum())
    parts = [clipped_value_loss(v[i], old[i], ret[i], mask[i], clip=0.3, loss_scale_tokens=n)[0]
             for i in (slice(0, 1), slice(1, 4))]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


def test_bad_shapes_and_clip_are_refused():
    with pytest.raises(ValueError, match="all \\[B, T\\]"):
        clipped_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), clip=0.2)
    with pytest.raises(ValueError, match="must be positive"):
        clipped_value_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), clip=0.0)
