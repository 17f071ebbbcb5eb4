"""The critic of PPO: a value model of the policy's architecture, its values and its update.

`ValueModel` is the policy's transformer backbone (a Hugging Face base model such as `Qwen2Model`,
without the language-model head) with a scalar head: for every position it predicts the return
from the state before the next token, so its values line up with the batch's next-token layout
(column j: the state after tokens 0..j, before token j + 1 is sampled). It runs on the trainer's
packed varlen path (`forward_hidden`, the attention of `agentrl.trainer.attention`), shards with
FSDP2 like the policy (`agentrl.trainer.fsdp.shard_value_model`), and is trained by `critic_update`
with the clipped value loss, accumulated over micro-batches and ranks exactly as `policy_update`
accumulates the policy loss. The head is [E -> 1], so there is no vocabulary projection to chunk.

Starting weights: a causal LM directory (the backbone of the policy's checkpoint, or another one
of the same architecture; the head starts at 0, so every first value is 0), or a critic that
`save_critic` wrote (backbone and head). The backbone loads through `AutoModel`, which drops the
language-model head.

Letters: B rows, T their longest, S rows of a micro-batch, L its longest, N packed tokens, E hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentrl.errors import TrainerError
from agentrl.trainer.actor import forward_hidden
from agentrl.trainer.algos import clipped_value_loss
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.fsdp import all_reduce_sum, world_size
from agentrl.trainer.packing import PackedBatch, pack_sequences
from agentrl.trainer.policy import PACKED_CHECK_TOLERANCE, enable_activation_checkpointing
from agentrl.trainer.update import autocast, micro_batch_plan, pack_rows, step_if_finite

HEAD_FILE = "value_head.safetensors"


@dataclass
class Critic:
    """What a PPO run trains and checkpoints beside the policy: the value model, its own optimizer
    and its learning-rate schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def parts(self) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        """(model, optimizer, scheduler), the order checkpoints store them in."""
        return self.model, self.optimizer, self.scheduler


class ValueModel(torch.nn.Module):
    """A transformer backbone and a scalar value head."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        param = next(backbone.parameters())
        self.value_head = torch.nn.Linear(hidden, 1, dtype=param.dtype, device=param.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, packed: PackedBatch) -> torch.Tensor:
        """[N] float32 value of the state before each next token of the packed sequences."""
        hidden = forward_hidden(self.backbone, packed)  # [N, E]
        return self.value_head(hidden).squeeze(-1).float()


def load_critic(path: str, *, dtype: torch.dtype, device: str, attn_implementation: str,
                gradient_checkpointing: bool = False) -> ValueModel:
    """A `ValueModel` from a causal LM directory (head at 0) or a saved critic (head loaded).

    Refuses a directory whose backbone weights do not all load (another architecture, a
    truncated file), and a model whose packed forward differs from its own per-sequence forward.
    """
    from transformers import AutoModel

    backbone, info = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                               output_loading_info=True)
    if info["missing_keys"]:
        raise TrainerError(f"critic weights in {path!r} lack {len(info['missing_keys'])} backbone tensors (e.g. "
                           f"{sorted(info['missing_keys'])[0]!r}); critic.path must hold a model of the policy's "
                           "architecture (a causal LM directory or a critic agentrl saved)")
    if gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    critic = ValueModel(backbone)
    head = Path(path) / HEAD_FILE
    if head.is_file():
        from safetensors.torch import load_file

        critic.value_head.load_state_dict({k: v.to(dtype) for k, v in load_file(head).items()})
    critic = critic.to(device)
    if attn_implementation == "agentrl_varlen":
        check_packed_values(critic)
    return critic.eval()


def save_critic(critic: ValueModel, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a critic `load_critic` (and so `critic.path`) reads: the backbone as a Hugging Face model
    directory and the head beside it. `state_dict` (full, `ValueModel` names) is used when given."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = state_dict if state_dict is not None else critic.state_dict()
    backbone = {k.removeprefix("backbone."): v.detach().cpu().contiguous() for k, v in state.items()
                if k.startswith("backbone.")}
    critic.backbone.save_pretrained(out, state_dict=backbone)
    save_file({k.removeprefix("value_head."): v.detach().cpu().contiguous() for k, v in state.items()
               if k.startswith("value_head.")}, str(out / HEAD_FILE))
    return out


@torch.no_grad()
def check_packed_values(critic: ValueModel, lengths: tuple[int, ...] = (11, 6)) -> float:
    """The packed values of two short random sequences against the backbone's own eager forward of
    each alone (as `check_packed_forward` checks the policy); the largest difference, or TrainerError."""
    device = next(critic.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = critic.backbone.get_input_embeddings().weight.shape[0]
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    packed = critic(pack_sequences(seqs, device=device))  # [N]
    implementation = critic.config._attn_implementation
    critic.backbone.set_attn_implementation("eager")
    try:
        worst, offset = 0.0, 0
        for s in seqs:
            hidden = critic.backbone(input_ids=torch.tensor([s], device=device)).last_hidden_state[0]
            want = critic.value_head(hidden).squeeze(-1).float()
            worst = max(worst, (packed[offset:offset + len(s)] - want).abs().max().item())
            offset += len(s)
    finally:
        critic.backbone.set_attn_implementation(implementation)
    tol = PACKED_CHECK_TOLERANCE.get(next(critic.parameters()).dtype, 0.25)
    if not worst <= tol:
        raise TrainerError(f"the critic's packed forward differs from transformers' own by {worst:.3g} (tolerance "
                           f"{tol:g}); its family is not one agentrl's trainer supports (docs/architectures.md)")
    return worst


@torch.no_grad()
def compute_values(critic: torch.nn.Module, batch: TrainBatch, micro_batch_tokens: int,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, T] float32 the critic's value before every next token, 0 off the model's tokens.

    Collective under FSDP2: every rank calls it with its own rows (the same number of passes each)."""
    device = next(critic.parameters()).device
    out = torch.zeros(batch.token_ids.shape, dtype=torch.float32)
    for idx in micro_batch_plan(batch, micro_batch_tokens):
        packed = pack_rows(batch, idx, device)
        with autocast(device, compute_dtype):
            values = critic(packed)  # [N]
        if idx:
            out[idx, :packed.max_seqlen] = packed.to_padded(values.float()).cpu()
    return torch.where(batch.mask > 0, out, 0.0)


def critic_update(critic: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, *, clip: float,
                  micro_batch_tokens: int, grad_clip: float, compute_dtype: torch.dtype | None = None
                  ) -> dict[str, float]:
    """One optimizer step of the critic on the clipped value loss over the batch's model tokens.

    Args:
        critic, optimizer: The value model (plain or FSDP2-sharded) and its optimizer.
        batch: This rank's rows of the mini-batch, with `values` (those the returns were computed
            with) and `returns` filled (`agentrl.trainer.update.compute_gae`).
        clip: Value clip range (`clipped_value_loss`).
        micro_batch_tokens: Token budget of one packed forward pass.
        grad_clip: Global gradient-norm clip.
        compute_dtype: Autocast dtype, or None.

    The loss is the token mean over the whole mini-batch (over all ranks): each micro-batch divides
    by the global token count, and under FSDP each rank's loss is multiplied by the world size, since
    FSDP averages gradients. Returns `critic/*` metrics; `critic/nonfinite` 1 means the step was
    skipped for a non-finite loss or gradient norm (the same decision on every rank).
    """
    if batch.values is None or batch.returns is None:
        raise TrainerError("critic_update needs the batch's values and returns; fill them with compute_gae")
    batch = batch.rows(batch.trained_rows())
    total = all_reduce_sum([float(batch.num_model_tokens)])[0]
    if total == 0:
        return {"critic/loss": 0.0, "critic/skipped": 1.0, "critic/nonfinite": 0.0, "critic/grad_norm": 0.0}
    device = next(critic.parameters()).device
    world = world_size()
    critic.train()
    optimizer.zero_grad(set_to_none=True)
    loss_total, sums = 0.0, {}
    for idx in micro_batch_plan(batch, micro_batch_tokens):
        packed = pack_rows(batch, idx, device)
        with autocast(device, compute_dtype):
            values = packed.to_padded(critic(packed))  # [S, L]
        rows = batch.rows(idx) if idx else None
        t = ({k: getattr(rows, k).to(device) for k in ("mask", "values", "returns")} if rows is not None else
             {k: torch.zeros(1, 1, device=device) for k in ("mask", "values", "returns")})
        loss, metrics = clipped_value_loss(values, t["values"], t["returns"], t["mask"], clip=clip,
                                           loss_scale_tokens=total)
        (loss * world).backward()
        loss_total += loss.item()
        weight = float(t["mask"].sum()) / total
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * weight
    loss_total, sums, grad_norm, finite = step_if_finite(critic, optimizer, grad_clip, loss_total, sums)
    return {"critic/loss": loss_total, "critic/grad_norm": float(grad_norm), "critic/skipped": float(not finite),
            "critic/nonfinite": float(not finite), **{f"critic/{k}": v for k, v in sums.items()}}
