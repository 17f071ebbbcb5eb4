"""The registry: a separately installed package's env and tool are found through entry points,
unknown ids suggest the right one, duplicates raise, and `make` passes keyword arguments."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentrl.envs import ENVS, make
from agentrl.envs.core import Env
from agentrl.errors import EnvError, RegistryError
from agentrl.registry import Registry
from agentrl.tools.core import TOOLS, Tool, get_tool

ROOT = Path(__file__).resolve().parents[2]
needs_plugin = pytest.mark.skipif(
    importlib.util.find_spec("agentrl_plugin_example") is None,
    reason="the fixture plugin is not installed; run: "
           "pip install --no-deps -e tests/fixtures/agentrl_plugin_example",
)


def _agentrl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("agentrl") or str(Path(sys.executable).parent / "agentrl")
    env = {**os.environ, "COLUMNS": "200"}
    # run outside the repository so that only installed packages (not the source tree) are seen
    return subprocess.run([exe, *args], cwd="/", capture_output=True, text=True, timeout=120, env=env)


@needs_plugin
def test_plugin_env_and_tool_are_found_by_make_and_get_tool():
    spec = ENVS.spec("plugin-reverse-v0")
    assert spec.entry_point == "agentrl_plugin_example.env:ReverseEnv"
    assert spec.origin == "entry point of agentrl-plugin-example"
    env = make("plugin-reverse-v0", word_length=3)
    obs, info = env.reset(seed=4, options={"split": "test"})
    word = env.task.answer[::-1]
    assert len(word) == 3 and repr(word) in obs[-1].content and info["split"] == "test"
    tool = get_tool("reverse_text")
    assert isinstance(tool, Tool) and tool.fn("abc") == "cba"
    assert TOOLS.spec("reverse_text").origin == "entry point of agentrl-plugin-example"


@needs_plugin
@pytest.mark.parametrize("command,expected", [
    ("envs", ["plugin-reverse-v0", "agentrl_plugin_example.env:ReverseEnv", "calculator-v0", "gym-frozenlake-v0"]),
    ("tools", ["reverse_text", "agentrl_plugin_example.tools:reverse_text", "calculator", "python"]),
])
def test_cli_lists_the_plugin(command, expected):
    out = _agentrl(command)
    assert out.returncode == 0, out.stdout + out.stderr
    for text in expected:
        assert text in out.stdout


def test_unknown_ids_suggest_the_closest():
    with pytest.raises(RegistryError, match=r"unknown environment 'calculater-v0'\. Did you mean 'calculator-v0'\?"):
        make("calculater-v0")
    with pytest.raises(RegistryError, match="Did you mean 'gym-frozenlake-v0'"):
        make("gym-frozenlak-v0")
    with pytest.raises(RegistryError, match="unknown tool 'calculatr'. Did you mean 'calculator'"):
        get_tool("calculatr")
    with pytest.raises(RegistryError, match="Known: "):  # nothing close: no suggestion, the known ids instead
        make("zzz")


def test_duplicates_raise():
    reg: Registry[type[Env]] = Registry("environment")
    reg.register("mine-v0", "pkg.mod:Mine")
    with pytest.raises(RegistryError, match="'mine-v0' is already registered .*new version suffix"):
        reg.register("mine-v0", "pkg.other:Other")
    assert "calculator-v0" in ENVS  # reads the installed packages' entry points first
    with pytest.raises(RegistryError, match="already registered"):
        ENVS.register("calculator-v0", "somewhere.else:Env")


def test_a_code_registration_that_clashes_with_an_installed_package_raises_on_lookup():
    reg: Registry[type[Env]] = Registry("environment", group="agentrl.envs")
    reg.register("calculator-v0", "my.pkg:MyCalculator")  # before the installed packages are read
    with pytest.raises(RegistryError, match="registered more than once .*my.pkg:MyCalculator.*CalculatorEnv"):
        reg.spec("calculator-v0")
    assert reg.spec("gym-taxi-v0").entry_point == "agentrl_gym_text.games:TaxiTextEnv"  # the rest still works
    reg.unregister("calculator-v0")
    assert "calculator-v0" not in reg


def test_make_passes_kwargs_over_registered_defaults():
    assert make("calculator-v0", style="story").style == "story"
    env = make("gym-frozenlake-v0", size=5, max_turns=7)
    obs, _ = env.reset(seed=0)
    assert env.max_turns == 7 and obs[-1].content.count("\n") >= 5  # a 5x5 grid
    reg: Registry[type[Env]] = Registry("environment")
    reg.register("story-v0", "agentrl_calculator.env:CalculatorEnv", style="story")
    assert reg.spec("story-v0").kwargs == {"style": "story"}
    with pytest.raises(EnvError, match="cannot build environment 'calculator-v0' with arguments \\['colour'\\]"):
        make("calculator-v0", colour="red")


def test_entry_point_that_does_not_import_is_a_clear_error():
    reg: Registry[type[Env]] = Registry("environment")
    reg.register("ghost-v0", "no_such_package.mod:Ghost")
    with pytest.raises(RegistryError, match="cannot import module 'no_such_package.mod'"):
        reg.get("ghost-v0")
