"""The `agentrl` CLI with hostile test environments registered; run as a script or import it.

    python tests/run_cli_hostile.py train CONFIG.yaml env.id=hostile-late-v0 ...

Each env breaks in one way a user's env can:
`hostile-init-v0`     its constructor raises.
`hostile-reset-v0`    every reset raises (a task store that is down).
`hostile-late-v0`     resets raise from seed PROBE_SEEDS on, so the checks before work pass and the
                      episodes of the run fail.
`hostile-step-v0`     every step raises (a broken scorer), after the model's first turn.
`hostile-flaky-v0`    one task seed in four fails in step; the rest score digits like digits-v0.
`hostile-onesplit-v0` has only a train split.
`hostile-seeds-v0`    resets raise for the task seeds in `env.kwargs.fail_seeds` (one chosen step).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.envs import Env, Message, register  # noqa: E402
from agentrl.envs.registration import ENVS  # noqa: E402
from agentrl.driver.preflight import PROBE_SEEDS  # noqa: E402


class _Digits(Env):
    """One turn; the reward is the share of digits in the reply (varies within a group untrained)."""

    splits = ("train", "test")

    def __init__(self):
        self.seed = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seed = seed
        return (Message("user", f"Write digits after {seed}."),), {}

    def step(self, action):
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        return (Message("user", "Done."),), share, True, False, {}


class InitRaises(_Digits):
    def __init__(self):
        raise ValueError("no task database at /nonexistent/tasks.db")


class ResetRaises(_Digits):
    def reset(self, *, seed=None, options=None):
        raise RuntimeError("task store unavailable (connection refused)")


class LateResetRaises(_Digits):
    def reset(self, *, seed=None, options=None):
        if seed is not None and seed >= PROBE_SEEDS:
            raise RuntimeError(f"task {seed} is missing from the task store")
        return super().reset(seed=seed, options=options)


class StepRaises(_Digits):
    def step(self, action):
        raise KeyError("answer")


class FlakyStep(_Digits):
    def step(self, action):
        if self.seed % 4 == 0:
            raise TimeoutError(f"scorer timed out on task {self.seed}")
        return super().step(action)


class OneSplit(_Digits):
    splits = ("train",)


class FailSeeds(_Digits):
    def __init__(self, fail_seeds=()):
        super().__init__()
        self.fail_seeds = set(fail_seeds)

    def reset(self, *, seed=None, options=None):
        if seed in self.fail_seeds:
            raise ConnectionError(f"task server dropped the request for task {seed}")
        return super().reset(seed=seed, options=options)


ENV_CLASSES = {"hostile-init-v0": InitRaises, "hostile-reset-v0": ResetRaises, "hostile-late-v0": LateResetRaises,
               "hostile-step-v0": StepRaises, "hostile-flaky-v0": FlakyStep, "hostile-onesplit-v0": OneSplit,
               "hostile-seeds-v0": FailSeeds}
for _id, _cls in ENV_CLASSES.items():
    if _id not in ENVS:  # imported by a test and run as a script in one session
        register(_id, _cls)

if __name__ == "__main__":
    from agentrl.cli import app

    app()
