"""Slow, obviously-right references for credit assignment, in token layout (value i belongs to token i),
shared by tests/trainer/test_update.py and tests/trainer/test_critic.py.

Unlike `agentrl.trainer.algos.gae` (a backward recursion over next-token columns that steps over
masked ones) these list a row's model tokens and sum each advantage forwards, term by term.
"""

from __future__ import annotations

import torch

from agentrl.trainer.batch import TrainBatch


def slow_gae_row(rewards: list[float], mask: list[int], values: list[float], gamma: float,
                 lam: float) -> tuple[list[float], list[float]]:
    """GAE over the model tokens of one row: A_i = sum_{j >= i} (gamma lam)^(j - i) delta_j with
    delta_j = r_j + gamma V_{j+1} - V_j, where j + 1 is the *next model token* (observation tokens
    in between are not steps) and V after the last model token is 0. Returns (advantages, returns)
    per token, 0 off the mask."""
    pos = [i for i, m in enumerate(mask) if m]
    deltas = []
    for n, p in enumerate(pos):
        nxt = values[pos[n + 1]] if n + 1 < len(pos) else 0.0
        deltas.append(rewards[p] + gamma * nxt - values[p])
    adv, ret = [0.0] * len(mask), [0.0] * len(mask)
    for n, p in enumerate(pos):
        adv[p] = sum((gamma * lam) ** (m - n) * deltas[m] for m in range(n, len(pos)))
        ret[p] = adv[p] + values[p]
    return adv, ret


def to_next_token(rows: list[list[float]], width: int) -> torch.Tensor:
    """Token layout -> the batch's next-token layout: column j holds token j + 1's value. [B, width]."""
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for b, row in enumerate(rows):
        out[b, :len(row) - 1] = torch.tensor(row[1:], dtype=torch.float64)
    return out


def multi_turn_batch() -> tuple[TrainBatch, list[list[int]]]:
    """Hand-made multi-turn rows (token layout) in two groups; returns the batch and the token-layout masks.

    Row 0: prompt 3, turn 0 (3 tokens, reward 0.5), observation 2, turn 1 (2 tokens, reward -1),
           observation 1, turn 2 (4 tokens, reward 2).
    Row 1: prompt 2, turn 0 (2 tokens, reward 1): one turn.
    Row 2: prompt 3, turn 0 (1 token, reward 0), observation 3, turn 1 (3 tokens, no reward: cut short).
    Row 3: prompt 1, turn 0 (2 tokens, reward -0.5), observation 1, turn 1 (1 token, reward 3).
    """
    layouts = [
        [("p", 3), (0, 3, 0.5), ("o", 2), (1, 2, -1.0), ("o", 1), (2, 4, 2.0)],
        [("p", 2), (0, 2, 1.0)],
        [("p", 3), (0, 1, 0.0), ("o", 3), (1, 3, None)],
        [("p", 1), (0, 2, -0.5), ("o", 1), (1, 1, 3.0)],
    ]
    ids, masks, rewards, turns = [], [], [], []
    for row, layout in enumerate(layouts):
        m, r, k = [], [], []
        for part in layout:
            if part[0] in ("p", "o"):
                m += [0] * part[1]
                r += [0.0] * part[1]
                k += [-1] * part[1]
            else:
                turn, n, reward = part
                m += [1] * n
                r += [0.0] * (n - 1) + [reward or 0.0]
                k += [turn] * n
        ids.append([3 + (i * 7 + row * 13) % 50 for i in range(len(m))])
        masks.append(m)
        rewards.append(r)
        turns.append(k)
    batch = TrainBatch.from_rows(ids, masks, [[0.0] * len(m) for m in masks], [[0] * len(m) for m in masks],
                                 [sum(r) for r in rewards], [0, 0, 1, 1], token_rewards=rewards, turn_index=turns)
    return batch, masks


def token_layout_rewards(batch: TrainBatch, masks: list[list[int]]) -> list[list[float]]:
    """The batch's token rewards back in token layout (token i = column i - 1; token 0 has none)."""
    return [[0.0] + batch.token_rewards[b, :len(m) - 1].tolist() for b, m in enumerate(masks)]
