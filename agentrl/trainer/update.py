"""One policy update from a batch of trajectories: advantages, packing, loss, optimizer step.

Letters: B trajectories, S sequences in a micro-batch, L the longest of them, N packed tokens.
Gradients of all micro-batches are accumulated so that the loss is exactly the mean over the whole
mini-batch (token-mean: divided by the mini-batch's total model tokens; sequence modes: weighted by
each micro-batch's share of sequences).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.actor import shift_to_next_token, token_logprobs
from agentrl.trainer.algos import aggregate_loss, get_advantage_estimator, get_policy_loss
from agentrl.trainer.packing import pack_by_token_budget, pack_sequences


def outcome_advantages(trajectories: Sequence[Trajectory], estimator: str, **options) -> list[float]:
    """One advantage per trajectory from its final reward, normalised within its group."""
    fn = get_advantage_estimator(estimator)
    scores = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)  # [B]
    groups = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)  # [B]
    adv = fn(scores, torch.ones(len(trajectories), 1), groups, **options)  # [B, 1]
    return adv[:, 0].tolist()


@dataclass(frozen=True)
class LossSettings:
    """What the policy loss needs besides tensors."""

    policy_loss: str = "ppo_clip"
    agg_mode: str = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    entropy_coef: float = 0.0
    temperature: float = 1.0
    old_logprobs: str = "rollout"


def _loss_options(s: LossSettings) -> dict:
    if s.policy_loss == "cispo":
        return {"clip_high": s.clip_high}
    return {"clip_low": s.clip_low, "clip_high": s.clip_high}


@torch.no_grad()
def recompute_logprobs(model, trajectories: Sequence[Trajectory], micro_batch_tokens: int, temperature: float,
                       chunk: int) -> list[list[float]]:
    """Trainer-side logprob of every token (next-token layout) with the current weights."""
    out: list[list[float]] = [[] for _ in trajectories]
    for idx in pack_by_token_budget([len(t.token_ids) for t in trajectories], micro_batch_tokens):
        packed = pack_sequences([trajectories[i].token_ids for i in idx], device=model.device)
        logp, _ = token_logprobs(model, packed, temperature, chunk)
        for j, i in enumerate(idx):
            a, b = int(packed.cu_seqlens[j]), int(packed.cu_seqlens[j + 1])
            out[i] = logp[a:b].tolist()
    return out


def policy_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, trajectories: Sequence[Trajectory],
    advantages: Sequence[float], settings: LossSettings, *, micro_batch_tokens: int, grad_clip: float,
    logprob_chunk: int = 2048,
) -> dict[str, float]:
    """Accumulate the loss over packed micro-batches and take one optimizer step.

    Trajectories without model tokens (failed episodes) carry no gradient and are skipped.
    Returns metrics; `skipped` is 1 when the loss or gradient norm was not finite (no step taken).
    """
    keep = [i for i, t in enumerate(trajectories) if t.num_model_tokens > 0]
    if not keep:
        return {"loss": 0.0, "skipped": 1.0, "grad_norm": 0.0}
    trajs = [trajectories[i] for i in keep]
    advs = [advantages[i] for i in keep]
    old_rows = ([shift_to_next_token(list(t.rollout_logprobs), 0.0) for t in trajs]
                if settings.old_logprobs == "rollout" else
                recompute_logprobs(model, trajs, micro_batch_tokens, settings.temperature, logprob_chunk))
    total_tokens = sum(t.num_model_tokens for t in trajs)
    loss_fn = get_policy_loss(settings.policy_loss)
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    loss_total = 0.0
    for idx in pack_by_token_budget([len(t.token_ids) for t in trajs], micro_batch_tokens):
        packed = pack_sequences([trajs[i].token_ids for i in idx], device=device)
        mask = packed.pack([shift_to_next_token(list(trajs[i].loss_mask), 0) for i in idx])  # [N]
        old = packed.pack([old_rows[i] for i in idx])  # [N]
        adv = packed.pack([[advs[i]] * len(trajs[i].token_ids) for i in idx])  # [N]
        logp, entropy = token_logprobs(model, packed, settings.temperature, logprob_chunk)
        pad = packed.to_padded  # [N] -> [S, L]
        share = len(idx) / len(trajs)
        scale = {"loss_scale_tokens": float(total_tokens)} if settings.agg_mode == "token_mean" else {}
        loss, metrics = loss_fn(pad(logp), pad(old), pad(adv), pad(mask), agg_mode=settings.agg_mode,
                                **scale, **_loss_options(settings))
        if not scale:
            loss = loss * share
        if settings.entropy_coef:
            ent = aggregate_loss(pad(entropy), pad(mask), settings.agg_mode, **scale)
            loss = loss - settings.entropy_coef * (ent if scale else ent * share)
        loss.backward()
        loss_total += loss.item()
        weight = float(mask.sum()) / total_tokens
        sums["entropy"] = sums.get("entropy", 0.0) + float((entropy.detach() * mask).sum()) / total_tokens
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * weight
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(torch.tensor(loss_total)))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": loss_total, "grad_norm": float(grad_norm), "skipped": 0.0 if finite else 1.0,
            "trained_tokens": float(total_tokens), **sums}
