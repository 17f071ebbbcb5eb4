"""The env checker: real envs pass; each deliberately broken env fails the check for its bug, with
a message that says what went wrong; `agentrl check-env` exits non-zero on failure."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agentrl.cli import app
from agentrl.envs import ENVS, Env, Message, check_env
from agentrl.envs.core import Task
from agentrl.envs.hostile import hostile_actions
from agentrl.envs.tool_env import ToolEnv
from agentrl.errors import EnvError
from agentrl.tools.core import tool

ROOT = Path(__file__).resolve().parents[2]


def _statuses(report) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


def test_calculator_passes_everything_that_applies():
    report = check_env("calculator-v0", episodes=4)
    assert report.ok, report.failures
    statuses = _statuses(report)
    assert statuses["gymnasium: check_step_determinism"] == "pass"
    assert statuses["gymnasium: render checks"] == "skip" and statuses["gymnasium: close check"] == "skip"
    assert [s for s in statuses.values() if s not in ("pass", "skip")] == []
    hostile = next(r for r in report.results if r.name.startswith("hostile actions"))
    assert f"all {len(hostile_actions([]))} kinds of hostile turn sent" in hostile.detail


@pytest.mark.parametrize("env_id", ["gym-frozenlake-v0", "gym-taxi-v0", "gym-blackjack-v0", "gym-cliffwalking-v0"])
def test_gym_adapters_pass(env_id):
    report = check_env(env_id, episodes=2, split_samples=100)
    assert report.ok, report.failures
    assert "warn" not in _statuses(report).values()


class GuessEnv(Env):
    """A one-turn env that passes every check; the broken envs below each change one thing.

    The task is "Say N."; train gets even N and test odd N, so the splits are disjoint.
    """

    splits = ("train", "test")

    def __init__(self):
        self.target, self.done = 0, True

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        split = (options or {}).get("split", "train")
        self.target = self.pick(split)
        self.done = False
        return (Message("user", f"Say {self.target}."),), {"split": split}

    def pick(self, split: str) -> int:
        return int(self.np_random.integers(0, 10_000)) * 2 + (split == "test")

    def step(self, action):
        if self.done:
            raise EnvError("step() called on a finished episode; call reset() first")
        self.done = True
        reward = 1.0 if str(self.target) in self.read(action) else 0.0
        return (Message("user", "Done."),), reward, True, False, {}

    def read(self, action: str) -> str:
        return action


class NondeterministicReset(GuessEnv):
    def pick(self, split):
        return random.randrange(10_000) * 2 + (split == "test")  # the global RNG ignores the seed


class CrashesOnInvalidUTF8(GuessEnv):
    def read(self, action):
        return action.encode("utf-8").decode()  # lone surrogates (text from invalid UTF-8) raise here


class SharedSplits(GuessEnv):
    def pick(self, split):
        return int(self.np_random.integers(0, 10_000))  # the split is ignored


class StepsAfterTheEnd(GuessEnv):
    def step(self, action):
        self.done = False  # forgets that the episode ended
        return super().step(action)


class NumpyFlags(GuessEnv):
    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, np.bool_(terminated), truncated, info


class NanReward(GuessEnv):
    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, (float("nan") if action == "" else reward), terminated, truncated, info


class ExitsInStep(GuessEnv):
    def step(self, action):
        if action == "":
            sys.exit(3)  # the env's own code ends the process: check-env must report it, not obey
        return super().step(action)


class LeaksAChild(GuessEnv):
    spawned: list[subprocess.Popen] = []

    def reset(self, *, seed=None, options=None):
        if not getattr(self, "proc", None):
            self.proc = subprocess.Popen(["sleep", "60"])
            LeaksAChild.spawned.append(self.proc)
        return super().reset(seed=seed, options=options)

    def close(self):
        pass  # never stops its helper process


def test_the_reference_broken_env_base_passes():
    report = check_env(GuessEnv, episodes=3)
    assert report.ok, report.failures


@pytest.mark.parametrize("env_cls,check,fragments", [
    (NondeterministicReset, "seeded reset is deterministic",
     ["reset(seed=0, options={'split': 'train'}) gave a different result after another reset"]),
    (CrashesOnInvalidUTF8, "hostile actions",
     ["step raised UnicodeEncodeError", "test_checker.py:", "in read", "action: 'caf\\udce9"]),
    (SharedSplits, "splits are disjoint", ["splits 'train' and 'test' share", "e.g. 'Say "]),
    (StepsAfterTheEnd, "step after the end raises EnvError",
     ["step() after the episode ended returned normally; it must raise agentrl.errors.EnvError"]),
    (NumpyFlags, "return types", ["returned terminated of type numpy.bool; expected bool (wrap it in bool())"]),
    (NanReward, "hostile actions", ["non-finite reward nan"]),
    (ExitsInStep, "hostile actions", ["step raised SystemExit: 3", "in step"]),
    (LeaksAChild, "close() twice, no child process left", ["close() left 1 child process(es) behind", "sleep"]),
])
def test_broken_envs_fail_with_a_useful_message(env_cls, check, fragments):
    try:
        report = check_env(env_cls, episodes=3)
    finally:
        for proc in LeaksAChild.spawned:
            proc.kill()
            proc.wait()
        LeaksAChild.spawned.clear()
    assert not report.ok
    row = next(r for r in report.results if r.name.startswith(check))
    assert row.status == "fail", report.results
    for fragment in fragments:
        assert fragment in row.detail, row.detail


@tool
def quit_now() -> str:
    """Leave."""
    sys.exit("bye")


@tool
def interrupt() -> str:
    """Stop."""
    raise KeyboardInterrupt


class ExitingToolsEnv(ToolEnv):
    """Tools that exit or interrupt the process: contained by the executor, so the env keeps the contract."""

    def __init__(self):
        super().__init__([quit_now, interrupt])

    def sample_task(self, split, seed):
        return Task(id=f"{split}-{seed}", prompt=f"Say {2 * seed + (split == 'test')}.", answer="", split=split)

    def score(self, task, answer):
        return 0.0

    def scripted_action(self, rng):
        return '<tool_call>{"name": "%s", "arguments": {}}</tool_call>' % rng.choice(["quit_now", "interrupt"])


def test_tools_that_exit_are_contained_and_reported():
    report = check_env(ExitingToolsEnv, episodes=3)
    assert report.ok, report.failures
    hostile = next(r for r in report.results if r.name.startswith("hostile actions"))
    assert "tool errors shown to the model:" in hostile.detail and "runtime" in hostile.detail


def test_an_env_that_cannot_be_built_is_one_failed_row():
    def factory():
        raise TypeError("missing argument 'dataset'")

    report = check_env(factory)
    assert [(r.name, r.status) for r in report.results] == [("build the env", "fail")]
    assert "TypeError: missing argument 'dataset'" in report.results[0].detail


def test_cli_passes_on_a_real_env():
    exe = shutil.which("agentrl") or str(Path(sys.executable).parent / "agentrl")
    out = subprocess.run([exe, "check-env", "calculator-v0", "--episodes", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "calculator-v0 passed" in out.stdout and "hostile actions" in out.stdout


def test_cli_fails_on_a_broken_env_and_says_why():
    ENVS.register("broken-utf8-v0", CrashesOnInvalidUTF8)
    try:
        result = CliRunner().invoke(app, ["check-env", "broken-utf8-v0", "-n", "2"], env={"COLUMNS": "300"})
    finally:
        ENVS.unregister("broken-utf8-v0")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "UnicodeEncodeError" in result.output
    assert "broken-utf8-v0 failed 1 check(s)" in result.output
    result = CliRunner().invoke(app, ["check-env", "calculater-v0"])
    assert result.exit_code == 2 and "Did you mean 'calculator-v0'" in result.output

