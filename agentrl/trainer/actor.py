"""Per-token logprobs (and entropy) of packed sequences, with the vocabulary projection in chunks.

Letters: N packed tokens, E hidden size, V vocabulary, C chunk size.
The [N, V] logits never exist at once: each chunk of C hidden states is projected, turned into
float32 logprobs and reduced to one number per token, and under autograd the chunk is recomputed in
the backward pass (activation checkpointing) instead of being stored.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from agentrl.trainer.packing import PackedBatch


def forward_hidden(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Final hidden states of a packed batch: [N, E]."""
    return _hidden(model, packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)


def _hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
            cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """[N, E] final hidden states (a peft wrapper is looked through)."""
    causal_lm = model.get_base_model() if hasattr(model, "peft_config") else model
    out = causal_lm.base_model(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=max_seqlen,
        max_length_k=max_seqlen,
        use_cache=False,
    )
    return out.last_hidden_state[0]


def _chunk_stats(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 inv_temperature: float) -> torch.Tensor:
    """hidden [C, E], targets [C] -> stacked (logprob [C], entropy [C])."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() * inv_temperature  # [C, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.stack([logp, entropy])


def token_stats(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, targets: torch.Tensor, inv_temperature: float,
                chunk_size: int) -> torch.Tensor:
    """Stacked (logprob [N], entropy [N]) of the next tokens `targets` [N]: the whole forward pass.

    One function from token ids to per-token numbers, so that FSDP2 can treat it as the root
    module's forward (see `agentrl.trainer.fsdp.shard_policy`): the root's parameters (embeddings,
    final norm, lm_head) are gathered around it and their gradients reduced after backward.
    """
    hidden = _hidden(model, input_ids, position_ids, cu_seqlens, max_seqlen)  # [N, E]
    head = model.get_output_embeddings()
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_stats, h, t, head.weight, head.bias, inv_temperature, use_reentrant=False))
        else:
            parts.append(_chunk_stats(h, t, head.weight, head.bias, inv_temperature))
    return torch.cat(parts, dim=1)  # [2, N]


def token_logprobs(
    model: torch.nn.Module, packed: PackedBatch, temperature: float = 1.0, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of each next token and the entropy of each next-token distribution.

    Returns:
        (logprobs [N], entropy [N]) in float32; position j scores token j+1 of its own sequence.
        The last position of every sequence (no next token) holds 0 in both.
    """
    targets, valid = packed.next_token_targets()
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    run = getattr(model, "agentrl_token_stats", None)  # set on FSDP2-sharded policies
    args = (packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen, targets, inv_t, chunk_size)
    stats = run(*args) if run is not None else token_stats(model, *args)
    stats = stats.masked_fill(~valid, 0.0)  # [2, N]
    return stats[0], stats[1]


def shift_to_next_token(row: list[float] | list[int], fill: float | int = 0) -> list:
    """Re-index a per-token row so position j holds the value of token j+1 (matching `token_logprobs`)."""
    return list(row[1:]) + [fill]
