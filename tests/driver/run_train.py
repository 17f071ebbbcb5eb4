"""`agentrl` CLI with two test environments registered; run as a script so it can be killed.

    python tests/driver/run_train.py train CONFIG.yaml key=value ... [--resume]

`digits-v0`: one turn; the reward is the share of digit characters in the reply, so even an
untrained model gets rewards that differ within a group (GRPO needs that to produce a gradient).
`huge-digits-v0`: the same scaled to 1e38, which overflows the float32 loss: every update is
non-finite, as a reward-scale bug would make it. `digit-turns-v0`: three turns, each rewarded with
its reply's share of digits (a per-step reward).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agentrl.envs import Env, Message, register  # noqa: E402
from agentrl.envs.registration import ENVS  # noqa: E402
from agentrl.errors import EnvError  # noqa: E402


class DigitsEnv(Env):
    splits = ("train", "test")
    scale = 1.0

    def __init__(self):
        self.done = True

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.done = False
        n = int(self.np_random.integers(0, 1000))
        return (Message("user", f"Write digits after {n}."),), {}

    def step(self, action):
        if self.done:
            raise EnvError("step() called on a finished episode; call reset() first")
        self.done = True
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        return (Message("user", "Done."),), self.scale * share, True, False, {}


class HugeDigitsEnv(DigitsEnv):
    scale = 1e38


class DigitTurnsEnv(DigitsEnv):
    """Three turns, each rewarded on its own with the share of digits in that reply (per-step rewards)."""

    turns = 3

    def reset(self, *, seed=None, options=None):
        self.turn = 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        if self.done:
            raise EnvError("step() called on a finished episode; call reset() first")
        self.turn += 1
        self.done = self.turn >= self.turns
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        return (Message("user", "Done." if self.done else "More digits."),), share, self.done, False, {}


for _id, _cls in (("digits-v0", DigitsEnv), ("huge-digits-v0", HugeDigitsEnv), ("digit-turns-v0", DigitTurnsEnv)):
    if _id not in ENVS:  # test modules load this file each on their own
        register(_id, _cls)

if __name__ == "__main__":
    from agentrl.cli import app

    app()
