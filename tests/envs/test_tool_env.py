"""`ToolEnv`'s tool messages: every one carries the id of the call it answers, in one format for all templates."""

from __future__ import annotations

import json
import re

from agentrl.envs import make
from agentrl.tools.core import call_id


def _call(expr) -> str:
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "</tool_call>"


def test_call_ids_are_nine_alphanumeric_characters():
    # "call" + n in five base-36 digits: 35 is "z", 36 is "10", 36**2 is "100".
    assert [call_id(0), call_id(35), call_id(36), call_id(36**2)] == \
        ["call00000", "call0000z", "call00010", "call00100"]
    assert all(re.fullmatch(r"[a-z0-9]{9}", call_id(n)) for n in (0, 7, 36**5 - 1, 36**5))
    assert len({call_id(n) for n in range(5000)}) == 5000


def test_every_tool_message_answers_its_call():
    env = make("calculator-v0")
    env.reset(seed=1)
    obs, *_ = env.step(_call("1 + 2") + _call("2 * 3") + "<tool_call>{broken</tool_call>")
    # Results come parse issues first; the calls were numbered first, the unreadable one after them.
    assert [(m.content, m.tool_call_id) for m in obs] == [
        (obs[0].content, "call00002"), ("3", "call00000"), ("6", "call00001")]
    assert obs[0].content.startswith("Error (parse)")
    obs, *_ = env.step(_call("4 - 1"))
    assert [m.tool_call_id for m in obs] == ["call00003"]  # numbered through the episode
    env.reset(seed=1)
    obs, *_ = env.step(_call("1 + 2"))
    assert [m.tool_call_id for m in obs] == ["call00000"]  # and afresh in the next one


def test_rate_limited_calls_have_ids_too():
    env = make("calculator-v0", max_calls_per_turn=1)
    env.reset(seed=0)
    obs, *_ = env.step(_call("1 + 1") + _call("2 + 2"))
    assert [m.tool_call_id for m in obs] == ["call00000", "call00001"]
    assert obs[1].content.startswith("Error (rate_limited)")
