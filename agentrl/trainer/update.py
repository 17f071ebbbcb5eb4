"""One policy update from a batch of trajectories: packing, loss, optimizer step.

Letters: B trajectories, S sequences in a micro-batch, L the longest of them, N packed tokens.
Gradients of all micro-batches are accumulated so that the loss is exactly the mean over the whole
mini-batch (token-mean: divided by the mini-batch's total model tokens; sequence modes: weighted by
each micro-batch's share of sequences). Under data parallelism every rank holds a slice of the
trajectories; counts are summed over ranks first, each rank's loss is multiplied by the world size
(FSDP averages gradients), and every rank runs the same number of forward passes (an empty slot
runs a one-token dummy with zero weight), so N ranks compute the gradient one process would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.actor import shift_to_next_token, token_logprobs
from agentrl.trainer.algos import (aggregate_loss, get_advantage_estimator, get_policy_loss, kl_penalty, masked_mean,
                                   tis_weights)
from agentrl.trainer.fsdp import all_reduce_max, all_reduce_sum, world_size
from agentrl.trainer.packing import PackedBatch, pack_by_token_budget, pack_sequences


def outcome_advantages(trajectories: Sequence[Trajectory], estimator: str, scores: Sequence[float] | None = None,
                       **options) -> list[float]:
    """One advantage per trajectory from its final reward (or `scores`), normalised within its group."""
    fn = get_advantage_estimator(estimator)
    values = [t.reward for t in trajectories] if scores is None else list(scores)
    scores_t = torch.tensor(values, dtype=torch.float32)  # [B]
    groups = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)  # [B]
    adv = fn(scores_t, torch.ones(len(trajectories), 1), groups, **options)  # [B, 1]
    return adv[:, 0].tolist()


def episode_kl(trajectories: Sequence[Trajectory], ref_logprobs: Sequence[Sequence[float]], kind: str) -> list[float]:
    """Per episode, the summed KL estimate between the sampling policy (rollout logprobs) and the
    reference over the model's tokens; `ref_logprobs` rows are in next-token layout."""
    out = []
    for t, ref in zip(trajectories, ref_logprobs):
        mask = torch.tensor(shift_to_next_token(list(t.loss_mask), 0), dtype=torch.bool)  # [T]
        logp = torch.tensor(shift_to_next_token(list(t.rollout_logprobs), 0.0))  # [T]
        out.append(float(kl_penalty(logp, torch.tensor(ref), kind)[mask].sum()))
    return out


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
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    tis: str = "none"
    tis_cap: float = 2.0


def _loss_options(s: LossSettings) -> dict:
    if s.policy_loss == "cispo":
        return {"clip_high": s.clip_high}
    return {"clip_low": s.clip_low, "clip_high": s.clip_high}


def _plan(trajectories: Sequence[Trajectory], budget: int) -> list[list[int]]:
    """Micro-batches by token budget, padded with empty slots to the largest count over ranks."""
    plan = pack_by_token_budget([len(t.token_ids) for t in trajectories], budget) if trajectories else []
    slots = int(all_reduce_max([float(len(plan))])[0])
    return plan + [[] for _ in range(slots - len(plan))]


def _pack(trajectories: Sequence[Trajectory], idx: list[int], device) -> PackedBatch:
    return pack_sequences([trajectories[i].token_ids for i in idx] if idx else [[0]], device=device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def recompute_logprobs(model, trajectories: Sequence[Trajectory], micro_batch_tokens: int, temperature: float,
                       chunk: int, compute_dtype: torch.dtype | None = None,
                       compiled: bool = False) -> list[list[float]]:
    """Logprob of every token (next-token layout) under `model`'s current weights."""
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in trajectories]
    for idx in _plan(trajectories, micro_batch_tokens):
        packed = _pack(trajectories, idx, device)
        with _autocast(device, compute_dtype):
            logp, _ = token_logprobs(model, packed, temperature, chunk, compiled=compiled)
        for j, i in enumerate(idx):
            a, b = int(packed.cu_seqlens[j]), int(packed.cu_seqlens[j + 1])
            out[i] = logp[a:b].float().tolist()
    return out


def policy_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, trajectories: Sequence[Trajectory],
    advantages: Sequence[float], settings: LossSettings, *, micro_batch_tokens: int, grad_clip: float,
    logprob_chunk: int = 2048, ref_logprobs: Sequence[Sequence[float]] | None = None,
    compute_dtype: torch.dtype | None = None, compiled: bool = False,
) -> dict[str, float]:
    """Accumulate the loss over packed micro-batches and take one optimizer step.

    Args:
        model, optimizer: The policy (plain or FSDP2-sharded) and its optimizer.
        trajectories, advantages: This rank's slice of the mini-batch, one advantage each.
        settings: Loss choice and coefficients.
        micro_batch_tokens: Token budget of one packed forward pass.
        grad_clip: Global gradient-norm clip.
        logprob_chunk: Tokens per chunk of the vocabulary projection.
        ref_logprobs: Reference-policy logprob rows (next-token layout), needed when `kl_coef > 0`.
        compute_dtype: Autocast dtype (bf16 mixed precision without FSDP), or None.
        compiled: Use the torch.compile'd logprob kernels (see `token_logprobs`).

    Trajectories without model tokens (failed episodes) carry no gradient and are skipped.
    Returns metrics; `skipped` is 1 when no step was taken: `nonfinite` is 1 when that was because
    the loss or gradient norm was not finite (the same decision on every rank), 0 when there was
    nothing to train on.
    """
    keep = [i for i, t in enumerate(trajectories) if t.num_model_tokens > 0]
    trajs = [trajectories[i] for i in keep]
    advs = [advantages[i] for i in keep]
    refs = [ref_logprobs[i] for i in keep] if ref_logprobs is not None else None
    total_tokens, total_seqs = all_reduce_sum([float(sum(t.num_model_tokens for t in trajs)), float(len(trajs))])
    if total_tokens == 0:
        return {"loss": 0.0, "skipped": 1.0, "nonfinite": 0.0, "grad_norm": 0.0, "trained_tokens": 0.0}
    rollout_rows = [shift_to_next_token(list(t.rollout_logprobs), 0.0) for t in trajs]
    old_rows = (rollout_rows if settings.old_logprobs == "rollout" else
                recompute_logprobs(model, trajs, micro_batch_tokens, settings.temperature, logprob_chunk, compute_dtype,
                                   compiled))
    device = next(model.parameters()).device
    world = world_size()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    loss_total = 0.0
    for idx in _plan(trajs, micro_batch_tokens):
        packed = _pack(trajs, idx, device)
        rows = {"mask": [shift_to_next_token(list(trajs[i].loss_mask), 0) for i in idx] or [[0]],
                "old": [old_rows[i] for i in idx] or [[0.0]], "rollout": [rollout_rows[i] for i in idx] or [[0.0]],
                "adv": [[advs[i]] * len(trajs[i].token_ids) for i in idx] or [[0.0]]}
        if refs is not None:
            rows["ref"] = [refs[i] for i in idx] or [[0.0]]
        t = {k: packed.to_padded(packed.pack(v)) for k, v in rows.items()}  # each [S, L]
        with _autocast(device, compute_dtype):
            logp, entropy = token_logprobs(model, packed, settings.temperature, logprob_chunk, compiled=compiled)
        loss, metrics = _micro_loss(settings, packed.to_padded(logp), packed.to_padded(entropy), t,
                                    tokens=total_tokens, share=len(idx) / total_seqs)
        (loss * world).backward()
        loss_total += loss.item()
        mask = t["mask"]
        weight = float(mask.sum()) / total_tokens
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * weight
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    names = sorted(sums)
    reduced = all_reduce_sum([loss_total] + [sums[k] for k in names])
    loss_total, sums = reduced[0], dict(zip(names, reduced[1:]))
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(torch.tensor(loss_total)))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": loss_total, "grad_norm": float(grad_norm), "skipped": 0.0 if finite else 1.0,
            "nonfinite": 0.0 if finite else 1.0, "trained_tokens": float(total_tokens), **sums}


def _micro_loss(s: LossSettings, logp: torch.Tensor, entropy: torch.Tensor, t: dict[str, torch.Tensor], *,
                tokens: float, share: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch, scaled to its part of the mini-batch mean. Tensors are [S, L]."""
    mask, adv = t["mask"], t["adv"]
    metrics: dict[str, float] = {}
    if s.tis != "none":  # correct for the engine sampling from a slightly different distribution
        w, tis_metrics = tis_weights(t["old"], t["rollout"], mask, level=s.tis, cap=s.tis_cap)
        adv = adv * w
        metrics.update(tis_metrics)
    scale = {"loss_scale_tokens": tokens} if s.agg_mode == "token_mean" else {}
    factor = 1.0 if scale else share

    def agg(values: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(values, mask, s.agg_mode, **scale) * factor

    loss, loss_metrics = get_policy_loss(s.policy_loss)(logp, t["old"], adv, mask, agg_mode=s.agg_mode, **scale,
                                                        **_loss_options(s))
    loss = loss * factor
    metrics.update(loss_metrics)
    if s.entropy_coef:
        loss = loss - s.entropy_coef * agg(entropy)
    if s.kl_coef:
        kl = kl_penalty(logp, t["ref"], s.kl_kind)  # [S, L]
        loss = loss + s.kl_coef * agg(kl)
        metrics["kl_ref"] = float(masked_mean(kl.detach(), mask))
    metrics["entropy"] = float(masked_mean(entropy.detach(), mask))
    return loss, metrics
