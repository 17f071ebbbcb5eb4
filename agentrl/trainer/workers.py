"""Trainer ranks as Ray actors: one `TrainerWorker` per rank, FSDP2 across them.

The driver creates `world_size` workers, hands each its rows of a `TrainBatch` (whole GRPO groups), and
calls `update` on all of them at once; the workers form a torch.distributed process group among
themselves (gloo on CPU, NCCL on GPUs), so the update is the same one `torchrun` would run.

Example:
    >>> workers = TrainerWorker.group(model_path="runs/tiny", world_size=2)          # doctest: +SKIP
    >>> metrics = ray.get([w.update.remote(batch.rows(rows), settings) for w, rows in zip(workers, slices)])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import torch

from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.update import LossSettings, policy_update


class _Worker:
    """One rank: a sharded policy and its optimizer (wrapped as a Ray actor by `TrainerWorker`)."""

    def __init__(self, rank: int, world_size: int, master: str, model_path: str, *, device: str = "cpu",
                 lr: float = 1e-5, optimizer: str = "adamw", mixed_precision: str = "none",
                 micro_batch_tokens: int = 8192, logprob_chunk: int = 2048, grad_clip: float = 1.0):
        from transformers import AutoModelForCausalLM

        from agentrl.trainer.attention import register_varlen_attention
        from agentrl.trainer.fsdp import shard_policy

        addr, port = master.rsplit(":", 1)
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world_size))
        if device == "cuda":  # Ray gives each actor one GPU; it is device 0 inside the actor
            torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                     attn_implementation=register_varlen_attention())
        self.model = shard_policy(model.to(device), mixed_precision=mixed_precision)
        params = self.model.parameters()
        self.optimizer = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr))
        self.options = {"micro_batch_tokens": micro_batch_tokens, "logprob_chunk": logprob_chunk,
                        "grad_clip": grad_clip}

    def update(self, batch: TrainBatch, settings: LossSettings) -> dict[str, float]:
        """One optimizer step on this rank's rows (collective: every rank must call it)."""
        return policy_update(self.model, self.optimizer, batch, settings, **self.options)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered full weights (collective); plain HF names, CPU tensors."""
        from agentrl.trainer.fsdp import full_state_dict

        return full_state_dict(self.model)

    def close(self) -> None:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainerWorker:
    """Factory of Ray actors running `_Worker`."""

    @staticmethod
    def group(model_path: str, world_size: int, *, device: str = "cpu", **options) -> list:
        """Start `world_size` workers (one CPU, or one GPU, each) forming one process group."""
        import ray

        actor = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0)(_Worker)
        master = f"127.0.0.1:{_free_port()}"
        return [actor.remote(rank, world_size, master, model_path, device=device, **options)
                for rank in range(world_size)]
