"""Policy update: GRPO advantages by hand, and a short real training run that changes the weights."""

from __future__ import annotations

import math

import pytest
import torch

from agentrl.config import load_config
from agentrl.driver.loop import train
from agentrl.driver.trainer_side import group_mini_batches
from agentrl.trainer.batch import TrainBatch
from agentrl.trainer.update import compute_advantages, compute_gae


def _batch(rewards: list[float], groups: list[int], masks: list[tuple[int, ...]] | None = None) -> TrainBatch:
    masks = masks or [(0, 1, 1)] * len(rewards)
    return TrainBatch.from_rows([(1,) * len(m) for m in masks], masks, [(0.0,) * len(m) for m in masks],
                                [(0,) * len(m) for m in masks], rewards, groups)


def test_grpo_outcome_advantages_by_hand():
    # Group 0 rewards [1, 0, 0]: mean 1/3, unbiased std sqrt(((2/3)^2 + 2*(1/3)^2) / 2) = sqrt(1/3) = 0.57735.
    #   advantages: (2/3)/0.57735 = 1.1547, (-1/3)/0.57735 = -0.57735 (twice).
    # Group 1 rewards [1, 1, 1]: all equal, std 0 -> advantages 0 (no learning signal, no NaN).
    batch = compute_advantages(_batch([1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]), "grpo")
    expect = torch.tensor([1.1547, -0.57735, -0.57735, 0.0, 0.0, 0.0])
    # Tokens (0, 1, 1) in next-token layout: the model's two tokens sit in columns 0 and 1; column 2 has none.
    torch.testing.assert_close(batch.advantages[:, 0], expect, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.advantages[:, 1], expect, atol=1e-4, rtol=0)
    assert batch.advantages[:, 2].abs().sum() == 0
    # Without std normalisation (Dr. GRPO): plain centring, 2/3 and -1/3.
    dr = compute_advantages(_batch([1, 0, 0], [0, 0, 0]), "dr_grpo")
    torch.testing.assert_close(dr.advantages[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3]), atol=1e-6, rtol=0)


def test_token_weighted_estimators_see_the_real_token_mask():
    """REINFORCE++ whitens over tokens, so a row with more model tokens weighs more. Rows [1, 0] in
    one group with 3 and 1 model tokens: centred scores 0.5 and -0.5; over the 4 masked tokens the
    mean is (3 * 0.5 - 0.5) / 4 = 0.25 and the unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5, so
    the whitened values are (0.5 - 0.25) / 0.5 = 0.5 and (-0.5 - 0.25) / 0.5 = -1.5. (With one mask
    cell per row, as the estimator used to get, both would be +-0.707.)"""
    batch = compute_advantages(_batch([1.0, 0.0], [0, 0], [(0, 1, 1, 1), (0, 1, 0, 0)]), "reinforce_pp")
    torch.testing.assert_close(batch.advantages[0, :3], torch.full((3,), 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.advantages[1, :1], torch.tensor([-1.5]), atol=1e-5, rtol=0)
    assert batch.advantages[1, 1:].abs().sum() == 0


def test_train_batch_packs_its_rows_without_padding():
    batch = _batch([0.0, 1.0, 0.5], [0, 0, 1], [(0, 1), (0, 0, 1, 1, 1), (0, 1, 1)])
    assert batch.token_ids.shape == (3, 5) and batch.lengths.tolist() == [2, 5, 3]
    packed = batch.packed([0, 2], "cpu")
    assert packed.cu_seqlens.tolist() == [0, 2, 5] and packed.position_ids[0].tolist() == [0, 1, 0, 1, 2]
    sub = batch.rows([2, 1])
    assert sub.token_ids.shape == (2, 5) and sub.group_ids.tolist() == [1, 0]
    assert batch.rows([0]).mask.tolist() == [[1.0, 0.0]]


def test_mini_batches_keep_groups_together():
    assert group_mini_batches([0, 0, 0, 1, 1, 1], 2) == [[0, 1, 2], [3, 4, 5]]
    assert group_mini_batches([0, 0, 1, 1, 2, 2, 3, 3], 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert group_mini_batches([0, 0, 1, 1], 10) == [[0, 1], [2, 3]]


def test_two_step_training_changes_parameters(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", "env.id=calculator-v0", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=4", "rollout.max_tokens_per_turn=16", "rollout.max_total_tokens=256",
        "rollout.max_turns=2", "train.steps=2", "optim.lr=1e-3", "eval.num_tasks=4", f"run_dir={tmp_path}",
        # Random rewards would often give all-equal groups (zero advantage): dr_grpo without std keeps it
        # simple, and the entropy bonus guarantees a gradient even when every group is uniform.
        "algorithm.entropy_coef=0.01",
    ])
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    result = train(cfg)
    assert len(result["history"]) == 2
    for m in result["history"]:
        assert math.isfinite(m["loss"]) and m["skipped"] == 0.0 and m["trained_tokens"] > 0
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # eval before, two steps, eval after
    assert "before" in result and "after" in result


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_over_a_multi_turn_batch_matches_the_slow_reference(gamma, lam):
    """compute_gae on hand-made multi-turn rows (observation tokens between turns, a turn cut short,
    rewards on each turn's last token) equals the token-by-token forward sum in token layout."""
    from credit_reference import multi_turn_batch, slow_gae_row, to_next_token, token_layout_rewards

    batch, masks = multi_turn_batch()
    gen = torch.Generator().manual_seed(7)
    values = [torch.randn(len(m), generator=gen).tolist() for m in masks]  # V of the state before token i
    out = compute_gae(batch, to_next_token(values, batch.token_ids.shape[1]).float(), gamma, lam, whiten=False)
    rewards = token_layout_rewards(batch, masks)
    ref = [slow_gae_row(r, m, v, gamma, lam) for r, m, v in zip(rewards, masks, values)]
    width = batch.token_ids.shape[1]
    torch.testing.assert_close(out.advantages, to_next_token([a for a, _ in ref], width).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.returns, to_next_token([r for _, r in ref], width).float(), atol=1e-5, rtol=1e-5)
    assert (out.values[batch.mask == 0] == 0).all() and (out.returns[batch.mask == 0] == 0).all()
    # Rewards sit where the turns end: row 0's turn 0 is tokens 3..5, so its reward is token 5's.
    assert rewards[0][5] == 0.5 and rewards[0][9] == -1.0 and rewards[0][14] == 2.0 and sum(rewards[2]) == 0.0
    whitened = compute_gae(batch, to_next_token(values, width).float(), gamma, lam, whiten=True).advantages
    m = batch.mask > 0
    assert abs(float(whitened[m].mean())) < 1e-5 and float(whitened[m].std()) == pytest.approx(1.0, abs=1e-4)
