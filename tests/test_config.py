"""Config: YAML overrides, dotted overrides, bounds and typo suggestions."""

from __future__ import annotations

import pytest

from agentrl.config import load_config
from agentrl.errors import ConfigError

BASE = ["model.path=m", "env.id=calculator-v0"]


def test_overrides_are_typed_and_defaults_live_in_one_place(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\nenv: {id: calculator-v0}\ntrain: {steps: 3}\n")
    cfg = load_config(f, ["train.steps=7", "optim.lr=0.01", "algorithm.norm_by_std=false"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.algorithm.norm_by_std is False
    assert cfg.rollout.samples_per_prompt == 8  # default from agentrl/config.py


@pytest.mark.parametrize("overrides,fragment", [
    (["train.stesp=3"], "Did you mean 'steps'"),
    (["rollout.temperature=-1"], "greater than or equal to 0"),
    (["rollout.samples_per_prompt=1"], "samples_per_prompt must be at least 2"),
    (["train.steps=many"], "valid integer"),
    (["nonsense"], "section.key=value"),
    (["optimm.lr=1"], "Did you mean 'optim'"),
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
