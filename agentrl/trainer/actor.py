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
    cu = packed.cu_seqlens
    out = model.base_model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=packed.max_seqlen,
        max_length_k=packed.max_seqlen,
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


def token_logprobs(
    model: torch.nn.Module, packed: PackedBatch, temperature: float = 1.0, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of each next token and the entropy of each next-token distribution.

    Returns:
        (logprobs [N], entropy [N]) in float32; position j scores token j+1 of its own sequence.
        The last position of every sequence (no next token) holds 0 in both.
    """
    hidden = forward_hidden(model, packed)
    targets, valid = packed.next_token_targets()
    head = model.get_output_embeddings()
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_stats, h, t, head.weight, head.bias, inv_t, use_reentrant=False))
        else:
            parts.append(_chunk_stats(h, t, head.weight, head.bias, inv_t))
    stats = torch.cat(parts, dim=1).masked_fill(~valid, 0.0)  # [2, N]
    return stats[0], stats[1]


def shift_to_next_token(row: list[float] | list[int], fill: float | int = 0) -> list:
    """Re-index a per-token row so position j holds the value of token j+1 (matching `token_logprobs`)."""
    return list(row[1:]) + [fill]
