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


# Per-token fields ([B, T]) that are always present, and those that may be None.
_TOKEN_FIELDS = ("token_ids", "mask", "rollout_logprobs", "weight_versions", "advantages", "token_rewards",
                 "turn_index")
_OPTIONAL_TOKEN_FIELDS = ("ref_logprobs", "values", "returns")
_ROW_FIELDS = ("lengths", "scores", "group_ids")


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
        token_rewards: [B, T] float32 rewards where they happened: each turn's env reward (minus any
            tool-error penalty) on the turn's last model token, 0 elsewhere (default: all 0).
        turn_index: [B, T] int64 the model turn (0, 1, ...) each next token belongs to, -1 off the
            mask (default: 0 on the mask, one turn per row).
        ref_logprobs: [B, T] float32 a reference policy's logprobs, when a KL term needs them.
        values: [B, T] float32 the critic's value of the state before each next token, when a
            critic is trained (0 off the mask).
        returns: [B, T] float32 the critic's regression targets (GAE's returns), with `values`.
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
    token_rewards: torch.Tensor = field(default=None)  # type: ignore[assignment]
    turn_index: torch.Tensor = field(default=None)  # type: ignore[assignment]
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __post_init__(self):
        if self.advantages is None:
            object.__setattr__(self, "advantages", torch.zeros_like(self.mask))
        if self.token_rewards is None:
            object.__setattr__(self, "token_rewards", torch.zeros_like(self.mask))
        if self.turn_index is None:
            object.__setattr__(self, "turn_index", torch.where(self.mask > 0, 0, -1).long())
        B, T = self.token_ids.shape
        for name in _TOKEN_FIELDS + _OPTIONAL_TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (B, T):
                raise ValueError(f"TrainBatch.{name} is {tuple(value.shape)}, expected [{B}, {T}]")
        for name in _ROW_FIELDS:
            if tuple(getattr(self, name).shape) != (B,):
                raise ValueError(f"TrainBatch.{name} is {tuple(getattr(self, name).shape)}, expected [{B}]")

    @classmethod
    def from_rows(cls, token_ids: Sequence[Sequence[int]], loss_mask: Sequence[Sequence[int]],
                  rollout_logprobs: Sequence[Sequence[float]], weight_versions: Sequence[Sequence[int]],
                  scores: Sequence[float], group_ids: Sequence[int],
                  token_rewards: Sequence[Sequence[float]] | None = None,
                  turn_index: Sequence[Sequence[int]] | None = None) -> TrainBatch:
        """Rows of per-token values in token layout (value i belongs to token i), shifted here to
        next-token layout and padded. `token_rewards` and `turn_index` default as the attributes do."""
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
                   group_ids=torch.tensor(list(group_ids), dtype=torch.long),
                   token_rewards=padded(token_rewards, torch.float32, True) if token_rewards is not None else None,
                   turn_index=padded(turn_index, torch.long, True, -1) if turn_index is not None else None)

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
        cut = {name: None if getattr(self, name) is None else getattr(self, name)[idx, :width]
               for name in _TOKEN_FIELDS + _OPTIONAL_TOKEN_FIELDS}
        return replace(self, **{name: getattr(self, name)[idx] for name in _ROW_FIELDS}, **cut)

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
        return replace(self, **{name: None if getattr(self, name) is None else getattr(self, name).to(device)
                                 for name in _TOKEN_FIELDS + _OPTIONAL_TOKEN_FIELDS + _ROW_FIELDS})
