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

`LateStallingEngine` (registered as `test-late-stalling`): the embedded engine, except that the
first request of all the workers' made with weight version 1 or later, while
`$AGENTRL_FAULT_DIR/arm-late` exists, claims that file (an atomic rename), writes its pid to
`claimed` and `stalled`, and is never answered: a fault that strikes in a training run's second or
later step, when (asynchronous schedule) weights are pushed while episodes play.

`SlowEngine` (registered as `test-slow`): the embedded engine, except that while
`$AGENTRL_FAULT_DIR/slow` holds its worker's pid each request waits a second first (a slower device,
or a busier node); a test moves the slowness from one worker to another by rewriting the file.

`ServerShapedEngine` (registered as `test-server-shaped`): the embedded engine behind the constructor
shape of the sglang and vllm backends (`server=`, `**options`). It keeps what it was given, and
writes it to `<server.log_dir>/engine.json` (and `closed` there when closed), so a test can read
what a Ray worker's engine got.

`SandboxEnv` (registered as `ray-sandbox-v0`): one turn scored by the share of digits in the reply,
after a "sandbox" is provisioned at every reset through a real tool run by the real executor: the
tool starts a real subprocess (`sleep`) and waits for it; `close` kills what the env started. Its
faults travel as env kwargs (the workers are other processes: class attributes would not reach
them): the first reset that claims `hang_file` (an atomic rename, so one episode of all the
workers') gets a sandbox that hangs for a minute, and the tasks in `refuse_seeds` open with a
message that the tests' chat template refuses.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

from agentrl.envs import Env, Message
from agentrl.errors import InfrastructureFault
from agentrl.rollout.backends.embedded import EmbeddedEngine
from agentrl.tools.core import ToolCall, ToolPolicy, tool
from agentrl.tools.executor import ToolExecutor

HANG_S = 60  # a hung sandbox would run this long if nothing stopped it


class ServerShapedEngine(EmbeddedEngine):
    def __init__(self, model, *, device="cpu", dtype=None, max_model_len=4096, server=None, **options):
        super().__init__(model, device=device, dtype=dtype, max_model_len=max_model_len)
        self.server, self.options, self.closed = server, options, False
        if server is not None and server.log_dir is not None:
            Path(server.log_dir).mkdir(parents=True, exist_ok=True)
            seen = {"url": server.url, "log_dir": server.log_dir, "options": options, "pid": os.getpid()}
            (Path(server.log_dir) / "engine.json").write_text(json.dumps(seen))

    def close(self) -> None:
        self.closed = True
        if self.server is not None and self.server.log_dir is not None:
            (Path(self.server.log_dir) / "closed").write_text("")
        super().close()


class DigitsEnv(Env):
    splits = ("train", "test")

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return (Message("user", f"Write digits after {int(self.np_random.integers(0, 1000))}."),), {}

    def step(self, action):
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        return (Message("user", "Done."),), share, True, False, {}


class StallingEngine(EmbeddedEngine):
    """The engine of the worker that claims `arm` never answers; with `hold-for-push` in the fault folder the
    others pause after their first 20 tokens until weights of version 1 arrive (at most a minute), so that a
    push lands mid-play however slow the machine is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall = False
        folder = os.environ.get("AGENTRL_FAULT_DIR")
        self.hold_for_push = bool(folder) and (Path(folder) / "hold-for-push").exists()
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

    def _step(self, new, epoch):
        # On the engine's thread, outside its lock (update_weights takes it): wait for the push.
        if self.hold_for_push and self.weight_version == 0 and self.stats.generated_tokens >= 20:
            deadline = time.monotonic() + 60
            while self.weight_version == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        super()._step(new, epoch)


class LateStallingEngine(EmbeddedEngine):
    async def generate(self, prompt_ids, sampling):
        folder = Path(os.environ.get("AGENTRL_FAULT_DIR", "/nonexistent"))
        if self.weight_version >= 1 and _claim(folder / "arm-late"):
            (folder / "claimed").write_text(str(os.getpid()))
            (folder / "stalled").write_text(str(os.getpid()))
            await asyncio.Event().wait()  # never set: the request is never answered
        return await super().generate(prompt_ids, sampling)


def _claim(path: Path) -> bool:
    """Whether this call took `path` (renamed away, so one caller of all the processes gets it)."""
    try:
        os.rename(path, f"{path}-{os.getpid()}")
    except FileNotFoundError:
        return False
    return True


class SlowEngine(EmbeddedEngine):
    async def generate(self, prompt_ids, sampling):
        slow = Path(os.environ["AGENTRL_FAULT_DIR"]) / "slow"
        try:
            if slow.read_text() == str(os.getpid()):
                await asyncio.sleep(1.0)
        except FileNotFoundError:
            pass
        return await super().generate(prompt_ids, sampling)


class SandboxEnv(Env):
    splits = ("train", "test")

    def __init__(self, hang_file: str = "", refuse_seeds=()):
        self.procs: list[subprocess.Popen] = []
        self.hang_file, self.refuse_seeds = hang_file, set(refuse_seeds)
        procs = self.procs

        @tool(policy=ToolPolicy(timeout_s=2 * HANG_S))
        def provision(seconds: int) -> str:
            """Start a sandbox and wait until it is ready.

            Args:
                seconds: How long the sandbox takes to start.
            """
            proc = subprocess.Popen(["sleep", str(seconds)])
            procs.append(proc)
            proc.wait()
            return "ready"

        self.executor = ToolExecutor([provision])

    async def areset(self, *, seed=None, options=None):
        call = ToolCall("provision", {"seconds": HANG_S if self._claim() else 0}, "c0")
        [result] = await self.executor.execute([call])
        if result.error_kind is not None:
            raise InfrastructureFault(result.content)
        return self.reset(seed=seed, options=options)

    def _claim(self) -> bool:
        if not self.hang_file:
            return False
        try:
            os.rename(self.hang_file, f"{self.hang_file}-{os.getpid()}")
        except FileNotFoundError:
            return False
        return True

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        refuse = " REFUSE-ME" if seed in self.refuse_seeds else ""
        return (Message("user", f"Write digits after {seed}.{refuse}"),), {}

    def step(self, action):
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        return (), share, True, False, {}

    def close(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()
