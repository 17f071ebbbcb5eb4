"""ToolContext: hidden from the schema, injected per episode, ordered within a turn, closed after its episode."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agentrl.envs.core import Task
from agentrl.envs.tool_env import ToolEnv
from agentrl.errors import EnvError, ToolErrorKind
from agentrl.tools.context import ToolContext
from agentrl.tools.core import ToolCall, ToolPolicy, env_tool, tool
from agentrl.tools.executor import ToolExecutor


@tool
def push(item: str, ctx: ToolContext) -> str:
    """Push an item on the episode's stack.

    Args:
        item: What to push.
    """
    time.sleep(0.01 if item == "a" else 0.0)  # the first call is the slow one: order must still hold
    ctx.state.setdefault("stack", []).append(item)
    return ",".join(ctx.state["stack"])


def test_the_context_parameter_is_not_in_the_schema():
    assert push.context_arg == "ctx"
    item = {"type": "string", "description": "What to push."}
    assert push.parameters == {"type": "object", "properties": {"item": item}, "required": ["item"],
                               "additionalProperties": False}


def test_context_calls_run_in_the_order_written_and_the_model_cannot_pass_the_context():
    ex = ToolExecutor([push])
    ctx = ToolContext(state={})
    calls = [ToolCall("push", {"item": x}, id=x) for x in "abc"] + [ToolCall("push", {"item": "d", "ctx": 1}, id="d")]
    results = asyncio.run(ex.execute(calls, context=ctx))
    assert [r.content for r in results[:3]] == ["a", "a,b", "a,b,c"]
    assert results[3].error_kind == ToolErrorKind.INVALID_ARGUMENTS
    assert ctx.state == {"stack": ["a", "b", "c"]}


def test_a_context_tool_outside_an_episode_is_a_clear_tool_error():
    [r] = asyncio.run(ToolExecutor([push]).execute([ToolCall("push", {"item": "a"})]))
    assert r.error_kind == ToolErrorKind.RUNTIME and "called outside an episode" in r.content


def test_rewards_and_end_are_taken_once_and_ignored_once_closed(caplog):
    ctx = ToolContext()
    ctx.reward(0.5, "good")
    ctx.reward(-1)
    assert [(r.amount, r.reason) for r in ctx.take_rewards()] == [(0.5, "good"), (-1.0, "")]
    assert ctx.take_rewards() == []
    ctx.close()
    ctx.reward(3.0, "late")
    ctx.end("late")
    assert ctx.take_rewards() == [] and ctx.ended is None
    assert "after its episode was over" in caplog.text
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="finite"):
            ToolContext().reward(bad)


class Counter(ToolEnv):
    """Count to a secret target with `add`; every add costs 0.1, reaching the target pays 1 and ends the episode."""

    def __init__(self, **kwargs):
        super().__init__([], **kwargs)

    def sample_task(self, split, seed):
        return Task(id=f"{split}-{seed}", prompt="Reach the target.", answer=str(3 + seed % 3), split=split)

    def new_state(self, task):
        return {"total": 0}

    def score(self, task, answer):
        return 0.0

    @env_tool(policy=ToolPolicy(timeout_s=0.3))
    def add(self, n: int, ctx: ToolContext) -> str:
        """Add n to the total.

        Args:
            n: How much to add.
        """
        if n == 99:
            time.sleep(0.6)  # past the timeout: abandoned, returns during a later episode
            ctx.state["total"] += n
            ctx.reward(5.0, "late")
            return "late"
        if n == 7:
            ctx.reward(float("nan"))
        ctx.state["total"] += n
        ctx.reward(-0.1, "step")
        if ctx.state["total"] == int(ctx.task.answer):
            ctx.reward(1.0, "reached")
            ctx.end("reached")
        return str(ctx.state["total"])


def _add(n) -> str:
    return "<tool_call>" + json.dumps({"name": "add", "arguments": {"n": n}}) + "</tool_call>"


def test_env_tools_work_on_episode_state_with_rewards_and_an_end():
    env = Counter()
    assert [t.name for t in env.tools] == ["add"] and "self" not in json.dumps(env.tool_schemas())
    env.reset(seed=0)  # target 3
    obs, reward, term, _, info = env.step(_add(1) + _add(1))
    assert [m.content for m in obs] == ["1", "2"] and reward == pytest.approx(-0.2) and not term
    assert info["tool_rewards"] == [(-0.1, "step"), (-0.1, "step")]
    obs, reward, term, _, info = env.step(_add(1))
    assert reward == pytest.approx(0.9) and term and info["ended_by"] == "reached"
    with pytest.raises(EnvError, match="finished episode"):
        env.step(_add(1))
    env.reset(seed=0)
    assert env.context.state == {"total": 0}  # a new episode starts from fresh state


def test_an_abandoned_call_cannot_touch_the_next_episode():
    env = Counter()
    env.reset(seed=1)
    old = env.context
    obs, reward, *_ = env.step(_add(99))
    assert obs[0].content.startswith("Error (timeout)") and reward == 0.0
    env.reset(seed=1)
    deadline = time.monotonic() + 3
    while old.state["total"] != 99 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old.state["total"] == 99  # it ran on, against its own episode's state
    assert env.context.state == {"total": 0}
    _, reward, *_ = env.step(_add(1))
    assert reward == pytest.approx(-0.1)  # its late reward went nowhere


def test_a_non_finite_tool_reward_fails_the_episode_as_an_env_error():
    env = Counter()
    env.reset(seed=0)
    with pytest.raises(EnvError, match="finite"):
        env.step(_add(7))


def test_tool_error_reward_penalises_each_failed_call():
    env = Counter(tool_error_reward=-0.5)
    env.reset(seed=0)
    _, reward, *_ = env.step(_add("x") + "<tool_call>{bad</tool_call>")
    assert reward == pytest.approx(-1.0)
    with pytest.raises(EnvError, match="finite"):
        Counter(tool_error_reward=float("nan"))


def test_two_tools_of_one_name_are_refused():
    with pytest.raises(EnvError, match="named \\['add'\\]"):
        ToolEnv.__init__(Counter.__new__(Counter), [Counter().tools[0]])


def test_toolsets_are_offered_and_closed_once():
    closed = []

    class Box:
        def tools(self):
            return [push]

        def close(self):
            closed.append(1)

    env = Counter.__new__(Counter)
    ToolEnv.__init__(env, [Box()])
    assert [t.name for t in env.tools] == ["push", "add"]
    env.close()
    env.close()
    assert closed == [1]
    with pytest.raises(EnvError, match=r"named \['push'\]"):  # refused: the toolset is closed, not leaked
        ToolEnv.__init__(Counter.__new__(Counter), [Box(), push])
    assert closed == [1, 1]
    with pytest.raises(EnvError, match="Tools .* or Toolsets"):
        ToolEnv.__init__(Counter.__new__(Counter), [object()])
