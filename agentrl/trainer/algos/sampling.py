"""Dynamic sampling (DAPO): drop groups whose responses all scored the same.

A group where every response has the same score gives every response a zero group-relative
advantage, so it costs compute and adds no gradient. This module only decides which rows to keep;
sampling more prompts to refill the batch is the caller's job.

Shape letters: B responses, G distinct groups.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def filter_uniform_groups(scores: Tensor, group_ids: Tensor, *, atol: float = 0.0) -> Tensor:
    """Mask of the rows whose group has at least two different scores.

    Args:
        scores: [B] scalar score of each response.
        group_ids: [B] integer group (prompt) of each response; any values, any order.
        atol: Scores within `atol` of each other count as equal (0 means exact equality).

    Returns:
        [B] bool, True for rows to keep. A group of one is uniform, so it is dropped.

    Example:
        >>> keep = filter_uniform_groups(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
        >>> keep.tolist()
        [True, True, False, False]
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"expected scores [B] and group_ids [B]; got {tuple(scores.shape)} and {tuple(group_ids.shape)}"
        )
    scores = scores.float()
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # inv: [B] in 0..G-1
    empty = scores.new_zeros(uniq.numel())  # [G]
    high = empty.scatter_reduce(0, inv, scores, "amax", include_self=False)  # [G]
    low = empty.scatter_reduce(0, inv, scores, "amin", include_self=False)  # [G]
    return (high - low > atol)[inv]
