"""Play any Gymnasium env with a Discrete action space as a multi-turn text env.

Classic control and toy-text games are the cheapest multi-turn tasks there are: no tools to
sandbox, exact rewards, and episodes of a few to a hundred turns. `GymTextEnv` renders the inner
env's state as a chat message, reads one action per model turn, and passes reward, terminated
and truncated through unchanged.

An action can be written four ways (names are case-insensitive, numbers are the Gymnasium ids):

* `<action>left</action>` or `<action>0</action>`;
* a tool call in the env's parser format (hermes by default) to the one tool it offers, e.g.
  `<tool_call>{"name": "move", "arguments": {"direction": "left"}}</tool_call>`;
* the call written as code, `move(left)` or `move(direction="left")`;
* the bare name or number as the whole turn.

Anything else is an invalid action: the model gets a message naming the valid actions, the
episode goes on (the turn still counts towards `max_turns`), `info["invalid_actions"]` counts it,
and it earns `invalid_action_reward` (0 unless the game sets a cost).

Splits: a task is the inner env reset with a seed. Each split draws its Gymnasium seeds from its
own range, and a task belongs to `test` iff a hash of its rendered initial state falls in one
bucket of `test_buckets`; so two splits never share an initial state, even for games whose seeds
map onto few distinct starts (a Blackjack deal, a small FrozenLake map). Games whose start never
depends on the seed need a task generator (see the `agentrl-gym-text` package, environments/gym_text).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

import gymnasium as gym
import numpy as np

from agentrl.envs.core import Env, Message
from agentrl.errors import EnvError
from agentrl.tools.parsers import get_parser

MAX_TASK_ATTEMPTS = 1000
_SEED_RANGE = 1 << 30  # split i draws Gymnasium seeds from [i * 2**30, (i + 1) * 2**30)
_ACTION_TAG = re.compile(r"<action>(.*?)</action>", re.S | re.I)
_CALL_SYNTAX = re.compile(r"\b([A-Za-z_]\w*)\(\s*(?:\w+\s*=\s*)?[\"']?([\w\- ]{1,40}?)[\"']?\s*\)")


def to_jsonable(value: Any) -> Any:
    """A copy of `value` made of JSON types only (numpy arrays to lists, numpy scalars to Python)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _bucket(text: str, buckets: int) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % buckets


class GymTextEnv(Env):
    """A Gymnasium env with Discrete actions, played through text.

    Subclasses adapt a specific game by setting `gym_id`, `action_names`, `tool_name` and
    `tool_argument`, and overriding `rules`, `render_state`, `describe_end`, `build_inner` or
    `expert_action`; the defaults work for any Discrete-action env (actions are then numbers).

    Args:
        gym_id: Gymnasium id to wrap (defaults to the class's `gym_id`).
        max_turns: Turns (valid or not) after which the episode is truncated.
        parser: Tool-call parser used for the tool-call form of an action.
        system_prompt: Optional system message placed before the first observation.
        invalid_action_reward: Reward for an unreadable reply (default: the class's, 0 in the adapter).
        **gym_kwargs: Passed to `gymnasium.make`.

    Example:
        >>> env = GymTextEnv("CartPole-v1")
        >>> obs, info = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, info = env.step("<action>1</action>")
    """

    gym_id: str = ""
    #: Names of the Discrete actions in order; empty means "use the numbers".
    action_names: tuple[str, ...] = ()
    tool_name: str = "act"
    tool_argument: str = "action"
    test_buckets: int = 5
    #: Reward for a reply that is not a readable action. 0 is right only where no move can lose
    #: reward; a game whose moves cost something (a step, a lost hand) sets at least that cost,
    #: or RL learns to write invalid replies instead of playing.
    invalid_action_reward: float = 0.0

    def __init__(self, gym_id: str | None = None, *, max_turns: int = 100, parser: str = "hermes",
                 system_prompt: str | None = None, invalid_action_reward: float | None = None, **gym_kwargs: Any):
        self.gym_id = gym_id or self.gym_id
        if invalid_action_reward is not None:
            if not np.isfinite(invalid_action_reward):
                raise EnvError(f"invalid_action_reward must be a finite number, got {invalid_action_reward}")
            self.invalid_action_reward = float(invalid_action_reward)
        if not self.gym_id:
            raise EnvError(f"{type(self).__name__} needs a Gymnasium id, e.g. GymTextEnv('FrozenLake-v1')")
        if max_turns < 1:
            raise EnvError(f"max_turns must be >= 1, got {max_turns}")
        if len(self.splits) > 2:
            raise EnvError(f"GymTextEnv supports one or two splits, got {self.splits}")
        self.max_turns = max_turns
        self.system_prompt = system_prompt
        self.gym_kwargs = gym_kwargs
        self.parse = get_parser(parser)
        self.inner: gym.Env | None = None
        self.inner = self.build_inner(0)
        space = self.inner.action_space
        if not isinstance(space, gym.spaces.Discrete):
            raise EnvError(f"{self.gym_id} has action space {space}; GymTextEnv needs a Discrete one")
        self.num_actions = int(space.n)
        if self.action_names and len(self.action_names) != self.num_actions:
            raise EnvError(f"{type(self).__name__} names {len(self.action_names)} actions, {self.gym_id} has "
                           f"{self.num_actions}")
        self._names = self.action_names or tuple(str(i) for i in range(self.num_actions))
        self._done = True
        self._turns = self._invalid = 0
        self._planned: tuple[dict, np.ndarray] | None = None

    # -- what a subclass adapts ----------------------------------------------------------------
    def build_inner(self, gym_seed: int) -> gym.Env:
        """The inner env for a task; the default makes one env and reuses it for every task."""
        if self.inner is None:
            return gym.make(self.gym_id, disable_env_checker=True, **self.gym_kwargs)
        return self.inner

    def rules(self) -> str:
        """What the game is and how to win (first paragraph of the first message)."""
        return f"You are playing the Gymnasium environment {self.gym_id}. Maximise the total reward."

    def render_state(self, obs: Any) -> str:
        """The state as text; also the key that decides which split a task belongs to."""
        if isinstance(obs, np.ndarray):
            return "Observation: " + np.array2string(obs, precision=4, separator=", ")
        return f"Observation: {to_jsonable(obs)}"

    def describe_end(self, reward: float, terminated: bool) -> str:
        """A line appended to the last observation of an episode."""
        return "The episode is over." if terminated else "The turn limit is reached; the episode is over."

    def expert_action(self) -> int | None:
        """A good action in the current state for demonstrations, or None to act at random.

        The default acts greedily on optimal action values when the inner env exposes a toy-text
        transition table `P` (FrozenLake, CliffWalking, Taxi); they are computed once per table.
        """
        unwrapped = self.inner.unwrapped if self.inner is not None else None
        table, state = getattr(unwrapped, "P", None), getattr(unwrapped, "s", None)
        if table is None or state is None:
            return None
        if self._planned is None or self._planned[0] is not table:
            self._planned = (table, plan_q_values(table))
        q = self._planned[1][int(state)]
        return None if q.max() == q.min() else int(q.argmax())

    # -- the Gymnasium contract ------------------------------------------------------------
    def tool_schemas(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {
            "name": self.tool_name,
            "description": "Take one action in the game.",
            "parameters": {"type": "object",
                           "properties": {self.tool_argument: {"type": "string", "enum": list(self._names)}},
                           "required": [self.tool_argument], "additionalProperties": False},
        }}]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        split = (options or {}).get("split", self.splits[0])
        if split not in self.splits:
            raise EnvError(f"unknown split {split!r}; this env has {self.splits}")
        task_seed = int(self.np_random.integers(0, 2**31 - 1)) if seed is None else int(seed)
        obs, gym_info, gym_seed, state = self._draw_task(split, task_seed)
        self._done, self._turns, self._invalid = False, 0, 0
        first = f"{self.rules()}\n\n{state}\n\n{self._action_help()}"
        messages = ([Message("system", self.system_prompt)] if self.system_prompt else []) + [Message("user", first)]
        info = {"task_id": f"{split}-{task_seed}", "split": split, "gym_seed": gym_seed,
                "gym_info": to_jsonable(gym_info)}
        return tuple(messages), info

    def _draw_task(self, split: str, task_seed: int) -> tuple[Any, dict, int, str]:
        base = self.splits.index(split) * _SEED_RANGE
        for attempt in range(MAX_TASK_ATTEMPTS):
            digest = hashlib.sha256(f"{task_seed}:{attempt}".encode()).digest()
            gym_seed = base + int.from_bytes(digest[:4], "little") % _SEED_RANGE
            inner = self.build_inner(gym_seed)
            if self.inner is not None and inner is not self.inner:
                self.inner.close()
            self.inner = inner
            obs, gym_info = self.inner.reset(seed=gym_seed)
            state = self.render_state(obs)
            if self._split_of(state) == split:
                return obs, gym_info, gym_seed, state
        raise EnvError(f"{self.gym_id}: no task of split {split!r} in {MAX_TASK_ATTEMPTS} draws; its initial state "
                       "does not depend on the seed, so give the adapter a task generator (see environments/gym_text)")

    def _split_of(self, state: str) -> str:
        if len(self.splits) == 1:
            return self.splits[0]
        return self.splits[1] if _bucket(state, self.test_buckets) == 0 else self.splits[0]

    def step(self, action: str):
        if self._done or self.inner is None:
            raise EnvError("step() called on a finished episode; call reset() first")
        if not isinstance(action, str):
            raise EnvError(f"action must be the model's text (str), got {type(action).__name__}")
        self._turns += 1
        index, error, via_tool = self.read_action(action)
        role, name = ("tool", self.tool_name) if via_tool else ("user", None)
        if index is None:
            self._invalid += 1
            truncated = self._turns >= self.max_turns
            self._done = truncated
            cost = f" Reward: {self.invalid_action_reward:g}." if self.invalid_action_reward else ""
            text = f"Invalid action: {error}.{cost} {self._action_help()}"
            if truncated:
                text += "\n" + self.describe_end(self.invalid_action_reward, False)
            info = {"action": None, "invalid_action": True, "invalid_actions": self._invalid, "turn": self._turns}
            return (Message(role, text, name=name),), self.invalid_action_reward, False, truncated, info
        obs, reward, terminated, truncated, gym_info = self.inner.step(index)
        reward, terminated = float(reward), bool(terminated)
        truncated = bool(truncated) or self._turns >= self.max_turns
        self._done = terminated or truncated
        text = f"You chose {self._names[index]}. Reward: {reward:g}.\n\n{self.render_state(obs)}"
        if self._done:
            text += "\n\n" + self.describe_end(reward, terminated)
        info = {"action": self._names[index], "invalid_action": False, "invalid_actions": self._invalid,
                "turn": self._turns, "gym_info": to_jsonable(gym_info)}
        return (Message(role, text, name=name),), reward, terminated, truncated, info

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self._done = True

    # -- reading actions -------------------------------------------------------------------
    def _action_help(self) -> str:
        listed = ", ".join(n if n == str(i) else f"{n} ({i})" for i, n in enumerate(self._names))
        return (f"Valid actions: {listed}. Reply with exactly one action, e.g. <action>{self._names[0]}</action> "
                f"or a call to the {self.tool_name} tool.")

    def resolve(self, token: str) -> tuple[int | None, str]:
        """Map an action name or number to its index; (None, why) when it is neither."""
        word = token.strip().strip("\"'`").strip().lower()
        if word in self._names:
            return self._names.index(word), ""
        if word.isascii() and word.isdigit() and len(word) <= 6 and int(word) < self.num_actions:
            return int(word), ""
        return None, f"{token.strip()[:40]!r} is not an action"

    def read_action(self, text: str) -> tuple[int | None, str, bool]:
        """(action index or None, why it is invalid, whether it came as a tool call)."""
        tags = _ACTION_TAG.findall(text)
        if len(tags) > 1:
            return None, f"found {len(tags)} <action> tags; give exactly one action per turn", False
        if tags:
            return (*self.resolve(tags[0]), False)
        parsed = self.parse(text)
        if parsed.issues:
            return None, f"the tool call could not be read: {parsed.issues[0].message}", True
        if len(parsed.calls) > 1:
            return None, f"found {len(parsed.calls)} tool calls; give exactly one action per turn", True
        if parsed.calls:
            call = parsed.calls[0]
            if call.name != self.tool_name:
                return None, f"there is no tool {call.name[:40]!r}; the only tool is {self.tool_name!r}", True
            value = call.arguments.get(self.tool_argument)
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                return None, f"{self.tool_name} needs a string argument {self.tool_argument!r}", True
            return (*self.resolve(str(value)), True)
        written = [m.group(2) for m in _CALL_SYNTAX.finditer(text) if m.group(1) == self.tool_name]
        if len(written) > 1:
            return None, f"found {len(written)} calls of {self.tool_name}; give exactly one action per turn", False
        if written:
            return (*self.resolve(written[0]), False)
        bare = text.strip().rstrip(".!")
        if bare and len(bare) <= 40:
            index, _ = self.resolve(bare)
            if index is not None:
                return index, "", False
        return None, "no action found in your reply", False

    # -- demonstrations --------------------------------------------------------------------
    def scripted_action(self, rng: random.Random, tool_use_prob: float = 1.0,
                        last_tool_output: str | None = None) -> str:
        """A demonstrator's turn: the expert action with probability `tool_use_prob`, else a random one.

        Same signature as the calculator's demonstrator, so the tiny-model recipe can imitate it;
        `last_tool_output` is unused here.
        """
        expert = self.expert_action() if rng.random() < tool_use_prob else None
        index = expert if expert is not None else rng.randrange(self.num_actions)
        return f"<action>{self._names[index]}</action>"


def plan_q_values(table: dict, gamma: float = 0.99, tol: float = 1e-6, max_iters: int = 10_000) -> np.ndarray:
    """Optimal action values `Q[state, action]` of a toy-text transition table, by value iteration.

    `table` is Gymnasium's `P[state][action] = [(prob, next_state, reward, terminated), ...]`
    (FrozenLake, CliffWalking, Taxi). Outcomes are padded to a common count with zero probability
    so that one iteration is a few array operations.
    """
    states, actions = len(table), len(table[0])
    width = max(len(outs) for acts in table.values() for outs in acts.values())
    prob = np.zeros((states, actions, width))
    nxt = np.zeros((states, actions, width), dtype=np.int64)
    reward = np.zeros((states, actions, width))
    alive = np.zeros((states, actions, width))
    for s, acts in table.items():
        for a, outs in acts.items():
            for k, (p, n, r, done) in enumerate(outs):
                prob[s, a, k], nxt[s, a, k], reward[s, a, k], alive[s, a, k] = p, n, r, 0.0 if done else 1.0
    values = np.zeros(states)
    for _ in range(max_iters):
        q = (prob * (reward + gamma * alive * values[nxt])).sum(axis=2)  # [S, A]
        new = q.max(axis=1)
        if np.abs(new - values).max() < tol:
            break
        values = new
    return q
