"""Config: YAML overrides, dotted overrides, bounds and typo suggestions."""

from __future__ import annotations

import json

import pytest

from agentrl.config import Config, load_config, safe_yaml
from agentrl.errors import ConfigError

BASE = ["model.path=m", "env.id=calculator-v0"]


def test_overrides_are_typed_and_defaults_live_in_one_place(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\nenv: {id: calculator-v0}\ntrain: {steps: 3}\n")
    cfg = load_config(f, ["train.steps=7", "optim.lr=0.01", "algorithm.norm_by_std=false"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.algorithm.norm_by_std is False
    assert cfg.rollout.samples_per_prompt == 8  # default from agentrl/config.py
    assert load_config(None, BASE + ["failures.episode_timeout_s=null"]).failures.episode_timeout_s is None


@pytest.mark.parametrize("overrides,fragment", [
    (["train.stesp=3"], "Did you mean 'steps'"),
    (["rollout.temperature=-1"], "greater than or equal to 0"),
    (["rollout.samples_per_prompt=1"], "samples_per_prompt must be at least 2"),
    (["train.steps=many"], "valid integer"),
    (["nonsense"], "section.key=value"),
    (["optimm.lr=1"], "Did you mean 'optim'"),
    (["failures.policy.env_eror=drop"], "Did you mean 'env_error'"),
    (["failures.policy.env_error=skip"], "failures.policy.env_error: Input should be 'retry', 'drop', 'drop_group'"),
    (["failures.after_retries=retry"], "failures.after_retries: Input should be 'drop', 'drop_group'"),
    (["failures.min_group_fraction=1.5"], "failures.min_group_fraction: Input should be less than or equal to 1"),
    (["failures.episode_timeout_s=0"], "failures.episode_timeout_s: Input should be greater than 0"),
    (["rollout.max_error_fraction=0.2"], "rollout.max_error_fraction was replaced by failures.min_group_fraction"),
])
def test_bad_configs_explain_themselves(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, BASE + overrides)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_yaml_aliases_within_bounds_are_fine(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\nenv: {id: calculator-v0, kwargs: {a: &x [1, 2], b: *x}}\n")
    assert load_config(f).env.kwargs == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize("text, fragment", [
    ("a: " + "[" * 64 + "]" * 64, "nests more than 64 levels"),  # the top mapping is a level too
    ("a: &a [" + ", ".join(["x"] * 400) + "]\nb: &b [" + ", ".join(["*a"] * 400) + "]", "expands to more than 100000"),
    ("a: &a [*a]", "alias that contains itself"),
    ("model: {path: m, path: n}", "gives the key 'path' twice"),
    ("a: !!python/name:os.system", "not valid YAML"),
])
def test_yaml_bombs_are_refused_before_they_expand(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        safe_yaml(text, "c.yaml")
    assert safe_yaml("a: " + "[" * 63 + "]" * 63, "c.yaml")  # 64 levels is the most allowed


def test_algorithm_names_come_from_the_registries():
    from agentrl.trainer.algos import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    for name in ADVANTAGE_ESTIMATORS.ids():
        assert load_config(None, BASE + [f"algorithm.advantage={name}"]).algorithm.advantage == name
    for name in POLICY_LOSSES.ids():
        assert load_config(None, BASE + [f"algorithm.policy_loss={name}"]).algorithm.policy_loss == name
    for name in ("gae", "turn_rloo"):  # read per-turn rewards: not in the outcome estimators' registry
        assert name not in ADVANTAGE_ESTIMATORS
        assert load_config(None, BASE + [f"algorithm.advantage={name}"]).algorithm.advantage == name
    with pytest.raises(ConfigError, match="Did you mean 'gae'.*Known: dr_grpo, grpo.*per-turn rewards: gae, turn_rloo"):
        load_config(None, BASE + ["algorithm.advantage=gea"])


def test_credit_settings_of_another_estimator_are_refused():
    with pytest.raises(ConfigError, match="critic section is set but algorithm.advantage is 'grpo'"):
        load_config(None, BASE + ["critic.lr=0.001"])
    with pytest.raises(ConfigError, match="algorithm.lam is not used by advantage 'turn_rloo'"):
        load_config(None, BASE + ["algorithm.advantage=turn_rloo", "algorithm.lam=0.9"])
    with pytest.raises(ConfigError, match="algorithm.gamma is not used by advantage 'rloo'"):
        load_config(None, BASE + ["algorithm.advantage=rloo", "algorithm.gamma=0.9"])
    cfg = load_config(None, BASE + ["algorithm.advantage=gae", "algorithm.lam=0.9", "critic.lr=0.001"])
    assert cfg.critic.lr == 0.001 and cfg.algorithm.lam == 0.9
    assert load_config(None, BASE + ["algorithm.advantage=turn_rloo", "algorithm.gamma=0.9"]).algorithm.gamma == 0.9
    # A config written back by a run spells out every default: it loads again.
    again = Config.model_validate(json.loads(load_config(None, BASE).model_dump_json()))
    assert again.critic == cfg.critic.model_copy(update={"lr": 1e-5})
    with pytest.raises(ConfigError, match="dynamic_sampling drops task groups.*turn it off"):
        load_config(None, BASE + ["algorithm.advantage=turn_rloo", "algorithm.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="infrastructure faults are never the policy's"):
        load_config(None, BASE + ["algorithm.tool_error_kinds=[parse, infrastructure]"])


def test_training_on_the_eval_split_needs_the_flag():
    with pytest.raises(ConfigError, match="allow_train_on_eval_split"):
        load_config(None, BASE + ["env.train_split=test"])
    cfg = load_config(None, BASE + ["env.train_split=test", "env.allow_train_on_eval_split=true"])
    assert cfg.env.train_split == cfg.eval.split == "test"
    assert load_config(None, BASE + ["env.train_split=test", "eval.split=validation"]).eval.split == "validation"


@pytest.mark.parametrize("device, ok", [("cpu", True), ("cuda", True), ("cuda:1", True), ("tpu", False),
                                        ("cuda:x", False), ("CPU", False), ("cuda:1:2", False)])
def test_device_syntax(device, ok):
    if ok:
        assert load_config(None, BASE + [f"model.device={device}"]).model.device == device
    else:
        with pytest.raises(ConfigError, match="model.device: unsupported device"):
            load_config(None, BASE + [f"model.device={device}"])


def test_lockstep_on_and_off_are_words_not_yaml_booleans():
    # YAML 1.1 reads `on`/`off` as booleans; the override means the words.
    from agentrl.config import load_config

    base = ["model.path=m", "env.id=calculator-v0"]
    assert load_config(None, base + ["rollout.lockstep=on"]).rollout.lockstep == "on"
    assert load_config(None, base + ["rollout.lockstep=off"]).rollout.lockstep == "off"


@pytest.mark.parametrize("overrides, fragment", [
    (["rollout.device=tpu"], "rollout.device: unsupported device"),
    (["model.device=cuda:0", "rollout.device=cpu"], "split across two GPUs"),
    (["model.device=cuda:0", "rollout.device=cuda:1", "cluster.colocate=true"], "cluster.colocate shares one device"),
    (["model.device=cuda", "rollout.device=cuda:1", "cluster.mode=ray"], "leave rollout.device unset"),
])
def test_a_separate_engine_device_is_checked(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, BASE + overrides)


def test_the_engine_device_defaults_to_the_trainers():
    from agentrl.driver.rollout_side import engine_device

    assert engine_device(load_config(None, BASE + ["model.device=cuda:0"])) == "cuda:0"
    split = load_config(None, BASE + ["model.device=cuda:0", "rollout.device=cuda:1"])
    assert engine_device(split) == "cuda:1" and split.model.device == "cuda:0"
