"""Packing variable-length sequences into padding-free micro-batches.

Letters: S sequences in a micro-batch, N = total tokens of the micro-batch, L = longest sequence.
A `PackedBatch` lays its sequences end to end in one row ([1, N]); `cu_seqlens` ([S + 1]) marks
where each starts and position ids restart at 0 for each, so attention kernels keep sequences apart
and no padding token is ever computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentrl.errors import TrainerError


def pack_by_token_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group sequence indices into bins of at most `budget` tokens (first-fit decreasing).

    A sequence longer than the budget gets a bin of its own. Bins come back in a deterministic
    order and indices within a bin in ascending order.

    Example:
        >>> pack_by_token_budget([5, 3, 4, 2], budget=7)
        [[0, 3], [1, 2]]
    """
    if budget <= 0:
        raise TrainerError(f"token budget must be positive, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class PackedBatch:
    """Sequences laid end to end.

    Attributes:
        input_ids: [1, N] token ids.
        position_ids: [1, N], restarting at 0 for every sequence.
        cu_seqlens: [S + 1] int32 offsets of sequence starts (and the total).
        max_seqlen: L, the longest sequence.
        seq_index: [N] which sequence each token belongs to (0..S-1).
        pos_in_seq: [N] position of each token inside its sequence.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_index: torch.Tensor
    pos_in_seq: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0] - 1)

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, self.seq_index.to(device), self.pos_in_seq.to(device))

    def pack(self, rows: Sequence[Sequence[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Lay per-token values of each sequence end to end: [N]."""
        return torch.tensor([v for r in rows for v in r], dtype=dtype, device=self.input_ids.device)

    def to_padded(self, flat: torch.Tensor) -> torch.Tensor:
        """Scatter a per-token tensor [N] into [S, L] (zeros where a sequence is shorter)."""
        out = flat.new_zeros((self.num_seqs, self.max_seqlen))
        return out.index_put((self.seq_index, self.pos_in_seq), flat)

    def next_token_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets [N], valid [N]): the token after each position inside its own sequence.

        The last position of every sequence has no next token: `valid` is False there.
        """
        ids = self.input_ids[0]
        targets = torch.roll(ids, -1)
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[self.cu_seqlens[1:].long() - 1] = False
        return targets.masked_fill(~valid, 0), valid


def pack_sequences(sequences: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> PackedBatch:
    """Build a `PackedBatch` from token-id lists."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise TrainerError("cannot pack an empty sequence")
    lengths = [len(s) for s in sequences]
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    seq_index = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long).unsqueeze(0)
    return PackedBatch(ids, pos.unsqueeze(0), cu, max(lengths), seq_index, pos).to(device)
