"""The critic's loss: PPO's clipped value regression onto the returns.

A pure function over tensors, like the policy losses: `clipped_value_loss(values, old_values,
returns, mask, *, clip, agg_mode, loss_scale_tokens) -> (loss, metrics)`. Aggregation goes through
`aggregate_loss`, so a micro-batch's loss is its exact share of the mini-batch mean.

Shape letters: B sequences, T tokens (padded), in the batch's next-token layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agentrl.trainer.algos.losses import aggregate_loss, masked_mean


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float,
    agg_mode: str = "token_mean",
    loss_scale_tokens: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`0.5 * agg(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2))` over the masked tokens.

    The clipped term keeps a new value from gaining anything by moving more than `clip` away from
    the value the returns were computed with (PPO's trust region, applied to the critic); taking the
    larger error makes the loss pessimistic, so a clipped token whose error grew still pulls back.

    Args:
        values: [B, T] the critic's current values (with grad).
        old_values: [B, T] the values the returns were computed with (detached).
        returns: [B, T] regression targets (GAE's advantages + old values; detached).
        mask: [B, T] 1 on the tokens that count (the model's own).
        clip: The clip range c > 0.
        agg_mode, loss_scale_tokens: See `aggregate_loss`.

    Returns:
        (loss, metrics): `vf_clip_frac`, the share of tokens whose clipped error was the larger;
        `value_mean` and `value_error` (mean |v - R|) over the masked tokens.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape) or mask.dim() != 2:
        shapes = ", ".join(str(tuple(t.shape)) for t in (values, old_values, returns, mask))
        raise ValueError(f"expected values, old_values, returns and mask all [B, T]; got {shapes}")
    if not clip > 0:
        raise ValueError(f"the value clip range must be positive, got {clip}")
    m = mask.bool()
    v = values.float()
    old, ret = old_values.float().detach(), returns.float().detach()
    v_clipped = torch.clamp(v, old - clip, old + clip)  # [B, T]
    plain = (v - ret) ** 2
    clipped = (v_clipped - ret) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(plain, clipped), m, agg_mode, loss_scale_tokens)
    metrics = {"vf_clip_frac": masked_mean((clipped > plain).float(), m).item(),
               "value_mean": masked_mean(v.detach(), m).item(),
               "value_error": masked_mean((v.detach() - ret).abs(), m).item()}
    return loss, metrics
