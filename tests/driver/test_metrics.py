"""Episode-error summaries: texts shown (not only counted); the stop rule is tested in test_failures.py."""

from __future__ import annotations

import json

import pytest

from agentrl.rollout.trajectory import Trajectory
from agentrl.driver.metrics import MetricsWriter, error_samples, rollout_metrics


def _traj(error: str | None = None, reward: float = 1.0) -> Trajectory:
    return Trajectory(token_ids=(1, 2), loss_mask=(0, 1), rollout_logprobs=(0.0, -1.0), weight_versions=(-1, 0),
                      prompt_length=1, turn_spans=((1, 2),), turn_rewards=(reward,), reward=0.0 if error else reward,
                      env_id="demo-v0", task_id="train-0", split="train", seed=0, group_id=0, num_turns=1,
                      error=error, failure="env_error" if error else None)


def test_error_samples_are_distinct_counted_one_line_each_most_frequent_first():
    trajs = [_traj("EnvError: b"), _traj("KeyError: 'answer'\n  in score()"), _traj(), _traj("EnvError: b"),
             _traj("ValueError: c"), _traj("TimeoutError: d")]
    # "EnvError: b" twice; the rest once each in first-seen order; the newline folds into one line.
    assert error_samples(trajs) == ["2x EnvError: b", "1x KeyError: 'answer' in score()", "1x ValueError: c"]
    assert error_samples([_traj(), _traj()]) == []
    assert rollout_metrics(trajs, 1.0)["episode_errors"] == 5.0


def test_metrics_writer_keeps_error_texts_and_nulls_non_finite_numbers(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "loss": float("nan"), "error_samples": ["1x EnvError: b"]})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None,
                                                                   "error_samples": ["1x EnvError: b"]}
