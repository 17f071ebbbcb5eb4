"""Tests of agentrl/trainer/algos/sampling.py: DAPO dynamic-sampling filter."""

import torch

from agentrl.trainer.algos.sampling import filter_uniform_groups


def test_keeps_only_groups_with_different_scores():
    # Group 2 {1, 0}: mixed -> keep. Group 9 {1, 1}: uniform -> drop. Group 4 {0.3}: a group of one
    # is uniform -> drop. Group 5 {0.7, 0.7}: uniform -> drop. Rows are interleaved on purpose.
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.7, 0.7])
    groups = torch.tensor([2, 9, 2, 9, 4, 5, 5])
    keep = filter_uniform_groups(scores, groups)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, False, True, False, False, False, False]


def test_atol_treats_nearly_equal_scores_as_uniform():
    # Spread 1e-4: exact comparison keeps the group, atol 1e-3 drops it.
    scores = torch.tensor([0.5, 0.5001, 0.0, 1.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    assert filter_uniform_groups(scores, groups).tolist() == [True, True, True, True]
    assert filter_uniform_groups(scores, groups, atol=1e-3).tolist() == [False, False, True, True]


def test_empty_batch():
    keep = filter_uniform_groups(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.shape == (0,) and keep.dtype == torch.bool
