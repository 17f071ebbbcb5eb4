"""Failed episodes in the training loop: dropped from the update (never trained as a zero reward),
counted, and their texts kept; `hostile-flaky-v0` fails one task seed in four inside `step`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from agentrl.config import load_config
from agentrl.driver.collect import collect
from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.trainer_side import group_mini_batches

_spec = importlib.util.spec_from_file_location("agentrl_test_run_cli_hostile",
                                               Path(__file__).resolve().parents[1] / "run_cli_hostile.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


def test_failed_episodes_are_dropped_from_training_and_shown(stopping_model_dir, tmp_path):
    cfg = load_config(None, [
        f"model.path={stopping_model_dir}", "env.id=hostile-flaky-v0", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2", "rollout.max_tokens_per_turn=16", "rollout.max_turns=1",
        "rollout.max_total_tokens=64", "eval.num_tasks=0", f"run_dir={tmp_path}"])
    session = RolloutSide.open(cfg, splits=[(cfg.env.train_split, "env.train_split")])
    failed_steps = 0
    for step in range(6):
        kept, metrics = collect(session, step)
        # Before this rule, an episode whose env step raised kept its model tokens and was trained with reward 0.
        # An env error drops its whole group (failures.policy.env_error defaults to drop_group): the group's
        # other episode, which ended before the env's scorer ran, does not train alone.
        assert all(t.failure is None for t in kept)
        assert metrics["failures/env_error"] == metrics["episode_errors"]
        assert metrics["trained_episodes"] == len(kept) == 8 - 2 * metrics["failures/dropped_groups"]
        assert metrics["failures/dropped_groups"] <= metrics["episode_errors"]
        assert metrics["failures/retried"] == metrics["failures/dropped"] == 0  # env errors are not retried
        if metrics["episode_errors"]:
            failed_steps += 1
            assert all(s.split("x ", 1)[1].startswith("TimeoutError: scorer timed out on task")
                       for s in metrics["error_samples"])
    assert failed_steps > 0  # a task seed divisible by 4 came up (the step numbers fix the seeds)
    session.close()


def test_mini_batches_keep_groups_of_any_size_together():
    # groups 0 (2 episodes), 1 (1, the others failed), 2 (3): alternate groups into 2 mini-batches
    assert group_mini_batches([0, 0, 1, 2, 2, 2], 2) == [[0, 1, 3, 4, 5], [2]]
    assert group_mini_batches([], 3) == [[]]
