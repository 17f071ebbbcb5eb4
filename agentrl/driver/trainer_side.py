"""The trainer side of a run: the policy being trained, its optimizer and schedule, the reference
model of the KL term, and the guard that stops a run whose updates keep going non-finite.

It takes `TrainBatch`es and gives weights; it never sees an env, an engine or a trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentrl.config import Config
from agentrl.driver.preflight import reported
from agentrl.driver.resume import NonFiniteGuard, Restored, restore_run, save_run
from agentrl.driver.rollout_side import DTYPES
from agentrl.trainer.attention import register_varlen_attention
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.policy import compile_blocks, export_hf, load_policy, merged_state_dict
from agentrl.trainer.update import LossSettings, policy_update, recompute_logprobs
from agentrl.trainer.workers import linear_warmup


@dataclass
class TrainerSide:
    """The policy and everything that changes it."""

    cfg: Config
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ref: torch.nn.Module | None
    guard: NonFiniteGuard

    @classmethod
    def open(cls, cfg: Config, path: str) -> TrainerSide:
        lora, t = cfg.model.lora, cfg.train
        train_dtype = torch.float32 if t.mixed_precision == "bf16" else DTYPES[cfg.model.dtype]
        fix = "check that model.path holds a complete Hugging Face causal LM, saved with save_pretrained"
        with reported(f"cannot load the model in model.path {path!r} for training", fix):
            policy = load_policy(path, dtype=train_dtype, device=cfg.model.device,
                                 attn_implementation=register_varlen_attention(), lora_rank=lora.rank,
                                 lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_targets=lora.target_modules,
                                 gradient_checkpointing=t.gradient_checkpointing)
        if t.compile:
            compile_blocks(policy)
        o = cfg.optim
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=o.lr, betas=o.betas,
                                      weight_decay=o.weight_decay, fused=torch.device(cfg.model.device).type == "cuda")
        scheduler = linear_warmup(optimizer, o.warmup_steps)
        ref = None
        if cfg.algorithm.kl_coef > 0 and lora.rank == 0:  # with LoRA the reference is the model without adapters
            ref = load_policy(path, dtype=DTYPES[cfg.model.dtype], device=cfg.model.device,
                              attn_implementation=register_varlen_attention()).requires_grad_(False)
        return cls(cfg, policy, optimizer, scheduler, ref, NonFiniteGuard(t.max_nonfinite_steps))

    def loss_settings(self, kl_in_loss: bool) -> LossSettings:
        return loss_settings(self.cfg, kl_in_loss)

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] logprobs of the starting policy (LoRA: the same model with its adapters switched off)."""
        t, r = self.cfg.train, self.cfg.rollout
        temp = r.temperature if r.temperature > 0 else 1.0
        if self.ref is None:
            with self.policy.disable_adapter():
                return recompute_logprobs(self.policy, batch, t.micro_batch_tokens, temp, t.logprob_chunk)
        return recompute_logprobs(self.ref, batch, t.micro_batch_tokens, temp, t.logprob_chunk)

    def update(self, batch: TrainBatch, settings: LossSettings) -> dict[str, float]:
        """One optimizer step per mini-batch (whole groups stay together); the last step's metrics."""
        t = self.cfg.train
        compute = torch.bfloat16 if t.mixed_precision == "bf16" else None
        metrics: dict[str, float] = {}
        batch = batch.rows(batch.trained_rows())  # rows kept with zero loss must not make mini-batches of their own
        for idx in group_mini_batches(batch.group_ids.tolist(), t.mini_batches):
            upd = policy_update(self.policy, self.optimizer, batch.rows(idx), settings,
                                micro_batch_tokens=t.micro_batch_tokens, grad_clip=self.cfg.optim.grad_clip,
                                logprob_chunk=t.logprob_chunk, compute_dtype=compute, compiled=t.compile)
            self.scheduler.step()
            metrics.update({k: max(v, metrics.get(k, 0.0)) if k == "nonfinite" else v for k, v in upd.items()})
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        """Full weights under plain Hugging Face names (LoRA merged), for the engines."""
        return merged_state_dict(self.policy)

    def save(self, run_dir: Path, step: int) -> None:
        save_run(run_dir, self.cfg, step, self.policy, self.optimizer, self.scheduler, self.guard)

    def restore(self, run_dir: Path) -> Restored:
        return restore_run(run_dir, self.cfg, self.policy, self.optimizer, self.scheduler, self.guard)

    def export(self, out_dir: Path, tokenizer) -> None:
        export_hf(self.policy, tokenizer, out_dir)


def loss_settings(cfg: Config, kl_in_loss: bool) -> LossSettings:
    """The policy loss's settings from the config (the KL term only when it is part of the loss)."""
    a, r = cfg.algorithm, cfg.rollout
    return LossSettings(a.policy_loss, a.agg_mode, a.clip_low, a.clip_high, a.entropy_coef,
                        temperature=r.temperature if r.temperature > 0 else 1.0, old_logprobs=a.old_logprobs,
                        kl_coef=a.kl_coef if kl_in_loss else 0.0, kl_kind=a.kl_kind, tis=a.tis, tis_cap=a.tis_cap)


def group_mini_batches(group_ids: list[int], k: int) -> list[list[int]]:
    """Split rows into k mini-batches by group id (groups stay together; groups may differ in
    size once failed episodes are dropped)."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    order = list(groups.values())
    k = max(1, min(k, len(order)))
    return [[i for g in order[j::k] for i in g] for j in range(k)]
