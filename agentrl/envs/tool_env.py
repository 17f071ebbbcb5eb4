"""`ToolEnv`: the common case of an environment whose model calls tools, then answers.

Each turn the model either calls tools (the env runs them and returns their output as `tool`
messages) or answers (the env scores the answer and the episode ends). A subclass supplies tasks
(`sample_task`) and a scorer (`score`); everything about tool calls — parsing, validation,
timeouts, errors shown to the model, error counts — is handled here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

from agentrl.envs.core import Env, Message, Observation, Task
from agentrl.errors import EnvError
from agentrl.tools.blocking import run_blocking
from agentrl.tools.core import Tool
from agentrl.tools.executor import DEFAULT_MAX_OBSERVATION_CHARS, ToolExecutor
from agentrl.tools.parsers import get_parser


class ToolEnv(Env):
    """An environment that owns tools and scores a final answer.

    Args:
        tools: The tools offered to the model.
        parser: Name of the tool-call parser (`hermes` by default).
        max_calls_per_turn: Calls beyond this in one turn are not run; one tool message says so.
        system_prompt: Optional system message placed before the task.
        max_observation_chars: Total characters of one turn's tool messages; what passes it is
            cut or withheld with a marker saying so.

    Subclasses implement `sample_task(split, seed) -> Task` and `score(task, answer_text) -> float`.
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        parser: str = "hermes",
        max_calls_per_turn: int = 8,
        system_prompt: str | None = None,
        max_observation_chars: int = DEFAULT_MAX_OBSERVATION_CHARS,
    ):
        self.tools = tuple(tools)
        self.parse = get_parser(parser)
        self.executor = ToolExecutor(self.tools, max_calls_per_turn=max_calls_per_turn,
                                     max_observation_chars=max_observation_chars)
        self.system_prompt = system_prompt
        self.task: Task | None = None
        self._done = True

    # -- to implement ------------------------------------------------------------------------
    def sample_task(self, split: str, seed: int) -> Task:
        raise NotImplementedError(f"{type(self).__name__} must implement sample_task(split, seed)")

    def score(self, task: Task, answer: str) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement score(task, answer)")

    # -- the Gymnasium contract ------------------------------------------------------------
    def tool_schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        split = options.get("split", "train")
        if split not in self.splits:
            raise EnvError(f"unknown split {split!r}; this env has {self.splits}")
        task_seed = int(self.np_random.integers(0, 2**31 - 1)) if seed is None else seed
        self.task = self.sample_task(split, task_seed)
        self._done = False
        obs: list[Message] = []
        if self.system_prompt:
            obs.append(Message("system", self.system_prompt))
        obs.append(Message("user", self.task.prompt))
        return tuple(obs), {"task_id": self.task.id, "split": split}

    def step(self, action: str):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # not asyncio.run: its shutdown would wait forever for an async tool that ignores cancellation
            return run_blocking(self.astep(action))
        raise EnvError("ToolEnv.step was called inside a running event loop; await env.astep(action) instead")

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        return self.reset(seed=seed, options=options)

    async def astep(self, action: str):
        if self._done or self.task is None:
            raise EnvError("step() called on a finished episode; call reset() first")
        if not isinstance(action, str):
            raise EnvError(f"action must be the model's text (str), got {type(action).__name__}")
        parsed = self.parse(action)
        if not parsed.calls and not parsed.issues:
            self._done = True
            reward = float(self.score(self.task, action))
            return (), reward, True, False, {"tool_errors": {}, "answer": parsed.content}
        before = Counter(self.executor.error_counts)
        results = await self.executor.execute(parsed.calls, parsed.issues)
        errors = dict(self.executor.error_counts - before)
        obs: Observation = tuple(Message("tool", r.content, name=r.name or None) for r in results)
        return obs, 0.0, False, False, {"tool_errors": errors, "tool_calls": len(parsed.calls)}
