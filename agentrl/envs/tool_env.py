"""`ToolEnv`: the common case of an environment whose model calls tools, then answers.

Each turn the model either calls tools (the env runs them and returns their output as `tool`
messages) or answers (the env scores the answer and the episode ends). A subclass supplies tasks
(`sample_task`) and a scorer (`score`); everything about tool calls — parsing, validation,
timeouts, errors shown to the model, error counts — is handled here.

Tools that work on per-episode state take a `ToolContext` (see `agentrl.tools.context`): at every
reset the env makes a fresh one holding the task and `new_state(task)`, passes it to those tools,
adds the rewards they give to the turn's reward, and ends the episode when one of them calls
`end`. Methods marked `@env_tool` are tools too, bound to the env instance.

Every tool message carries the id of the call it answers (`tool_call_id`): chat templates that
pair calls with results need it, and some (Mistral's) refuse ids of any other format than nine
alphanumeric characters. Calls are numbered through the episode (`call_id`); an unreadable call
gets an id of its own, so every tool message has one.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import replace
from collections.abc import Sequence
from typing import Any

from agentrl.envs.core import Env, Message, Observation, Task
from agentrl.errors import EnvError
from agentrl.tools.blocking import run_blocking
from agentrl.tools.context import ToolContext
from agentrl.tools.core import Tool, Toolset, ToolResult, bound_env_tools, call_id
from agentrl.tools.executor import DEFAULT_MAX_OBSERVATION_CHARS, ToolExecutor
from agentrl.tools.parsers import bind_parser

# A turn longer than this is parsed in a worker thread: parsing is linear, but a megabyte still
# takes tens of milliseconds that every episode sharing the event loop would wait for.
PARSE_OFF_LOOP_CHARS = 64 * 1024


class ToolEnv(Env):
    """An environment that owns tools and scores a final answer.

    Args:
        tools: The tools offered to the model; a `Toolset` (an MCP server's tools, say) gives its
            tools and is closed with the env. Methods marked `@env_tool` are added after these.
        parser: Name of the tool-call parser (`hermes` by default); it is given the tools' parameter
            schemas, which `qwen3_coder` uses to type each value.
        max_calls_per_turn: Calls beyond this in one turn are not run; one tool message says so.
        system_prompt: Optional system message placed before the task.
        max_observation_chars: Total characters of one turn's tool messages; what passes it is
            cut or withheld with a marker saying so.
        tool_error_reward: Added to a turn's reward for each of its failed tool calls (e.g. -0.1 to
            penalise malformed or invalid calls); 0 by default.

    Subclasses implement `sample_task(split, seed) -> Task` and `score(task, answer_text) -> float`,
    may override `new_state(task)` for the state their tools share within an episode, and may
    implement `answer_key(task, answer_text)` so that `agentrl eval` can report maj@k.
    """

    def __init__(
        self,
        tools: Sequence[Tool | Toolset] = (),
        parser: str = "hermes",
        max_calls_per_turn: int = 8,
        system_prompt: str | None = None,
        max_observation_chars: int = DEFAULT_MAX_OBSERVATION_CHARS,
        tool_error_reward: float = 0.0,
    ):
        self.toolsets = tuple(t for t in tools if not isinstance(t, Tool) and isinstance(t, Toolset))
        try:  # a toolset holds a resource (a server): a refused env must not keep it
            self.tools = _unique_tools([t for item in tools for t in ((item,) if isinstance(item, Tool) else
                                                                     _toolset_tools(item))] + bound_env_tools(self))
            if not math.isfinite(tool_error_reward):
                raise EnvError(f"tool_error_reward must be a finite number, got {tool_error_reward!r}")
        except BaseException:
            for toolset in self.toolsets:
                toolset.close()
            raise
        self.tool_error_reward = float(tool_error_reward)
        self.context: ToolContext | None = None
        self.parser_name = parser
        self.parse = bind_parser(parser, {t.name: t.parameters for t in self.tools})
        self.executor = ToolExecutor(self.tools, max_calls_per_turn=max_calls_per_turn,
                                     max_observation_chars=max_observation_chars)
        self.system_prompt = system_prompt
        self.task: Task | None = None
        self._done = True
        self._calls_numbered = 0

    # -- to implement ------------------------------------------------------------------------
    def sample_task(self, split: str, seed: int) -> Task:
        raise NotImplementedError(f"{type(self).__name__} must implement sample_task(split, seed)")

    def score(self, task: Task, answer: str) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement score(task, answer)")

    def new_state(self, task: Task) -> Any:
        """The state this episode's tools share (`ToolContext.state`); a fresh dict by default."""
        return {}

    def answer_key(self, task: Task, answer: str) -> str | None:
        """The final answer in a canonical form, or None when it states none (optional; default None).

        Two answers with equal keys are the same answer: `agentrl eval` votes on keys for maj@k, so
        equal keys must score alike (e.g. the last number of the text, when the scorer checks it).
        The key goes out as `info["answer_key"]` of the final step.
        """
        return None

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
        if self.context is not None:
            self.context.close()  # a late call of the last episode must not touch this one
        self.context = ToolContext(self.task, self.new_state(self.task))
        self._done = False
        self._calls_numbered = 0
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
        if len(action) > PARSE_OFF_LOOP_CHARS:  # same result either way; only where the time is spent differs
            parsed = await asyncio.to_thread(self.parse, action)
        else:
            parsed = self.parse(action)
        if not parsed.calls and not parsed.issues:
            self._end_episode()
            reward = float(self.score(self.task, action))
            info: dict[str, Any] = {"tool_errors": {}, "answer": parsed.content}
            key = self.answer_key(self.task, action)
            if key is not None:
                info["answer_key"] = key
            return (), reward, True, False, info
        before = Counter(self.executor.error_counts)
        calls = [replace(c, id=self._next_call_id()) for c in parsed.calls]
        results = await self.executor.execute(calls, parsed.issues, self.context)
        errors = dict(self.executor.error_counts - before)
        obs: Observation = tuple(self._tool_message(r) for r in results)
        info = {"tool_errors": errors, "tool_calls": len(parsed.calls)}
        reward = self.tool_error_reward * sum(errors.values())
        ctx = self.context
        if ctx is not None:
            problem = ctx.take_problem()
            if problem is not None:
                self._end_episode()
                raise EnvError(f"a tool of {type(self).__name__} broke the reward contract: {problem}")
            given = ctx.take_rewards()
            reward += sum(r.amount for r in given)
            if given:
                info["tool_rewards"] = [(r.amount, r.reason) for r in given]
            if ctx.ended is not None:
                info["ended_by"] = ctx.ended
                self._end_episode()
                return obs, reward, True, False, info
        return obs, reward, False, False, info

    def _end_episode(self) -> None:
        self._done = True
        if self.context is not None:
            self.context.close()

    def close(self) -> None:
        """Close the episode's context and every toolset given to the env (each once)."""
        self._end_episode()
        sets, self.toolsets = self.toolsets, ()
        for toolset in sets:
            toolset.close()

    def tool_call_id(self, n: int) -> str:
        """The id of the episode's `n`-th tool call (override for a template that wants another format)."""
        return call_id(n)

    def _next_call_id(self) -> str:
        self._calls_numbered += 1
        return self.tool_call_id(self._calls_numbered - 1)

    def _tool_message(self, result: ToolResult) -> Message:
        return Message("tool", result.content, name=result.name or None,
                       tool_call_id=result.call_id or self._next_call_id() or None)


def _toolset_tools(item: object) -> Sequence[Tool]:
    if not isinstance(item, Toolset):
        raise EnvError(f"ToolEnv's tools must be Tools (made with @tool) or Toolsets, got {type(item).__name__}")
    return item.tools()


def _unique_tools(tools: list[Tool]) -> tuple[Tool, ...]:
    names = [t.name for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EnvError(f"two tools of the env are named {twice}; the model calls tools by name, so rename one")
    return tuple(tools)
