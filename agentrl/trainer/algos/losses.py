"""Policy losses, their one shared aggregation, KL estimators and entropy.

Every policy loss is a pure function registered in `POLICY_LOSSES` with one signature:
`fn(logprobs, old_logprobs, advantages, response_mask, *, agg_mode="token_mean", **options)
-> (loss, metrics)`. A loss builds a per-token loss matrix and hands it to `aggregate_loss`, the
only place that knows how tokens and sequences are averaged. An entropy bonus is
`aggregate_loss(entropy, mask, mode)` of `entropy_from_logits`; a KL term is the same of
`kl_penalty`. Arithmetic is float32 whatever the input dtype; masked positions never reach a
`exp`, so garbage there cannot turn into NaN values or gradients.

Shape letters: B sequences, T response tokens (padded), N flattened tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from agentrl.errors import ConfigError, did_you_mean
from agentrl.registry import Registry

PolicyLoss = Callable[..., tuple[Tensor, dict[str, float]]]
"""`fn(logprobs, old_logprobs, advantages, response_mask, *, agg_mode, **options) -> (loss, metrics)`."""

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")

AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_sum_norm")
KL_KINDS = ("k1", "k2", "k3")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: far past any clip, far below float32 overflow


def get_policy_loss(name: str) -> PolicyLoss:
    """Return the loss registered as `name`; a typo raises `RegistryError` with a suggestion.

    Example:
        >>> loss_fn = get_policy_loss("ppo_clip")
        >>> loss, metrics = loss_fn(logp, old_logp, adv, mask, clip_high=0.28)  # doctest: +SKIP
    """
    return POLICY_LOSSES.get(name)


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        hint = did_you_mean(value, allowed)
        raise ConfigError(f"unknown {what} {value!r}.{hint} Expected one of: {', '.join(allowed)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` [B, T] over positions where `mask` [B, T] is nonzero; 0 if there are none."""
    m = mask.bool()
    return torch.where(m, values.float(), 0.0).sum() / m.sum().clamp(min=1)


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    agg_mode: str = "token_mean",
    loss_scale_tokens: float | None = None,
    *,
    norm_constant: float | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    Modes:
        token_mean: sum over masked tokens / their count, or / `loss_scale_tokens` when given (the
            token count of the whole global batch, so micro-batch losses sum to the exact mean).
        seq_mean_token_sum: per-sequence sum, then mean over sequences.
        seq_mean_token_mean: per-sequence mean, then mean over sequences.
        seq_sum_norm: sum over masked tokens / `norm_constant` (Dr. GRPO: a fixed budget such as
            sequences per global batch x max response tokens, so no length bias appears).

    The seq_mean modes average over sequences with at least one masked token, so empty rows
    (padding micro-batches) neither dilute the mean nor produce NaN. No masked token at all gives
    0, still attached to the graph.

    Args:
        loss_mat: [B, T] per-token loss.
        mask: [B, T] 1 on tokens that count.
        agg_mode: One of `AGG_MODES`.
        loss_scale_tokens: Divisor for token_mean instead of the local token count.
        norm_constant: Divisor for seq_sum_norm; required there.

    Returns:
        Scalar float32 tensor.
    """
    _choice(agg_mode, AGG_MODES, "agg_mode")
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"expected loss_mat and mask both [B, T]; got {tuple(loss_mat.shape)} and {tuple(mask.shape)}")
    if loss_scale_tokens is not None and (agg_mode != "token_mean" or loss_scale_tokens <= 0):
        raise ConfigError(
            f"loss_scale_tokens={loss_scale_tokens} needs agg_mode='token_mean' and a positive value (got "
            f"agg_mode={agg_mode!r}); for seq_mean modes scale each micro-batch loss by its share of sequences"
        )
    m = mask.bool()
    masked = torch.where(m, loss_mat.float(), 0.0)  # [B, T]
    if agg_mode == "token_mean":
        denom = m.sum().clamp(min=1) if loss_scale_tokens is None else loss_scale_tokens
        return masked.sum() / denom
    if agg_mode == "seq_sum_norm":
        if norm_constant is None or norm_constant <= 0:
            raise ConfigError(
                f"agg_mode='seq_sum_norm' needs a positive norm_constant (got {norm_constant}); "
                "use sequences per global batch x max response tokens"
            )
        return masked.sum() / norm_constant
    tokens = m.sum(-1)  # [B]
    seq = masked.sum(-1)  # [B]
    if agg_mode == "seq_mean_token_mean":
        seq = seq / tokens.clamp(min=1)
    return seq.sum() / (tokens > 0).sum().clamp(min=1)


def _log_ratio(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated float32 `(log_ratio, advantages, mask)`, zeroed outside the mask, each [B, T]."""
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape) or mask.dim() != 2:
        raise ValueError(
            "expected logprobs, old_logprobs, advantages and response_mask all [B, T]; got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(advantages.shape)}, {tuple(mask.shape)}"
        )
    m = mask.bool()
    log_ratio = torch.where(m, logprobs.float() - old_logprobs.float().detach(), 0.0)
    return log_ratio, torch.where(m, advantages.float().detach(), 0.0), m


def _ratio_metrics(log_ratio: Tensor, ratio: Tensor, clipped: Tensor, m: Tensor) -> dict[str, float]:
    return {
        "clip_frac": masked_mean(clipped.float(), m).item(),
        "approx_kl": masked_mean(-log_ratio.detach(), m).item(),
        "ratio_mean": masked_mean(ratio.detach(), m).item(),
    }


@POLICY_LOSSES.decorator("ppo_clip")
def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    agg_mode: str = "token_mean",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_scale_tokens: float | None = None,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with DAPO clip-higher and optional dual clip.

    Per token, `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`; with `dual_clip=c` the loss of
    a negative-advantage token is further capped at `-c A`, so a huge ratio cannot blow it up.

    Args:
        logprobs: [B, T] current policy log-probabilities (with grad).
        old_logprobs: [B, T] log-probabilities of the policy that sampled (detached).
        advantages: [B, T].
        response_mask: [B, T].
        agg_mode, loss_scale_tokens, norm_constant: See `aggregate_loss`.
        clip_low: Lower clip range (ratio >= 1 - clip_low).
        clip_high: Upper clip range (ratio <= 1 + clip_high); DAPO uses 0.28.
        dual_clip: The constant c > 1 of dual-clip PPO, or None.

    Returns:
        (loss, metrics) with metrics `clip_frac`, `approx_kl`, `ratio_mean` (and `dual_clip_frac`).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"dual_clip must be > 1 (it caps the loss at -c*A for A < 0); got {dual_clip}")
    log_ratio, adv, m = _log_ratio(logprobs, old_logprobs, advantages, response_mask)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # [B, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)  # [B, T]
    metrics = _ratio_metrics(log_ratio, ratio, clipped > unclipped, m)
    if dual_clip is not None:
        capped = torch.minimum(loss_mat, -adv * dual_clip)
        dual_hit = (adv < 0) & (capped < loss_mat)
        loss_mat = torch.where(adv < 0, capped, loss_mat)
        metrics["dual_clip_frac"] = masked_mean(dual_hit.float(), m).item()
    loss = aggregate_loss(loss_mat, m, agg_mode, loss_scale_tokens, norm_constant=norm_constant)
    return loss, metrics


@POLICY_LOSSES.decorator("gspo")
def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    agg_mode: str = "token_mean",
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    loss_scale_tokens: float | None = None,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: PPO clipping on the sequence-level ratio `s = exp(mean_t log(pi / pi_old))`.

    Each token carries `s_t = sg[s] * pi_t / sg[pi_t]`: its value is the sequence ratio, its gradient
    `s * grad log pi_t`, which is the GSPO paper's token-level form. The paper's objective averages
    per sequence, i.e. `agg_mode="seq_mean_token_mean"`; the default stays `token_mean` like every
    other loss here.

    Args:
        See `ppo_clip`; clip ranges are much smaller because the ratio is a per-token geometric mean.

    Returns:
        (loss, metrics) with `clip_frac` (over tokens), `approx_kl`, `ratio_mean` (over tokens).
    """
    log_ratio, adv, m = _log_ratio(logprobs, old_logprobs, advantages, response_mask)
    seq_log_ratio = log_ratio.sum(-1) / m.sum(-1).clamp(min=1)  # [B]
    logp = torch.where(m, logprobs.float(), 0.0)  # [B, T]
    token_log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()  # [B, T], value = seq ratio
    ratio = torch.exp(token_log_ratio.clamp(max=_MAX_LOG_RATIO))  # [B, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)  # [B, T]
    metrics = _ratio_metrics(log_ratio, ratio, clipped > unclipped, m)
    loss = aggregate_loss(loss_mat, m, agg_mode, loss_scale_tokens, norm_constant=norm_constant)
    return loss, metrics


@POLICY_LOSSES.decorator("cispo")
def cispo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    agg_mode: str = "token_mean",
    clip_high: float = 5.0,
    loss_scale_tokens: float | None = None,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1): REINFORCE weighted by a clipped, detached importance ratio.

    Per token, `-sg[min(r, 1 + clip_high)] * A * log pi`. Unlike PPO no token's gradient is dropped;
    clipping only bounds its weight.

    Args:
        See `ppo_clip`; `clip_high` bounds the weight at `1 + clip_high`.

    Returns:
        (loss, metrics) with `clip_frac` (weights that hit the bound), `approx_kl`, `ratio_mean`.
    """
    log_ratio, adv, m = _log_ratio(logprobs, old_logprobs, advantages, response_mask)
    ratio = torch.exp(log_ratio.detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # [B, T]
    weight = ratio.clamp(max=1.0 + clip_high)  # [B, T], detached
    logp = torch.where(m, logprobs.float(), 0.0)
    loss_mat = -weight * adv * logp  # [B, T]
    metrics = _ratio_metrics(log_ratio, ratio, ratio > 1.0 + clip_high, m)
    loss = aggregate_loss(loss_mat, m, agg_mode, loss_scale_tokens, norm_constant=norm_constant)
    return loss, metrics


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Schulman's per-token estimators of KL(pi || ref) from samples of pi.

    With `x = ref - logp`: k1 = `-x` (unbiased, high variance, can be negative), k2 = `x^2 / 2`
    (biased, low variance), k3 = `exp(x) - x - 1` (unbiased, always >= 0).
    Aggregate it for a loss term, or subtract `beta * kl_penalty(...).detach()` from token rewards.

    Args:
        logprobs: [B, T] policy log-probabilities of the sampled tokens.
        ref_logprobs: [B, T] reference log-probabilities of the same tokens.
        kind: One of `KL_KINDS`.

    Returns:
        [B, T] float32.
    """
    _choice(kind, KL_KINDS, "KL estimator")
    x = (ref_logprobs.float() - logprobs.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [B, T]
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x**2
    return torch.exp(x) - x - 1.0


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per row, `logsumexp(z) - sum(p * z)`, stable and -inf safe.

    Args:
        logits: [N, V]; -inf entries (banned tokens) are allowed.

    Returns:
        [N] float32 entropies in nats.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)  # [N, V]
    z_finite = torch.where(torch.isfinite(z), z, 0.0)  # p is 0 there; avoids 0 * -inf
    return torch.logsumexp(z, dim=-1) - (p * z_finite).sum(-1)
