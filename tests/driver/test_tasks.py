"""Multi-task runs: the config, the weighted mixture, per-env advantage scaling (by hand), per-env
metrics and evaluation, and a real run over three environments on the tiny model."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from agentrl.config import load_config
from agentrl.driver.loop import train
from agentrl.driver.tasks import eval_specs, run_failure_policy, scale_advantages_per_env, train_specs
from agentrl.errors import ConfigError
from agentrl.rollout.agent_loop import failed_trajectory, EpisodeSpec
from agentrl.trainer.batch import TrainBatch

THREE = "envs=[{id: calculator-v0, weight: 2}, {id: countdown-v0}, {id: word-guess-v0, name: words}]"


def _cfg(*overrides: str):
    return load_config(None, ["model.path=unused", *overrides])


def test_env_alone_is_a_run_of_one_env_and_envs_alone_sets_env():
    one = _cfg("env.id=calculator-v0")
    assert [e.key for e in one.envs] == ["calculator-v0"]
    three = _cfg(THREE)
    assert three.env.id == "calculator-v0" and [e.key for e in three.envs] == ["calculator-v0", "countdown-v0", "words"]
    with pytest.raises(ConfigError, match="not both"):
        _cfg(THREE, "env.id=countdown-v0")
    with pytest.raises(ConfigError, match="more than once"):
        _cfg("envs=[{id: calculator-v0}, {id: calculator-v0, kwargs: {style: story}}]")
    _cfg("envs=[{id: calculator-v0}, {id: calculator-v0, name: story, kwargs: {style: story}}]")
    with pytest.raises(ConfigError, match="not built"):
        _cfg(THREE, "cluster.mode=ray")
    with pytest.raises(ConfigError, match="weight"):
        _cfg("envs=[{id: calculator-v0, weight: 0}]")
    with pytest.raises(ConfigError, match="held-out split"):
        _cfg("envs=[{id: calculator-v0}, {id: countdown-v0, train_split: test}]")


def test_the_mixture_follows_the_weights_is_fixed_per_step_and_groups_never_span_envs():
    cfg = _cfg(THREE, "rollout.prompts_per_step=8", "rollout.samples_per_prompt=3")
    seeds = list(range(8))
    specs = train_specs(cfg, step=5, rnd=0, seeds=seeds)
    assert specs == train_specs(cfg, step=5, rnd=0, seeds=seeds)  # what --resume replays
    by_group = {}
    for s in specs:
        by_group.setdefault(s.group_id, set()).add(s.env)
    assert all(len(envs) == 1 for envs in by_group.values()) and len(by_group) == 8
    drawn = Counter(s.env for step in range(300) for s in train_specs(cfg, step, 0, seeds)[::3])
    total = sum(drawn.values())  # 2400 groups; weights 2:1:1
    assert abs(drawn["calculator-v0"] / total - 0.5) < 0.03 and abs(drawn["words"] / total - 0.25) < 0.03
    assert len({tuple(s.env for s in train_specs(cfg, step, 0, seeds)) for step in range(10)}) > 1
    single = _cfg("env.id=calculator-v0", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2")
    assert train_specs(single, 0, 1, [7, 9]) == [EpisodeSpec(7, "train", 2), EpisodeSpec(7, "train", 2),
                                                 EpisodeSpec(9, "train", 3), EpisodeSpec(9, "train", 3)]


def test_evaluation_plays_every_envs_held_out_tasks():
    specs = eval_specs(_cfg(THREE), "test", 4)
    assert [(s.env, s.seed, s.group_id) for s in specs[3:6]] == [("calculator-v0", 3, 3), ("countdown-v0", 0, 4),
                                                                ("countdown-v0", 1, 5)]
    assert {s.split for s in specs} == {"test"} and len(specs) == 12


def _traj(env: str, group: int) -> object:
    t = failed_trajectory(EpisodeSpec(seed=0, group_id=group), "env_error", "x", env_id=env)
    return replace(t, failure=None, error=None)


def test_per_env_scaling_by_hand():
    """Two envs, rows of 2 tokens (mask 1, 1; the last row masks its second token).

    env a (rows 0, 1): advantages 1, 1 | -1, -1 -> RMS over 4 tokens = sqrt(4 / 4) = 1: unchanged.
    env b (rows 2, 3): advantages 10, 10 | -20, (masked) -> RMS over 3 tokens = sqrt((100 + 100 + 400) / 3)
        = sqrt(200) = 14.142...: rows become 0.7071, 0.7071 | -1.4142, 0.
    """
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [10.0, 10.0], [-20.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    batch = TrainBatch(token_ids=torch.zeros(4, 2, dtype=torch.long), lengths=torch.full((4,), 2), mask=mask,
                       rollout_logprobs=torch.zeros(4, 2), weight_versions=torch.zeros(4, 2, dtype=torch.long),
                       scores=torch.zeros(4), group_ids=torch.arange(4), advantages=adv)
    cfg = _cfg("envs=[{id: calculator-v0, name: a}, {id: countdown-v0, name: b}]")
    trajs = [_traj("a", 0), _traj("a", 0), _traj("b", 1), _traj("b", 1)]
    got = scale_advantages_per_env(batch, trajs, cfg).advantages
    r = math.sqrt(200)
    expected = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [10 / r, 10 / r], [-20 / r, 0.0]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    off = _cfg("envs=[{id: calculator-v0, name: a}, {id: countdown-v0, name: b}]", "algorithm.normalize_per_env=false")
    assert scale_advantages_per_env(batch, trajs, off) is batch
    zero = batch.with_(advantages=torch.zeros(4, 2))  # uniform groups: zeros stay zeros
    assert torch.equal(scale_advantages_per_env(zero, trajs, cfg).advantages, torch.zeros(4, 2))


def test_envs_that_disagree_on_failure_policy_are_refused(monkeypatch):
    from agentrl_countdown.env import CountdownEnv

    monkeypatch.setattr(CountdownEnv, "failure_policy", {"env_error": "retry"}, raising=False)
    with pytest.raises(ConfigError, match="different failure policies for \\['env_error'\\]"):
        run_failure_policy(_cfg(THREE))
    assert run_failure_policy(_cfg(THREE, "failures.policy.env_error=drop")).actions["env_error"] == "drop"


def test_a_run_over_three_envs_reports_each(tiny_model_dir, tmp_path):
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", THREE, "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
        "rollout.max_tokens_per_turn=8", "rollout.max_turns=2", "rollout.max_total_tokens=400", "train.steps=2",
        "eval.num_tasks=2", "eval.after=false", "train.checkpoint_every=0", f"run_dir={tmp_path}"])
    result = train(cfg)
    before = result["before"]
    assert before["episodes"] == 6  # two held-out tasks of each env
    for name in ("calculator-v0", "countdown-v0", "words"):
        assert before[f"env/{name}/episodes"] == 2
    played = Counter()
    for m in result["history"]:
        assert math.isfinite(m["loss"])
        per_env = sum(m.get(f"env/{n}/episodes", 0.0) for n in ("calculator-v0", "countdown-v0", "words"))
        assert per_env == m["episodes"] == 8
        played.update({n: m[f"env/{n}/episodes"] for n in ("calculator-v0", "countdown-v0", "words")})
    assert sum(played.values()) == 16
