"""Truncated importance sampling (TIS) for the rollout-engine / trainer mismatch.

The inference engine (vLLM, SGLang) samples with kernels and precision that differ from the
trainer's, so its log-probabilities differ from the trainer's `old_logprobs` of the same policy.
Weighting each token's loss by `pi_old / pi_rollout`, truncated at `cap`, corrects the bias that
off-by-a-little sampling causes, with bounded variance.

Shape letters: B sequences, T response tokens (padded).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from agentrl.errors import ConfigError, did_you_mean
from agentrl.trainer.algos.losses import kl_penalty, masked_mean

TIS_LEVELS = ("token", "sequence")


@torch.no_grad()
def tis_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    level: str = "token",
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance weights `min(pi_old / pi_rollout, cap)`.

    At `level="token"` each token gets its own ratio. At `level="sequence"` every token of a
    sequence gets the product of its tokens' ratios (the exp of the summed log ratios over masked
    tokens), truncated at `cap`; it is unbiased for sequence-level objectives but its variance
    grows with length. Ratios are taken in log space, so long sequences cannot overflow.

    Args:
        old_logprobs: [B, T] trainer log-probabilities of the sampled tokens.
        rollout_logprobs: [B, T] log-probabilities the rollout engine reported for them.
        response_mask: [B, T] 1 on tokens the policy generated.
        level: "token" or "sequence".
        cap: Truncation; must be positive.

    Returns:
        (weights [B, T] float32, detached, zero where the mask is 0; metrics) with metrics
        `tis_weight_mean` and `tis_clip_frac` over masked tokens, and `rollout_kl`, the k3 estimate
        of KL(pi_rollout || pi_old) per token.

    Example:
        >>> w, metrics = tis_weights(old_logp, batch.rollout_logprobs, mask, cap=2.0)  # doctest: +SKIP
        >>> loss, _ = ppo_clip(logp, old_logp, adv * w, mask)  # doctest: +SKIP
    """
    if level not in TIS_LEVELS:
        hint = did_you_mean(level, TIS_LEVELS)
        raise ConfigError(f"unknown TIS level {level!r}.{hint} Expected 'token' or 'sequence'")
    if cap <= 0:
        raise ConfigError(f"TIS cap must be positive (it truncates pi_old / pi_rollout); got {cap}")
    if not (old_logprobs.shape == rollout_logprobs.shape == response_mask.shape) or response_mask.dim() != 2:
        raise ValueError(
            "expected old_logprobs, rollout_logprobs and response_mask all [B, T]; got "
            f"{tuple(old_logprobs.shape)}, {tuple(rollout_logprobs.shape)}, {tuple(response_mask.shape)}"
        )
    m = response_mask.bool()
    log_ratio = torch.where(m, old_logprobs.float() - rollout_logprobs.float(), 0.0)  # [B, T]
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)  # [B, T]
    log_cap = math.log(cap)
    clipped = log_ratio > log_cap  # [B, T]
    weights = torch.where(m, torch.exp(log_ratio.clamp(max=log_cap)), 0.0)  # [B, T]
    metrics = {
        "tis_weight_mean": masked_mean(weights, m).item(),
        "tis_clip_frac": masked_mean(clipped.float(), m).item(),
        "rollout_kl": masked_mean(kl_penalty(rollout_logprobs, old_logprobs, "k3"), m).item(),
    }
    return weights, metrics
