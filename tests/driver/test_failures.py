"""The failure policy on hand-made trajectories: resolution (config, env class, defaults), retries,
dropping episodes and groups, zero-loss rows that leave their group's statistics alone, the
min_group_fraction stop rule, and the counts. The same rules on real runs (a real tiny model, real
envs, tools, engine and template that fail): test_failures_faults.py."""

from __future__ import annotations

import pytest
import torch

from agentrl.config import FAILURE_DEFAULTS, FailurePolicyConfig, FailuresConfig, load_config
from agentrl.driver.batch import to_batch
from agentrl.driver.failures import FailureCounts, FailurePolicy, check_arrival, play_with_retries, settle
from agentrl.envs import Env
from agentrl.errors import ConfigError, RolloutError
from agentrl.rollout.agent_loop import EpisodeSpec
from agentrl.rollout.trajectory import FAILURE_CLASSES, Trajectory
from agentrl.trainer.update import compute_advantages


def _traj(group: int, reward: float = 1.0, failure: str | None = None, seed: int = 0, error: str = "") -> Trajectory:
    """Prompt token 1, model tokens 2 and 3 (a failed one keeps its model token: the loop stops mid-episode)."""
    text = (error or f"{failure} text") if failure else None
    return Trajectory(token_ids=(1, 2, 3), loss_mask=(0, 1, 1), rollout_logprobs=(0.0, -0.5, -0.7),
                      weight_versions=(-1, 0, 0), prompt_length=1, turn_spans=((1, 3),), turn_rewards=(reward,),
                      reward=0.0 if failure else reward, env_id="demo-v0", task_id=f"train-{seed}", split="train",
                      seed=seed, group_id=group, num_turns=1, truncation="error" if failure else None, error=text,
                      failure=failure)


def _policy(**actions) -> FailurePolicy:
    return FailurePolicy.resolve(FailuresConfig(policy=FailurePolicyConfig(**actions)))


def test_the_config_names_exactly_the_failure_classes():
    assert set(FailurePolicyConfig.model_fields) == set(FAILURE_DEFAULTS) == set(FAILURE_CLASSES)


class TransientErrorsEnv(Env):
    failure_policy = {"env_error": "retry", "episode_deadline": "keep_zero_loss"}


def test_the_policy_is_the_config_then_the_env_class_then_the_defaults():
    policy = FailurePolicy.resolve(FailuresConfig(policy=FailurePolicyConfig(episode_deadline="drop_group")),
                                   TransientErrorsEnv)
    assert policy.actions == {**FAILURE_DEFAULTS, "env_error": "retry", "episode_deadline": "drop_group"}
    assert FailurePolicy.resolve(FailuresConfig()).actions == FAILURE_DEFAULTS
    # A null in the config (a YAML `env_error: null`, or a config.json written by a run) still defers to the env.
    cfg = load_config(None, ["model.path=m", "env.id=calculator-v0", "failures.policy.env_error=null",
                             "failures.policy.engine_error=drop"])
    assert FailurePolicy.resolve(cfg.failures, TransientErrorsEnv).actions["env_error"] == "retry"
    assert FailurePolicy.resolve(cfg.failures).actions["engine_error"] == "drop"


@pytest.mark.parametrize("table, message", [
    ({"env_eror": "retry"}, "unknown failure class 'env_eror'. Did you mean 'env_error'?"),
    ({"env_error": "again"}, "failure_policy['env_error'] is 'again'; use one of retry, drop, drop_group"),
    ([("env_error", "retry")], "must map failure classes to actions, got list"),
])
def test_an_env_failure_policy_that_names_no_class_or_action_is_refused(table, message):
    bad = type("BadEnv", (Env,), {"failure_policy": table})
    with pytest.raises(ConfigError, match="BadEnv.failure_policy") as caught:
        FailurePolicy.resolve(FailuresConfig(), bad)
    assert message in str(caught.value)


def test_retries_replay_the_failed_specs_with_their_first_index_and_stop_at_max_retries():
    played: list[list[EpisodeSpec]] = []
    attempts: dict[int, int] = {}

    def play(specs: list[EpisodeSpec]) -> list[Trajectory]:
        """Seed 1 fails twice (an engine timeout, then a lost worker), seed 2 always; seed 3 is an env error."""
        played.append(specs)
        out = []
        for s in specs:
            attempts[s.seed] = attempts.get(s.seed, 0) + 1
            failure = ({1: "engine_timeout" if attempts[1] == 1 else "worker_lost"}.get(s.seed) if attempts[s.seed] <= 2
                       else None) if s.seed == 1 else {2: "tool_infrastructure", 3: "env_error"}.get(s.seed)
            out.append(_traj(s.group_id, seed=s.seed, failure=failure))
        return out

    counts = FailureCounts()
    specs = [EpisodeSpec(seed=k, group_id=k) for k in range(4)]
    final = play_with_retries(play, specs, FailurePolicy.resolve(FailuresConfig(max_retries=2)), counts)
    assert [[(s.seed, s.index) for s in batch] for batch in played] == [
        [(0, 0), (1, 1), (2, 2), (3, 3)], [(1, 1), (2, 2)], [(1, 1), (2, 2)]]  # env_error is not retried
    assert [t.failure for t in final] == [None, None, "tool_infrastructure", "env_error"]
    assert counts.retried == 4
    assert sorted(t.failure for t in counts.failed) == sorted(
        ["engine_timeout", "worker_lost", "tool_infrastructure", "tool_infrastructure", "tool_infrastructure",
         "env_error"])
    none = FailureCounts()
    play_with_retries(play, specs, FailurePolicy.resolve(FailuresConfig(max_retries=0)), none)
    assert none.retried == 0


def test_settle_drops_episodes_and_groups_and_keeps_zero_loss_ones_by_class():
    final = [_traj(0), _traj(0, failure="engine_timeout"),    # group 0: a retried-in-vain episode -> after_retries
             _traj(1), _traj(1, failure="env_error"),         # group 1: env_error -> drop_group (sound one goes too)
             _traj(2), _traj(2, failure="episode_deadline"),  # group 2: episode_deadline -> drop
             _traj(3), _traj(3, failure="template_refused")]  # group 3: set to keep_zero_loss below
    counts = FailureCounts()
    kept = settle(final, _policy(template_refused="keep_zero_loss"), counts)
    assert [(t.group_id, t.failure) for t in kept] == [(0, None), (2, None), (3, None), (3, "template_refused")]
    assert (counts.dropped, counts.dropped_groups, counts.kept_zero_loss) == (2, 1, 1)
    counts = FailureCounts()
    kept = settle(final, FailurePolicy.resolve(FailuresConfig(after_retries="drop_group")), counts)  # defaults
    assert [t.group_id for t in kept] == [2]  # groups 0 (after_retries), 1 and 3 (drop_group) are gone
    assert (counts.dropped, counts.dropped_groups, counts.kept_zero_loss) == (1, 3, 0)


def test_zero_loss_rows_carry_no_gradient_and_leave_their_groups_statistics_alone():
    sound = [_traj(0, 1.0), _traj(0, 0.0), _traj(0, 0.0), _traj(1, 1.0), _traj(1, 0.5)]
    with_failed = sound[:2] + [_traj(0, failure="episode_deadline")] + sound[2:] + [_traj(1, failure="worker_lost")]
    reference = compute_advantages(to_batch(sound), "grpo")
    batch = compute_advantages(to_batch(with_failed), "grpo")
    failed_rows, sound_rows = [2, 6], [0, 1, 3, 4, 5]
    assert batch.mask[failed_rows].sum() == 0 and batch.advantages[failed_rows].abs().sum() == 0
    assert batch.trained_rows() == sound_rows
    # Group 0 is (1, 0, 0): mean 1/3, unbiased std sqrt(1/3); the failed row, had it counted as a 0,
    # would have made it (1, 0, 0, 0) and moved every advantage of the group.
    std = (1 / 3) ** 0.5
    assert torch.allclose(batch.advantages[0, 1], torch.tensor((1 - 1 / 3) / (std + 1e-6)))
    assert torch.equal(batch.advantages[sound_rows], reference.advantages)
    assert len(set(batch.group_ids.tolist())) == 4  # groups 0 and 1, and one group of its own per failed row


@pytest.mark.parametrize("arrived, groups, fraction, stops", [
    (2, 4, 0.5, False),  # exactly half is enough
    (1, 4, 0.5, True),
    (0, 4, 0.0, False),  # 0 never stops
    (3, 4, 1.0, True),   # 1 stops at the first group that did not arrive
    (4, 4, 1.0, False),
])
def test_a_batch_stops_the_run_only_below_the_group_fraction(arrived, groups, fraction, stops):
    final = [t for g in range(groups) for t in (
        [_traj(g), _traj(g)] if g < arrived else [_traj(g, failure="env_error", error="RuntimeError: store down")] * 2)]
    kept = settle(final, _policy(), FailureCounts())
    if not stops:
        check_arrival(final, kept, fraction, "step 7")
        return
    with pytest.raises(RolloutError) as info:
        check_arrival(final, kept, fraction, "step 7")
    failed = 2 * (groups - arrived)
    assert str(info.value).startswith(f"step 7: {failed} of {2 * groups} episodes failed (env_error {failed}) and only "
                                      f"{arrived} of {groups} task groups arrived (fewer than "
                                      f"failures.min_group_fraction={fraction:g})")
    assert f"{failed}x RuntimeError: store down" in str(info.value) and "check-env demo-v0" in str(info.value)


def test_a_group_with_only_zero_loss_rows_did_not_arrive():
    final = [_traj(0, failure="worker_lost"), _traj(0, failure="worker_lost"), _traj(1)]
    kept = settle(final, _policy(worker_lost="keep_zero_loss"), FailureCounts())
    assert len(kept) == 3
    with pytest.raises(RolloutError, match="only 1 of 2 task groups arrived"):
        check_arrival(final, kept, 0.75, "step 1")


def test_every_failed_attempt_and_decision_is_counted_with_its_text():
    counts = FailureCounts()
    counts.record([_traj(0, failure="engine_timeout", error="the engine did not answer"), _traj(0)])
    counts.record([_traj(0, failure="engine_timeout", error="the engine did not answer")])
    counts.retried = 1
    settle([_traj(0, failure="engine_timeout")], _policy(), counts)
    m = counts.metrics()
    assert m["failures/engine_timeout"] == 2 and m["episode_errors"] == 2 and m["failures/retried"] == 1
    assert m["failures/dropped"] == 1 and m["failures/dropped_groups"] == m["failures/kept_zero_loss"] == 0
    assert all(m[f"failures/{c}"] == 0 for c in FAILURE_CLASSES if c != "engine_timeout")
    assert m["error_samples"] == ["2x the engine did not answer"]
    assert "error_samples" not in FailureCounts().metrics()


def test_a_bad_env_failure_policy_stops_the_run_before_anything_loads(tiny_model_dir, tmp_path):
    from agentrl.driver.rollout_side import RolloutSide
    from agentrl.envs import register
    from agentrl.envs.registration import ENVS

    if "test-bad-failure-policy-v0" not in ENVS:
        register("test-bad-failure-policy-v0", type("BadPolicyEnv", (Env,), {"failure_policy": {"timeout": "drop"}}))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "env.id=test-bad-failure-policy-v0", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="BadPolicyEnv.failure_policy names the unknown failure class 'timeout'"):
        RolloutSide.open(cfg)
