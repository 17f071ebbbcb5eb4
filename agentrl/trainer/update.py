"""One policy update from a step's `TrainBatch`: advantages, packing, loss, optimizer step.

Letters: B rows of the batch, T its longest row, S rows in a micro-batch, L the longest of them,
N packed tokens. Gradients of all micro-batches are accumulated so that the loss is exactly the
mean over the whole mini-batch (token-mean: divided by the mini-batch's total model tokens;
sequence modes: weighted by each micro-batch's share of sequences). Under data parallelism every
rank holds a slice of the rows; counts are summed over ranks first, each rank's loss is
multiplied by the world size (FSDP averages gradients), and every rank runs the same number of
forward passes (an empty slot runs a one-token dummy with zero weight), so N ranks compute the
gradient one process would.

The batch stays tensors from the driver to the loss: micro-batches are packed from its rows and
their per-token values are its [S, L] slices, never rebuilt from Python lists.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from agentrl.trainer.actor import token_logprobs
from agentrl.trainer.algos import (aggregate_loss, gae, get_advantage_estimator, get_policy_loss, kl_penalty,
                                   masked_mean, masked_whiten, tis_weights, turn_rloo)
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.fsdp import all_reduce_max, all_reduce_sum, world_size
from agentrl.trainer.packing import PackedBatch, pack_sequences


def compute_advantages(batch: TrainBatch, estimator: str, **options) -> TrainBatch:
    """The batch with `advantages` [B, T] filled by a registered estimator from its scores, groups
    and real token mask (token-weighted estimators such as `reinforce_pp` see every model token)."""
    fn = get_advantage_estimator(estimator)
    return batch.with_(advantages=fn(batch.scores, batch.mask, batch.group_ids, **options).float())


def compute_gae(batch: TrainBatch, values: torch.Tensor, gamma: float, lam: float, whiten: bool = True) -> TrainBatch:
    """The batch with GAE's `advantages` and `returns` over its model tokens, from its `token_rewards`
    and the critic's `values` [B, T] (kept on the batch: the value loss clips against them).
    Observation tokens are skipped (see `gae`); `whiten` normalises the advantages over the batch."""
    values = torch.where(batch.mask > 0, values.float(), 0.0)  # [B, T]
    adv, returns = gae(batch.token_rewards, values, batch.mask, gamma=gamma, lam=lam)
    if whiten:
        adv = masked_whiten(adv, batch.mask)
    return batch.with_(advantages=adv, values=values, returns=returns)


def compute_turn_advantages(batch: TrainBatch, gamma: float, norm_by_std: bool) -> TrainBatch:
    """The batch with per-turn leave-one-out advantages (`turn_rloo`) from its token rewards and turns."""
    return batch.with_(advantages=turn_rloo(batch.token_rewards, batch.mask, batch.turn_index, batch.group_ids,
                                            gamma=gamma, norm_by_std=norm_by_std))


def token_kl_penalty(batch: TrainBatch, ref_logprobs: torch.Tensor, kind: str, coef: float) -> TrainBatch:
    """The batch with `coef` x the per-token KL to the reference ([B, T]) taken off its token rewards
    (the KL-in-reward of estimators that read rewards per token)."""
    kl = kl_penalty(batch.rollout_logprobs, ref_logprobs, kind) * batch.mask  # [B, T]
    return batch.with_(token_rewards=batch.token_rewards - coef * kl)


def episode_kl(batch: TrainBatch, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """[B] per row, the summed KL estimate between the sampling policy (rollout logprobs) and the
    reference ([B, T], next-token layout) over the model's tokens."""
    return (kl_penalty(batch.rollout_logprobs, ref_logprobs, kind) * batch.mask).sum(1)


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


def micro_batch_plan(batch: TrainBatch, budget: int) -> list[list[int]]:
    """Micro-batches by token budget, padded with empty slots to the largest count over ranks."""
    plan = batch.plan(budget) if batch.num_rows else []
    slots = int(all_reduce_max([float(len(plan))])[0])
    return plan + [[] for _ in range(slots - len(plan))]


def pack_rows(batch: TrainBatch, idx: list[int], device) -> PackedBatch:
    """The rows `idx` packed on `device`; an empty slot packs a one-token dummy (every rank runs each pass)."""
    return batch.packed(idx, device) if idx else pack_sequences([[0]], device=device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type, or nothing when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def recompute_logprobs(model, batch: TrainBatch, micro_batch_tokens: int, temperature: float, chunk: int,
                       compute_dtype: torch.dtype | None = None, compiled: bool = False) -> torch.Tensor:
    """[B, T] logprob of every next token under `model`'s current weights (0 past each row's end)."""
    device = next(model.parameters()).device
    out = torch.zeros(batch.token_ids.shape, dtype=torch.float32)
    for idx in micro_batch_plan(batch, micro_batch_tokens):
        packed = pack_rows(batch, idx, device)
        with autocast(device, compute_dtype):
            logp, _ = token_logprobs(model, packed, temperature, chunk, compiled=compiled)
        if idx:
            out[idx, :packed.max_seqlen] = packed.to_padded(logp.float()).cpu()
    return out


_DUMMY = {"mask": 0.0, "old": 0.0, "rollout": 0.0, "adv": 0.0, "ref": 0.0}


def _slices(batch: TrainBatch, idx: list[int], old: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The micro-batch's per-token tensors, each [S, L] (one zero cell for an empty slot)."""
    if not idx:
        return {k: torch.zeros(1, 1, device=device) for k in _DUMMY if k != "ref" or batch.ref_logprobs is not None}
    rows = batch.rows(idx)
    width = int(rows.lengths.max())
    t = {"mask": rows.mask, "rollout": rows.rollout_logprobs, "adv": rows.advantages, "old": old[idx, :width]}
    if rows.ref_logprobs is not None:
        t["ref"] = rows.ref_logprobs
    return {k: v.to(device) for k, v in t.items()}


def policy_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, settings: LossSettings, *,
    micro_batch_tokens: int, grad_clip: float, logprob_chunk: int = 2048,
    compute_dtype: torch.dtype | None = None, compiled: bool = False,
) -> dict[str, float]:
    """Accumulate the loss over packed micro-batches and take one optimizer step.

    Args:
        model, optimizer: The policy (plain or FSDP2-sharded) and its optimizer.
        batch: This rank's rows of the mini-batch, advantages filled (`compute_advantages`), and
            `ref_logprobs` when `settings.kl_coef > 0`.
        settings: Loss choice and coefficients.
        micro_batch_tokens: Token budget of one packed forward pass.
        grad_clip: Global gradient-norm clip.
        logprob_chunk: Tokens per chunk of the vocabulary projection.
        compute_dtype: Autocast dtype (bf16 mixed precision without FSDP), or None.
        compiled: Use the torch.compile'd logprob kernels (see `token_logprobs`).

    Rows without model tokens carry no gradient and are skipped. Returns metrics; `skipped` is 1
    when no step was taken: `nonfinite` is 1 when that was because the loss or gradient norm was
    not finite (the same decision on every rank), 0 when there was nothing to train on.
    """
    batch = batch.rows(batch.trained_rows())
    total_tokens, total_seqs = all_reduce_sum([float(batch.num_model_tokens), float(batch.num_rows)])
    if total_tokens == 0:
        return {"loss": 0.0, "skipped": 1.0, "nonfinite": 0.0, "grad_norm": 0.0, "trained_tokens": 0.0}
    old = (batch.rollout_logprobs if settings.old_logprobs == "rollout" else
           recompute_logprobs(model, batch, micro_batch_tokens, settings.temperature, logprob_chunk, compute_dtype,
                              compiled))
    device = next(model.parameters()).device
    world = world_size()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    loss_total = 0.0
    for idx in micro_batch_plan(batch, micro_batch_tokens):
        packed = pack_rows(batch, idx, device)
        t = _slices(batch, idx, old, device)  # each [S, L]
        with autocast(device, compute_dtype):
            logp, entropy = token_logprobs(model, packed, settings.temperature, logprob_chunk, compiled=compiled)
        loss, metrics = _micro_loss(settings, packed.to_padded(logp), packed.to_padded(entropy), t,
                                    tokens=total_tokens, share=len(idx) / total_seqs)
        (loss * world).backward()
        loss_total += loss.item()
        weight = float(t["mask"].sum()) / total_tokens
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * weight
    loss_total, sums, grad_norm, finite = step_if_finite(model, optimizer, grad_clip, loss_total, sums)
    return {"loss": loss_total, "grad_norm": float(grad_norm), "skipped": 0.0 if finite else 1.0,
            "nonfinite": 0.0 if finite else 1.0, "trained_tokens": float(total_tokens), **sums}


def step_if_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, loss_total: float,
                   sums: dict[str, float]) -> tuple[float, dict[str, float], float, bool]:
    """After the micro-batches' backward passes: clip, sum loss and metrics over ranks, and step only when the loss
    and the gradient norm are finite (the same decision on every rank). Returns (loss, metrics, grad norm, finite)."""
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
    return loss_total, sums, float(grad_norm), finite


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
