"""Policy update: GRPO advantages by hand, and a short real training run that changes the weights."""

from __future__ import annotations

import math

import pytest
import torch

from agentrl.config import load_config
from agentrl.rollout.trajectory import Trajectory
from agentrl.driver.loop import _mini_batches, train
from agentrl.trainer.update import outcome_advantages


def _traj(reward: float, group: int) -> Trajectory:
    return Trajectory(token_ids=(1, 2, 3), loss_mask=(0, 1, 1), rollout_logprobs=(0.0, -1.0, -1.0),
                      weight_versions=(-1, 0, 0), prompt_length=1, turn_spans=((1, 3),), turn_rewards=(reward,),
                      reward=reward, env_id="x", task_id="t", split="train", seed=0, group_id=group, num_turns=1)


def test_grpo_outcome_advantages_by_hand():
    # Group 0 rewards [1, 0, 0]: mean 1/3, unbiased std sqrt(((2/3)^2 + 2*(1/3)^2) / 2) = sqrt(1/3) = 0.57735.
    #   advantages: (2/3)/0.57735 = 1.1547, (-1/3)/0.57735 = -0.57735 (twice).
    # Group 1 rewards [1, 1, 1]: all equal, std 0 -> advantages 0 (no learning signal, no NaN).
    trajs = [_traj(1, 0), _traj(0, 0), _traj(0, 0), _traj(1, 1), _traj(1, 1), _traj(1, 1)]
    adv = outcome_advantages(trajs, "grpo")
    expect = [1.1547, -0.57735, -0.57735, 0.0, 0.0, 0.0]
    assert adv == pytest.approx(expect, abs=1e-4)
    # Without std normalisation (Dr. GRPO): plain centring, 2/3 and -1/3.
    assert outcome_advantages(trajs[:3], "dr_grpo") == pytest.approx([2 / 3, -1 / 3, -1 / 3], abs=1e-6)


def test_mini_batches_keep_groups_together():
    assert _mini_batches(6, 2, 3) == [[0, 1, 2], [3, 4, 5]]
    assert _mini_batches(8, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert _mini_batches(4, 10, 2) == [[0, 1], [2, 3]]


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
