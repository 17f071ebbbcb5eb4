"""Every example config loads (the keys exist, the values are in bounds, the envs are registered)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentrl.config import load_config
from agentrl.envs.registration import ENVS

EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("examples/**/*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads_and_names_registered_envs(path):
    cfg = load_config(path)
    for env in cfg.envs:
        ENVS.spec(env.id)


def test_there_is_an_example_per_shipped_environment():
    names = {p.stem for p in EXAMPLES}
    assert {"calculator", "countdown", "python_math", "search_qa", "gym_frozenlake", "multi_task", "word_guess"} <= names
