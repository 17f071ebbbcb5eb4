"""Trainer ranks as Ray actors: one `TrainerWorker` per rank, FSDP2 across them.

The driver creates `world_size` workers, hands each its rows of a `TrainBatch` (whole GRPO groups), and
calls `update` on all of them at once; the workers form a torch.distributed process group among
themselves (gloo on CPU, NCCL on GPUs), so the update is the same one `torchrun` would run. Rank 0
picks the rendezvous address on its own node, so the ranks may sit on several nodes.

With PPO (`critic=...`) each rank also holds its shard of the critic (`shard_value_model`), values its
own rows and takes the critic's step in `update`, after the policy's.

Checkpoints stay in the single-process format: `state()` gathers the full weights and the full
optimizer state (the critic's too) and renumbers the optimizer's entries the way `torch.optim` numbers them in one
process (parameter order), so a run saved with N ranks resumes with one, and the other way round.

Example:
    >>> workers = TrainerWorker.group(model_path="runs/tiny", world_size=2)          # doctest: +SKIP
    >>> metrics = ray.get([w.update.remote(batch.rows(rows), settings) for w, rows in zip(workers, slices)])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.policy import enable_activation_checkpointing
from agentrl.trainer.update import LossSettings, policy_update


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of every trainer: linear warmup over `warmup_steps` optimizer steps, then flat."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warmup_steps + 1)))


class _Worker:
    """One rank: a sharded policy, its optimizer and schedule (wrapped as a Ray actor by `TrainerWorker`)."""

    def __init__(self, rank: int, world_size: int, model_path: str, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, lr: float = 1e-5, optimizer: str = "adamw",
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, warmup_steps: int = 0,
                 mixed_precision: str = "none", micro_batch_tokens: int = 8192, logprob_chunk: int = 2048,
                 grad_clip: float = 1.0, gradient_checkpointing: bool = False, compile: bool = False,
                 critic: dict[str, Any] | None = None):
        self.rank, self.world_size, self.model_path, self.device = rank, world_size, model_path, device
        # PPO's critic on the same ranks: {"path", "lr", "weight_decay", "warmup_steps", "grad_clip", "value_clip"}
        self.critic_options = critic
        self.critic = None
        self.dtype, self.mixed_precision, self.compile = dtype, mixed_precision, compile
        self.gradient_checkpointing = gradient_checkpointing
        self.optim = {"kind": optimizer, "lr": lr, "betas": betas, "weight_decay": weight_decay,
                      "warmup_steps": warmup_steps}
        self.options = {"micro_batch_tokens": micro_batch_tokens, "logprob_chunk": logprob_chunk,
                        "grad_clip": grad_clip, "compiled": compile}

    def address(self) -> str:
        """A rendezvous address on this worker's node (rank 0's answer is the group's)."""
        host = _node_ip()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def join(self, master: str) -> None:
        """Join the process group at `master`, load and shard the policy (collective: every rank must call it)."""
        from transformers import AutoModelForCausalLM

        from agentrl.trainer.attention import register_varlen_attention
        from agentrl.trainer.fsdp import shard_policy
        from agentrl.trainer.policy import compile_blocks

        addr, port = master.rsplit(":", 1)
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(self.rank), WORLD_SIZE=str(self.world_size))
        if self.device == "cuda":  # Ray gives each actor one GPU; it is device 0 inside the actor
            torch.cuda.set_device(0)
        backend = "nccl" if self.device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world_size)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype,
                                                     attn_implementation=register_varlen_attention())
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if self.compile:
            compile_blocks(model)
        self.model = shard_policy(model.to(self.device), mixed_precision=self.mixed_precision)
        o, params = self.optim, list(self.model.parameters())
        self.optimizer = (torch.optim.SGD(params, lr=o["lr"]) if o["kind"] == "sgd" else
                          torch.optim.AdamW(params, lr=o["lr"], betas=o["betas"], weight_decay=o["weight_decay"]))
        self.scheduler = linear_warmup(self.optimizer, o["warmup_steps"])
        if self.critic_options is not None:
            self._join_critic()

    def _join_critic(self) -> None:
        """Load and shard PPO's critic on this rank (collective), with its own AdamW and schedule."""
        from agentrl.trainer.attention import register_varlen_attention
        from agentrl.trainer.critic import Critic, load_critic
        from agentrl.trainer.fsdp import shard_value_model

        c = self.critic_options
        model = load_critic(c["path"], dtype=self.dtype, device=self.device,
                            attn_implementation=register_varlen_attention(),
                            gradient_checkpointing=self.gradient_checkpointing)
        model = shard_value_model(model, mixed_precision=self.mixed_precision)
        optimizer = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=self.optim["betas"],
                                      weight_decay=c["weight_decay"])
        self.critic = Critic(model, optimizer, linear_warmup(optimizer, c["warmup_steps"]))

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] the critic's values of this rank's rows (collective)."""
        from agentrl.trainer.critic import compute_values

        return compute_values(self.critic.model, batch, self.options["micro_batch_tokens"])

    def update(self, batch: TrainBatch, settings: LossSettings) -> dict[str, float]:
        """One optimizer step on this rank's rows (collective: every rank must call it), and one of the
        critic when the batch carries returns; global metrics."""
        metrics = policy_update(self.model, self.optimizer, batch, settings, **self.options)
        self.scheduler.step()
        if self.critic is not None and batch.returns is not None:
            from agentrl.trainer.critic import critic_update

            c = self.critic_options
            metrics |= critic_update(self.critic.model, self.critic.optimizer, batch, clip=c["value_clip"],
                                     micro_batch_tokens=self.options["micro_batch_tokens"], grad_clip=c["grad_clip"])
            self.critic.scheduler.step()
            metrics["nonfinite"] = max(metrics["nonfinite"], metrics["critic/nonfinite"])
        return metrics

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered full weights (collective); plain HF names, CPU tensors."""
        from agentrl.trainer.fsdp import full_state_dict

        return full_state_dict(self.model)

    def state(self) -> dict[str, Any] | None:
        """Full weights, optimizer state (single-process numbering) and schedule (collective); rank 0 returns
        them, the other ranks None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from agentrl.trainer.fsdp import full_state_dict

        policy = self.full_state_dict()
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        if self.critic is not None:
            m = self.critic.model
            critic_weights = full_state_dict(m)
            critic_optim = get_optimizer_state_dict(m, self.critic.optimizer, options=full)
        if self.rank != 0:  # the full states were gathered on rank 0 only
            return None
        state = {"policy": policy, "optimizer": _numbered(optim, _names(self.model)),
                 "scheduler": self.scheduler.state_dict()}
        if self.critic is not None:
            state["critic"] = {"model": critic_weights, "optimizer": _numbered(critic_optim, _names(m)),
                               "scheduler": self.critic.scheduler.state_dict()}
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Load what `state()` returned (or a single-process checkpoint's) on every rank (collective)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["policy"], options=full)
        set_optimizer_state_dict(self.model, self.optimizer, _named(state["optimizer"], _names(self.model)),
                                 options=full)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic is not None:
            c, m = state["critic"], self.critic.model
            set_model_state_dict(m, c["model"], options=full)
            set_optimizer_state_dict(m, self.critic.optimizer, _named(c["optimizer"], _names(m)), options=full)
            self.critic.scheduler.load_state_dict(c["scheduler"])

    def critic_state_dict(self) -> dict[str, torch.Tensor]:
        """The critic's gathered full weights (collective); `ValueModel` names, CPU tensors."""
        from agentrl.trainer.fsdp import full_state_dict

        return full_state_dict(self.critic.model)

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def _numbered(optim: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's) in torch.optim's own numbering."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in optim["param_groups"]]
    return {"state": {index[n]: v for n, v in optim["state"].items()}, "param_groups": groups}


def _named(optim: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `_numbered`."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in optim["state"].items()}, "param_groups": groups}


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


class TrainerWorker:
    """Factory of Ray actors running `_Worker`."""

    @staticmethod
    def group(model_path: str, world_size: int, *, device: str = "cpu", bundles: list[dict] | None = None,
              timeout_s: float = 600.0, **options) -> list:
        """Start `world_size` ranks forming one process group; returns the actors once all have loaded.

        Args:
            model_path: The starting weights.
            world_size: Ranks.
            device: `cpu` (gloo) or `cuda` (NCCL, one GPU per rank).
            bundles: Ray actor options per rank (placement; see `agentrl.driver.cluster`); default one
                CPU (or GPU) each, anywhere.
            timeout_s: How long loading may take.
            options: `_Worker` keyword arguments (optimizer, schedule, micro-batch budget, ...).
        """
        import ray

        placed = bundles or [{"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}] * world_size
        actor = ray.remote(_Worker)
        workers = [actor.options(**placed[rank]).remote(rank, world_size, model_path, device=device, **options)
                   for rank in range(world_size)]
        try:
            master = ray.get(workers[0].address.remote(), timeout=timeout_s)
            ray.get([w.join.remote(master) for w in workers], timeout=timeout_s)
        except BaseException:  # one rank failed to load or join: none is left behind
            for w in workers:
                ray.kill(w, no_restart=True)
            raise
        return workers
