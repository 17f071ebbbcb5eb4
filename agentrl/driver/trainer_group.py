"""The trainer side on Ray: `cluster.trainer_workers` FSDP2 ranks behind `TrainerSide`'s interface.

`RayTrainerSide` has what the loop uses of `TrainerSide` (`cfg`, `guard`, `loss_settings`, `values`,
`update`, `weights`, `save`, `restore`, `export`); with PPO the critic is sharded over the same ranks.
Each mini-batch (whole groups, as in one process) is dealt out to the ranks by whole groups; the ranks
all-reduce their token counts, so N ranks take the optimizer step one process would
(tests/trainer/test_fsdp.py). Weights for the engines are gathered
from the shards; checkpoints hold the full weights and the optimizer state in the single-process
format (`TrainerWorker.state`), so a run may resume with another number of ranks.

Not built here: LoRA and the KL reference model across ranks (refused by the config), and surviving
a lost trainer rank: FSDP's collectives cannot lose a member, so the run stops with a message to
resume from the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from agentrl.config import Config
from agentrl.driver.cluster import Bundle
from agentrl.driver.resume import NonFiniteGuard, Restored, restore_run, save_run
from agentrl.driver.rollout_side import DTYPES
from agentrl.driver.trainer_side import group_mini_batches, loss_settings
from agentrl.driver.preflight import first_line
from agentrl.errors import ConfigError, TrainerError
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.update import LossSettings


def rank_rows(group_ids: list[int], world: int) -> list[list[int]]:
    """Row indices of each rank: whole groups, dealt out in turn (a rank may get none)."""
    order = list(dict.fromkeys(group_ids))
    mine = [set(order[r::world]) for r in range(world)]
    return [[i for i, g in enumerate(group_ids) if g in mine[r]] for r in range(world)]


class _Held:
    """A state dict held by the driver, standing in for a module, optimizer or scheduler so that
    `save_run` / `restore_run` write and read the same checkpoint as in one process."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class RayTrainerSide:
    """FSDP2 ranks as Ray actors; see the module docstring."""

    def __init__(self, cfg: Config, workers: list, guard: NonFiniteGuard):
        self.cfg, self.workers, self.guard = cfg, workers, guard

    @classmethod
    def open(cls, cfg: Config, path: str, bundles: list[Bundle]) -> RayTrainerSide:
        import ray

        from agentrl.trainer.workers import TrainerWorker

        t, o = cfg.train, cfg.optim
        dtype = torch.float32 if t.mixed_precision == "bf16" else DTYPES[cfg.model.dtype]
        options = dict(dtype=dtype, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                       mixed_precision=t.mixed_precision, micro_batch_tokens=t.micro_batch_tokens,
                       logprob_chunk=t.logprob_chunk, grad_clip=o.grad_clip,
                       gradient_checkpointing=t.gradient_checkpointing, compile=t.compile)
        if cfg.algorithm.advantage == "gae":  # PPO's critic, sharded over the same ranks
            c = cfg.critic
            options["critic"] = dict(path=c.path or path, lr=c.lr, weight_decay=c.weight_decay,
                                     warmup_steps=c.warmup_steps, grad_clip=c.grad_clip, value_clip=c.value_clip)
        try:
            workers = TrainerWorker.group(path, len(bundles), device=cfg.model.device,
                                          bundles=[b.options() for b in bundles],
                                          timeout_s=cfg.cluster.start_timeout_s, **options)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise ConfigError(f"the trainer ranks did not start: {first_line(getattr(exc, 'cause', None) or exc)}; "
                              f"check model.path and cluster.start_timeout_s") from None
        return cls(cfg, workers, NonFiniteGuard(t.max_nonfinite_steps))

    def loss_settings(self, kl_in_loss: bool) -> LossSettings:
        return loss_settings(self.cfg, kl_in_loss)

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        raise TrainerError("the KL reference across trainer ranks is not built; use algorithm.kl_coef=0 or "
                           "cluster.trainer_workers=1")

    def _all(self, method: str, *per_rank_args) -> list:
        """Call `method` on every rank at once (collectives need all of them); a lost rank stops the run."""
        import ray

        calls = [getattr(w, method).remote(*(a[r] for a in per_rank_args)) for r, w in enumerate(self.workers)]
        try:
            return ray.get(calls)
        except ray.exceptions.RayActorError as exc:
            raise TrainerError(f"a trainer rank was lost during {method} ({' '.join(str(exc).split())[:200]}); "
                               "FSDP cannot continue without it: resume from the last checkpoint with --resume") from None

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] the critic's values: each rank values its whole groups, the driver lays them back in place."""
        parts = rank_rows(batch.group_ids.tolist(), len(self.workers))
        out = torch.zeros(batch.token_ids.shape, dtype=torch.float32)
        for rows, values in zip(parts, self._all("values", [batch.rows(rows) for rows in parts])):
            if rows:
                out[rows, :values.shape[1]] = values
        return out

    def update(self, batch: TrainBatch, settings: LossSettings) -> dict[str, float]:
        """One optimizer step per mini-batch, each dealt out to the ranks by whole groups; rank 0's (global) metrics."""
        world = len(self.workers)
        metrics: dict[str, float] = {}
        for idx in group_mini_batches(batch.group_ids.tolist(), self.cfg.train.mini_batches):
            mini = batch.rows(idx)
            parts = [mini.rows(rows) for rows in rank_rows(mini.group_ids.tolist(), world)]
            upd = self._all("update", parts, [settings] * world)[0]
            metrics.update({k: max(v, metrics.get(k, 0.0)) if k == "nonfinite" else v for k, v in upd.items()})
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        """Full weights gathered from the shards (every rank takes part; rank 0's copy is used)."""
        return self._all("full_state_dict")[0]

    def save(self, run_dir: Path, step: int) -> None:
        state = self._all("state")[0]
        critic = tuple(_Held(state["critic"][k]) for k in ("model", "optimizer", "scheduler")) if "critic" in state \
            else None
        save_run(run_dir, self.cfg, step, _Held(state["policy"]), _Held(state["optimizer"]),
                 _Held(state["scheduler"]), self.guard, critic)

    def restore(self, run_dir: Path) -> Restored:
        policy, optimizer, scheduler = _Held(), _Held(), _Held()
        critic = (_Held(), _Held(), _Held()) if self.cfg.algorithm.advantage == "gae" else None
        restored = restore_run(run_dir, self.cfg, policy, optimizer, scheduler, self.guard, critic)
        state = {"policy": policy.state, "optimizer": optimizer.state, "scheduler": scheduler.state}
        if critic is not None:
            state["critic"] = dict(zip(("model", "optimizer", "scheduler"), (h.state for h in critic)))
        self._all("load_state", [state] * len(self.workers))
        return restored

    def export(self, out_dir: Path, tokenizer) -> None:
        """A Hugging Face model directory of the gathered weights (the model is built on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from agentrl.trainer.policy import export_hf

        weights = self.weights()
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.cfg.model.path))
        export_hf(skeleton, tokenizer, out_dir, state_dict=weights)
        if self.cfg.algorithm.advantage == "gae":
            from transformers import AutoModel

            from agentrl.trainer.critic import ValueModel, save_critic

            critic = self._all("critic_state_dict")[0]
            with torch.device("meta"):
                skeleton = ValueModel(AutoModel.from_config(AutoConfig.from_pretrained(self.cfg.critic.path or
                                                                                        self.cfg.model.path)))
            save_critic(skeleton, Path(out_dir) / "critic", state_dict=critic)

    def close(self) -> None:
        import ray

        ray.wait([w.close.remote() for w in self.workers], num_returns=len(self.workers), timeout=10)
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
