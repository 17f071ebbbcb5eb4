"""The environment contract: a Gymnasium env whose observations are chat messages.

`reset(seed=None, options=None) -> (observation, info)` and
`step(action) -> (observation, reward, terminated, truncated, info)` keep Gymnasium's signatures.
An observation is a tuple of `Message`s to append to the conversation; an action is the model's
turn as text. The rollout loop calls the async twins `areset`/`astep`; by default they run the sync
methods in a worker thread, and tool environments implement them natively.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import gymnasium as gym
from gymnasium import spaces

Observation = tuple["Message", ...]

#: Upper bound on the length of one model turn, for the declared action space.
MAX_ACTION_CHARS = 1 << 20


@dataclass(frozen=True)
class Message:
    """One chat message. `role` is system, user, assistant or tool."""

    role: str
    content: str
    name: str | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The plain dict chat templates expect."""
        out = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Task:
    """One problem instance drawn from a split."""

    id: str
    prompt: str
    answer: str
    split: str = "train"
    metadata: dict[str, Any] = field(default_factory=dict)


class MessagesSpace(spaces.Space):
    """The space of observations: a tuple of `Message`s."""

    def __init__(self):
        super().__init__(shape=None, dtype=None)

    def contains(self, x: Any) -> bool:
        return isinstance(x, tuple) and all(isinstance(m, Message) for m in x)

    def sample(self, mask: Any = None, probability: Any = None) -> Observation:
        return (Message("user", "hello"),)


class Env(gym.Env):
    """Base class of agentrl environments.

    Subclasses set `splits` and implement `reset` and `step` (or `areset`/`astep`).
    """

    metadata = {"render_modes": []}
    #: The task splits this env can draw from; held-out evaluation uses a split, not a separate path.
    splits: tuple[str, ...] = ("train", "test")
    #: How the driver treats this env's failed episodes, by failure class, where the config leaves it
    #: open (e.g. `{"env_error": "retry"}` for an env whose errors are transient); see docs/training.md.
    failure_policy: Mapping[str, str] = MappingProxyType({})
    observation_space = MessagesSpace()
    action_space = spaces.Text(max_length=MAX_ACTION_CHARS)

    def tool_schemas(self) -> list[dict[str, Any]]:
        """OpenAI-style schemas of the tools the model may call (rendered by the chat template)."""
        return []

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        return await asyncio.to_thread(self.reset, seed=seed, options=options)

    async def astep(self, action: str):
        return await asyncio.to_thread(self.step, action)
