"""Parts the Ray tests register and Ray worker processes import by name (`tests.driver.ray_parts`), so
they live in a module, not in a test function; nothing is registered on import.

`DigitsEnv` (registered as `ray-digits-v0`): one turn; the reward is the share of digit characters
in the reply, so even an untrained model earns rewards that differ within a group (GRPO then has a
gradient), which the calculator env does not give the tiny test models.

`StallingEngine` (registered as `test-stalling`): the embedded engine that stops answering on cue.
The fault is armed by a file: `$AGENTRL_FAULT_DIR/arm` (created by a test) is
claimed by the first engine that starts after it exists (an atomic rename, so one worker only);
that engine writes its pid to `claimed` and never answers its first request: it writes `stalled`
and waits forever, as an engine whose scheduler deadlocked would. A restarted worker finds no
`arm` file and works normally.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agentrl.envs import Env, Message
from agentrl.rollout.backends.embedded import EmbeddedEngine


class DigitsEnv(Env):
    splits = ("train", "test")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return (Message("user", f"Write digits after {int(self.np_random.integers(0, 1000))}."),), {}

    def step(self, action):
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        return (Message("user", "Done."),), share, True, False, {}


class StallingEngine(EmbeddedEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall = False
        folder = os.environ.get("AGENTRL_FAULT_DIR")
        if folder:
            try:
                os.rename(Path(folder) / "arm", Path(folder) / f"armed-{os.getpid()}")
            except FileNotFoundError:
                return
            (Path(folder) / "claimed").write_text(str(os.getpid()))
            self.stall = True

    async def generate(self, prompt_ids, sampling):
        if self.stall:
            (Path(os.environ["AGENTRL_FAULT_DIR"]) / "stalled").write_text(str(os.getpid()))
            await asyncio.Event().wait()  # never set: the request is never answered
        return await super().generate(prompt_ids, sampling)
