"""Data parallelism with FSDP2: shard a Hugging Face causal LM per decoder block, and the few
collectives the update needs so that N ranks compute exactly the loss one process would.

`fully_shard` (torch.distributed.fsdp, "FSDP2") turns each decoder block's parameters into DTensors
sharded over the data-parallel ranks; a block's full weights exist only while it runs. The root
module (embeddings, final norm, a tied or untied lm_head) is sharded last. Mixed precision keeps
fp32 master weights and computes in bf16; `cpu_offload` keeps the shards (and the optimizer state)
in host memory.

Without an initialised process group every helper here is the identity, so one CPU process runs
the same code path as a multi-GPU job.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

from agentrl.errors import TrainerError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _reduce(values: list[float], op: str) -> list[float]:
    if not is_distributed():
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sum over ranks (identity in one process)."""
    return _reduce(values, "sum")


def all_reduce_max(values: list[float]) -> list[float]:
    """Elementwise max over ranks (identity in one process)."""
    return _reduce(values, "max")


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF model, found by its `_no_split_modules` class names."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise TrainerError(f"cannot find the decoder blocks of {type(model).__name__} to shard "
                           f"(its _no_split_modules is {sorted(names) or 'empty'})")
    return blocks


def _fsdp_options(mixed_precision: str, cpu_offload: bool, reshard_after_forward: bool, mesh) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    if not dist.is_initialized():
        raise TrainerError("FSDP2 sharding needs an initialised process group (torchrun, or "
                           "torch.distributed.init_process_group in each worker)")
    if mixed_precision not in ("none", "bf16"):
        raise TrainerError(f"mixed_precision must be 'none' or 'bf16', got {mixed_precision!r}")
    options: dict = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        options["mesh"] = mesh
    if mixed_precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    return options


def shard_policy(model: torch.nn.Module, *, mixed_precision: str = "none", cpu_offload: bool = False,
                 reshard_after_forward: bool = True, mesh=None) -> torch.nn.Module:
    """Apply FSDP2 `fully_shard` to every decoder block, then to the root; returns the model.

    Args:
        model: A Hugging Face causal LM with float32 parameters, on the rank's device (or CPU).
        mixed_precision: "bf16" computes in bfloat16 and reduces gradients in float32; "none" keeps
            everything in the parameters' dtype.
        cpu_offload: Keep parameter shards, gradients and optimizer state on the CPU.
        reshard_after_forward: Free the gathered block weights after forward (ZeRO-3); False keeps
            them until backward (ZeRO-2-like, more memory, less communication).
        mesh: A 1-D DeviceMesh; default: all ranks of the default process group.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from agentrl.trainer.actor import token_stats

    options = _fsdp_options(mixed_precision, cpu_offload, reshard_after_forward, mesh)
    for block in decoder_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    # The trainer never calls model.forward (it projects the vocabulary in chunks), so its whole
    # token -> logprob pass is registered as a forward method of the root module instead.
    model.agentrl_token_stats = types.MethodType(token_stats, model)
    register_fsdp_forward_method(model, "agentrl_token_stats")
    return model


def shard_value_model(critic: torch.nn.Module, *, mixed_precision: str = "none", cpu_offload: bool = False,
                      reshard_after_forward: bool = True, mesh=None) -> torch.nn.Module:
    """FSDP2 for a `ValueModel` (`agentrl.trainer.critic`): its backbone's decoder blocks, then the
    root (embeddings, final norm, value head), whose `forward` is the whole packed pass. Options
    as in `shard_policy`."""
    from torch.distributed.fsdp import fully_shard

    options = _fsdp_options(mixed_precision, cpu_offload, reshard_after_forward, mesh)
    for block in decoder_blocks(critic.backbone):
        fully_shard(block, **options)
    fully_shard(critic, **options)
    return critic


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor (gathered over ranks when sharded).

    Collective under FSDP: every rank must call it. The result is identical on all ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_distributed():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))
