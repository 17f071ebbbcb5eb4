"""`TrainBatch`: one step's training data as tensors, built once and kept as tensors to the loss.

The trainer never sees a `Trajectory`: the driver turns a step's episodes into this batch (see
`agentrl.driver.batch`), advantage estimators fill its `advantages` from the real token mask, and
the update packs micro-batches from its rows. Every per-token tensor is in next-token layout, the
layout of the logprobs the trainer computes: column j of a row holds the value of token j + 1, so
`mask[b, j]` says whether token j + 1 was sampled by the model, and the last column of every row
(no next token) is 0.

Letters: B rows (episodes), T the longest row, S rows of one micro-batch, L its longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from agentrl.trainer.packing import PackedBatch, pack_by_token_budget


@dataclass(frozen=True)
class TrainBatch:
    """A step's rows, padded to T.

    Attributes:
        token_ids: [B, T] int64 token ids (0 past a row's length).
        lengths: [B] int64 tokens of each row.
        mask: [B, T] float32, 1 where the next token was sampled by the model (it is trained on).
        rollout_logprobs: [B, T] float32 the engine's logprob of each next token (0 off the mask).
        weight_versions: [B, T] int64 policy version that sampled each next token (-1 off the mask).
        scores: [B] float32 the score each row's advantage is computed from (its reward, or the
            reward minus a KL penalty).
        group_ids: [B] int64 rows of the same task share one (GRPO groups).
        advantages: [B, T] float32 per-token advantages (zeros until an estimator fills them).
        ref_logprobs: [B, T] float32 a reference policy's logprobs, when a KL term needs them.
    """

    token_ids: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    weight_versions: torch.Tensor
    scores: torch.Tensor
    group_ids: torch.Tensor
    advantages: torch.Tensor = field(default=None)  # type: ignore[assignment]
    ref_logprobs: torch.Tensor | None = None

    def __post_init__(self):
        if self.advantages is None:
            object.__setattr__(self, "advantages", torch.zeros_like(self.mask))
        B, T = self.token_ids.shape
        for name in ("mask", "rollout_logprobs", "weight_versions", "advantages"):
            if tuple(getattr(self, name).shape) != (B, T):
                raise ValueError(f"TrainBatch.{name} is {tuple(getattr(self, name).shape)}, expected [{B}, {T}]")
        for name in ("lengths", "scores", "group_ids"):
            if tuple(getattr(self, name).shape) != (B,):
                raise ValueError(f"TrainBatch.{name} is {tuple(getattr(self, name).shape)}, expected [{B}]")

    @classmethod
    def from_rows(cls, token_ids: Sequence[Sequence[int]], loss_mask: Sequence[Sequence[int]],
                  rollout_logprobs: Sequence[Sequence[float]], weight_versions: Sequence[Sequence[int]],
                  scores: Sequence[float], group_ids: Sequence[int]) -> TrainBatch:
        """Rows of per-token values in token layout (value i belongs to token i), shifted here to
        next-token layout and padded."""
        lengths = [len(r) for r in token_ids]
        B, T = len(lengths), max(lengths, default=1)

        def padded(rows, dtype, shift: bool, fill=0) -> torch.Tensor:
            out = torch.full((B, T), fill, dtype=dtype)
            for b, row in enumerate(rows):
                values = list(row[1:]) if shift else list(row)
                if values:
                    out[b, :len(values)] = torch.tensor(values, dtype=dtype)
            return out

        return cls(token_ids=padded(token_ids, torch.long, False), lengths=torch.tensor(lengths, dtype=torch.long),
                   mask=padded(loss_mask, torch.float32, True), rollout_logprobs=padded(rollout_logprobs, torch.float32, True),
                   weight_versions=padded(weight_versions, torch.long, True, -1),
                   scores=torch.tensor(list(scores), dtype=torch.float32),
                   group_ids=torch.tensor(list(group_ids), dtype=torch.long))

    @property
    def num_rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_model_tokens(self) -> int:
        return int(self.mask.sum())

    def rows(self, index: Sequence[int] | torch.Tensor) -> TrainBatch:
        """The sub-batch of the given rows (padding trimmed to their longest row)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        width = max(int(self.lengths[idx].max()) if idx.numel() else 1, 1)
        cut = {name: getattr(self, name)[idx, :width] for name in
               ("token_ids", "mask", "rollout_logprobs", "weight_versions", "advantages")}
        ref = self.ref_logprobs[idx, :width] if self.ref_logprobs is not None else None
        return replace(self, lengths=self.lengths[idx], scores=self.scores[idx], group_ids=self.group_ids[idx],
                       ref_logprobs=ref, **cut)

    def with_(self, **changes) -> TrainBatch:
        return replace(self, **changes)

    def trained_rows(self) -> list[int]:
        """Rows with at least one model token (a row without any carries no gradient)."""
        return torch.nonzero(self.mask.sum(1) > 0).flatten().tolist()

    def plan(self, budget: int) -> list[list[int]]:
        """Row indices of micro-batches of at most `budget` tokens each (first-fit decreasing)."""
        return pack_by_token_budget(self.lengths.tolist(), budget)

    def packed(self, index: Sequence[int], device: torch.device | str) -> PackedBatch:
        """The rows `index`, laid end to end without padding, on `device`."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        lengths = self.lengths[idx]
        width = int(lengths.max())
        valid = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # [S, L]
        ids = self.token_ids[idx, :width][valid]  # [N]
        cu = torch.zeros(len(idx) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        seq_index = torch.repeat_interleave(torch.arange(len(idx)), lengths)
        pos = torch.arange(width).expand(len(idx), width)[valid]
        return PackedBatch(ids.unsqueeze(0), pos.unsqueeze(0), cu, width, seq_index, pos).to(device)

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {name: getattr(self, name).to(device) for name in
                 ("token_ids", "lengths", "mask", "rollout_logprobs", "weight_versions", "scores", "group_ids",
                  "advantages")}
        ref = self.ref_logprobs.to(device) if self.ref_logprobs is not None else None
        return replace(self, ref_logprobs=ref, **moved)
