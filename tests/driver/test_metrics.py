"""Batch metrics: episode-error summaries (texts shown, not only counted; the stop rule is tested in
test_failures.py), per-episode means against totals, the rollout's engine/env split, trainer throughput, and the
staleness histogram, each against values worked out by hand."""

from __future__ import annotations

import time

import pytest
import torch

from agentrl.config import load_config
from agentrl.driver.collect import collect
from agentrl.driver.metrics import (
    error_samples,
    rollout_metrics,
    staleness_metrics,
    trainer_metrics,
)
from agentrl.driver.rollout_side import RolloutSide
from agentrl.envs import Env, Message, register
from agentrl.envs.registration import ENVS
from agentrl.errors import TrainerError
from agentrl.rollout.engine_meter import EngineUse
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.batch import TrainBatch


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


def _episode(model_tokens: int, reward: float, turns: int, tool_calls: int, tool_errors: dict[str, int],
             truncation: str | None = None, error: str | None = None) -> Trajectory:
    n = 2 + model_tokens  # two prompt tokens, then the model's
    return Trajectory(token_ids=tuple(range(n)), loss_mask=(0, 0) + (1,) * model_tokens,
                      rollout_logprobs=(0.0,) * n, weight_versions=(-1, -1) + (0,) * model_tokens, prompt_length=2,
                      turn_spans=((2, n),), turn_rewards=(reward,), reward=0.0 if error else reward, env_id="demo-v0",
                      task_id="train-0", split="train", seed=0, group_id=0, num_turns=turns, truncation=truncation,
                      error=error, tool_errors=tool_errors, tool_calls=tool_calls,
                      failure="env_error" if error else None)


def test_means_are_per_episode_and_counts_are_totals():
    trajs = [_episode(4, 1.0, 2, 3, {"parse": 1}), _episode(2, 0.0, 1, 1, {"parse": 2, "timeout": 1}, "max_turns"),
             _episode(0, 0.5, 3, 0, {}, "error", error="EnvError: x")]
    m = rollout_metrics(trajs, seconds=2.0)
    # Means over the 3 played episodes (the failed one included, with reward 0):
    assert m["reward_mean"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert m["success_rate"] == pytest.approx(1 / 3)  # only the first has reward > 0 and no error
    assert m["turns_mean"] == pytest.approx((2 + 1 + 3) / 3)
    assert m["response_tokens_mean"] == pytest.approx((4 + 2 + 0) / 3)
    assert m["tool_calls_mean"] == pytest.approx((3 + 1 + 0) / 3)
    # Totals over the step:
    assert (m["episodes"], m["episode_errors"], m["tool_errors"]) == (3.0, 1.0, 4.0)
    assert (m["tool_errors/parse"], m["tool_errors/timeout"]) == (3.0, 1.0)
    assert (m["truncated/max_turns"], m["truncated/error"]) == (1.0, 1.0)
    # Without an engine reading: generated tokens from the trajectories, no engine/env split.
    assert m["time/rollout/episodes"] == 2.0 and m["tokens/rollout/generated"] == 6.0
    assert m["tokens_per_s/rollout/generated"] == 3.0 and "time/rollout/engine" not in m


def test_engine_reading_splits_rollout_time_into_engine_and_env():
    use = EngineUse(busy_s=1.5, requests=5, prompt_tokens=400, prompt_cached_tokens=100, generated_tokens=60)
    m = rollout_metrics([_episode(4, 1.0, 1, 0, {})], seconds=2.0, use=use)
    # 1.5 s with a request in flight; the other 0.5 s of the 2 s the engine waited on envs and tools.
    assert (m["time/rollout/engine"], m["time/rollout/env"]) == (1.5, 0.5)
    tokens = ("tokens/rollout/generated", "tokens/rollout/prompt", "tokens/rollout/prompt_cached")
    assert tuple(m[k] for k in tokens) == (60, 400, 100)
    assert (m["tokens_per_s/rollout/generated"], m["tokens_per_s/rollout/prompt"]) == (30.0, 200.0)
    # A reading taken across a busy period may exceed the wall time by float noise: env never goes negative.
    m = rollout_metrics([], seconds=1.0, use=EngineUse(busy_s=1.0000001))
    assert (m["time/rollout/engine"], m["time/rollout/env"]) == (1.0, 0.0)


def test_trainer_tokens_count_trained_and_processed_tokens():
    # Row 0: 5 tokens, 2 sampled; row 1: 3 tokens, none sampled (no gradient, not run); row 2: 4 tokens, 3 sampled.
    batch = TrainBatch.from_rows([[1] * 5, [1] * 3, [1] * 4], [[0, 0, 0, 1, 1], [0, 0, 0], [0, 1, 1, 1]],
                                 [[0.0] * 5, [0.0] * 3, [0.0] * 4], [[-1, -1, -1, 0, 0], [-1] * 3, [-1, 0, 0, 0]],
                                 [1.0, 0.0, 0.5], [0, 0, 1])
    m = trainer_metrics(batch, update_s=0.5)
    assert (m["tokens/trainer/trained"], m["tokens/trainer/processed"]) == (5.0, 9.0)  # 2 + 3; 5 + 4
    assert (m["tokens_per_s/trainer/trained"], m["tokens_per_s/trainer/processed"]) == (10.0, 18.0)
    assert trainer_metrics(batch, update_s=0.0)["tokens_per_s/trainer/trained"] == 0.0


def test_staleness_histogram_counts_trained_tokens_by_versions_behind():
    versions = torch.tensor([[-1, 5, 5, 3, -1],
                             [-1, 4, 4, 4, 5]])  # [B=2, T=5]
    mask = torch.tensor([[0, 1, 1, 1, 0],
                         [0, 1, 1, 0, 1]], dtype=torch.float32)
    # Policy version 5: trained tokens' versions are 5, 5, 3 | 4, 4, 5 (the 4 at [1, 3] is not trained),
    # so staleness 0, 0, 2, 1, 1, 0: three at 0, two at 1, one at 2; mean 4/6, max 2; no key for absent k.
    m = staleness_metrics(versions, mask, policy_version=5)
    assert m == {"staleness/0": 3.0, "staleness/1": 2.0, "staleness/2": 1.0,
                 "staleness/mean": pytest.approx(4 / 6), "staleness/max": 2.0}


def test_staleness_of_a_synchronous_step_is_all_zero():
    versions = torch.tensor([[-1, 7, 7, -1]])
    m = staleness_metrics(versions, torch.tensor([[0.0, 1.0, 1.0, 0.0]]), policy_version=7)
    assert m == {"staleness/0": 2.0, "staleness/mean": 0.0, "staleness/max": 0.0}
    assert staleness_metrics(versions, torch.zeros(1, 4), policy_version=7) == {}  # nothing trained


@pytest.mark.parametrize("version", [8, -1])
def test_staleness_refuses_versions_the_policy_cannot_have_produced(version):
    # A token from a newer policy than the one being updated, or a trained token without a version.
    with pytest.raises(TrainerError, match=r"outside 0\.\.7 .*bug in agentrl"):
        staleness_metrics(torch.tensor([[-1, 7, version]]), torch.tensor([[0.0, 1.0, 1.0]]), policy_version=7)


class SleepyEnv(Env):
    """One turn; the env takes 0.5 s to score it (a slow tool or scorer)."""

    splits = ("train", "test")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return (Message("user", f"Write digits after {seed}."),), {}

    def step(self, action):
        time.sleep(0.5)
        return (Message("user", "Done."),), float(any(c.isdigit() for c in action)), True, False, {}


def test_a_slow_env_shows_as_env_time_not_engine_time(stopping_model_dir, tmp_path):
    if "sleepy-v0" not in ENVS.ids():
        register("sleepy-v0", SleepyEnv)
    cfg = load_config(None, [f"model.path={stopping_model_dir}", "env.id=sleepy-v0", "rollout.prompts_per_step=2",
                             "rollout.samples_per_prompt=2", "rollout.max_tokens_per_turn=16", "rollout.max_turns=1",
                             "rollout.max_total_tokens=64", "rollout.lockstep='on'", f"run_dir={tmp_path}"])
    rollout = RolloutSide.open(cfg)
    try:
        trajs, m = collect(rollout, step=0)
    finally:
        rollout.close()
    assert any(t.turn_rewards for t in trajs), "no episode reached the env; the test model should end its turns"
    # An env step takes 0.5 s; the engine may still be answering other episodes during part of it, but
    # never for longer than it was busy in all, so at least 0.5 s - engine of the rollout is env time.
    engine, env = m["time/rollout/engine"], m["time/rollout/env"]
    assert 0 < engine < m["time/rollout/episodes"] and env >= 0.5 - engine > 0
    assert m["time/rollout/engine"] + m["time/rollout/env"] == pytest.approx(m["time/rollout/episodes"])
    assert m["tokens/rollout/generated"] == sum(t.num_model_tokens for t in trajs)
    assert m["tokens/rollout/prompt"] == sum(t.prompt_length for t in trajs)  # one turn: each prompt sent once
