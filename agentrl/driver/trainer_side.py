"""The trainer side of a run: the policy being trained, its optimizer and schedule, the reference
model of the KL term, PPO's critic (its value model, optimizer and schedule), and the guard that
stops a run whose updates keep going non-finite.

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
from agentrl.errors import TrainerError
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.critic import Critic, compute_values, critic_update, load_critic, save_critic
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
    critic: Critic | None = None  # PPO's value model (algorithm.advantage: gae)

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
        critic = open_critic(cfg, cfg.critic.path or path, train_dtype) if cfg.algorithm.advantage == "gae" else None
        return cls(cfg, policy, optimizer, scheduler, ref, NonFiniteGuard(t.max_nonfinite_steps), critic)

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

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] the critic's values of the batch (before this step's update)."""
        if self.critic is None:
            raise TrainerError("this run has no critic; values are for algorithm.advantage=gae")
        t = self.cfg.train
        return compute_values(self.critic.model, batch, t.micro_batch_tokens, _compute_dtype(t))

    def update(self, batch: TrainBatch, settings: LossSettings) -> dict[str, float]:
        """One optimizer step per mini-batch (whole groups stay together), of the policy and, when the
        batch carries returns, of the critic; the last step's metrics (`nonfinite` if either was)."""
        t = self.cfg.train
        compute = _compute_dtype(t)
        metrics: dict[str, float] = {}
        batch = batch.rows(batch.trained_rows())  # rows kept with zero loss must not make mini-batches of their own
        for idx in group_mini_batches(batch.group_ids.tolist(), t.mini_batches):
            mini = batch.rows(idx)
            upd = policy_update(self.policy, self.optimizer, mini, settings,
                                micro_batch_tokens=t.micro_batch_tokens, grad_clip=self.cfg.optim.grad_clip,
                                logprob_chunk=t.logprob_chunk, compute_dtype=compute, compiled=t.compile)
            self.scheduler.step()
            if self.critic is not None and mini.returns is not None:
                c = self.cfg.critic
                upd |= critic_update(self.critic.model, self.critic.optimizer, mini, clip=c.value_clip,
                                     micro_batch_tokens=t.micro_batch_tokens, grad_clip=c.grad_clip,
                                     compute_dtype=compute)
                self.critic.scheduler.step()
                upd["nonfinite"] = max(upd["nonfinite"], upd["critic/nonfinite"])
            metrics.update({k: max(v, metrics.get(k, 0.0)) if k == "nonfinite" else v for k, v in upd.items()})
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        """Full weights under plain Hugging Face names (LoRA merged), for the engines."""
        return merged_state_dict(self.policy)

    def save(self, run_dir: Path, step: int) -> None:
        save_run(run_dir, self.cfg, step, self.policy, self.optimizer, self.scheduler, self.guard,
                 self.critic.parts() if self.critic else None)

    def restore(self, run_dir: Path) -> Restored:
        return restore_run(run_dir, self.cfg, self.policy, self.optimizer, self.scheduler, self.guard,
                           self.critic.parts() if self.critic else None)

    def export(self, out_dir: Path, tokenizer) -> None:
        """The policy as a Hugging Face model directory; a critic beside it in `out_dir/critic` (what
        `critic.path` reads)."""
        export_hf(self.policy, tokenizer, out_dir)
        if self.critic is not None:
            save_critic(self.critic.model, Path(out_dir) / "critic")


def _compute_dtype(t) -> torch.dtype | None:
    return torch.bfloat16 if t.mixed_precision == "bf16" else None


def open_critic(cfg: Config, path: str, dtype: torch.dtype) -> Critic:
    """PPO's value model from `path` (the policy's starting weights unless critic.path says), with
    its own AdamW and warmup schedule."""
    c, t = cfg.critic, cfg.train
    where = "critic.path" if cfg.critic.path else "model.path"
    with reported(f"cannot load the critic from {where} {path!r}", "point critic.path at a causal LM directory of "
                  "the policy's architecture, or at a critic a run exported (RUN_DIR/final/critic)"):
        model = load_critic(path, dtype=dtype, device=cfg.model.device, attn_implementation=register_varlen_attention(),
                            gradient_checkpointing=t.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=cfg.optim.betas, weight_decay=c.weight_decay,
                                  fused=torch.device(cfg.model.device).type == "cuda")
    return Critic(model, optimizer, linear_warmup(optimizer, c.warmup_steps))


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
