"""Tests of agentrl/trainer/batch.py (`TrainBatch`; named apart from tests/driver/test_batch.py, as pytest needs):
next-token layout of the per-token fields, row selection."""

import torch

from agentrl.trainer.batch import TrainBatch


def _batch() -> TrainBatch:
    # Row 0: prompt 2 tokens, turn 0 (tokens 2-3), observation (4), turn 1 (tokens 5-6); reward 1 after
    # turn 0 (on token 3) and 2 after turn 1 (on token 6). Row 1: prompt 1 token, one turn (tokens 1-2).
    return TrainBatch.from_rows(
        [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7]], [[0, 0, 1, 1, 0, 1, 1], [0, 1, 1]],
        [[0.0] * 7, [0.0] * 3], [[-1, -1, 0, 0, -1, 0, 0], [-1, 0, 0]], [3.0, 0.5], [4, 4],
        token_rewards=[[0, 0, 0, 1.0, 0, 0, 2.0], [0, 0, 0.5]], turn_index=[[-1, -1, 0, 0, -1, 1, 1], [-1, 0, 0]])


def test_per_token_fields_are_shifted_to_next_token_layout():
    b = _batch()
    # Column j holds token j + 1: the mask [0,0,1,1,0,1,1] becomes [0,1,1,0,1,1,0].
    assert b.mask[0].tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert b.token_rewards[0].tolist() == [0, 0, 1.0, 0, 0, 2.0, 0]
    assert b.turn_index[0].tolist() == [-1, 0, 0, -1, 1, 1, -1]
    assert b.token_rewards[1].tolist() == [0, 0.5, 0, 0, 0, 0, 0] and b.turn_index[1].tolist()[:3] == [0, 0, -1]


def test_defaults_and_row_selection_keep_fields_aligned():
    b = TrainBatch.from_rows([[1, 2, 3]], [[0, 1, 1]], [[0.0] * 3], [[-1, 0, 0]], [1.0], [0])
    assert b.token_rewards.abs().sum() == 0 and b.turn_index[0].tolist() == [0, 0, -1]  # one turn by default
    full = _batch()
    full = full.with_(values=torch.arange(14.0).view(2, 7), returns=-torch.arange(14.0).view(2, 7))
    one = full.rows([1])
    assert one.token_ids.shape == (1, 3)  # trimmed to the row's length
    assert one.values[0].tolist() == [7.0, 8.0, 9.0] and one.returns[0].tolist() == [-7.0, -8.0, -9.0]
    assert one.token_rewards[0].tolist() == [0, 0.5, 0] and one.ref_logprobs is None
