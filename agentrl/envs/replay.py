"""Record an env's episodes to JSONL and replay them, exactly, without the env or its tools.

A recording is a regression test that needs no model, network, sandbox or Gymnasium: wrap the
env in `RecordingEnv` while something plays it (a scripted policy, a model in a rollout), then
`ReplayEnv(path)` serves the same observations, rewards, flags and infos back to anyone who
sends the same actions, and raises `ReplayDivergence` at the first action that differs.
Tool calls are part of the action (the model's text) and their outputs part of the observation,
so replay runs no tool.

One line per event, in order: a header, then `reset`, `step` and `error` events; each `reset`
starts an episode. Values are encoded so that they decode to equal values of the same types
(tuples, `Message`s, numpy arrays and scalars are tagged); floats are written with `repr`, so
they come back bit for bit. A value that cannot be encoded raises `EnvError` while recording,
naming where it is, rather than being replayed as something else. An exception raised by the
env is recorded and raised again (as `EnvError`) on replay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import numpy as np

from agentrl.envs.core import Env, Message
from agentrl.errors import EnvError

FORMAT, VERSION = "agentrl-replay", 1
_TAGS = ("__tuple__", "__message__", "__ndarray__", "__npscalar__", "__dict__")


class ReplayDivergence(EnvError):
    """A replayed call differs from the recording (another action, seed or option)."""


def encode(value: Any, path: str = "$") -> Any:
    """A JSON-ready form of `value` that `decode` turns back into an equal value of the same type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Message):
        return {"__message__": [value.role, value.content, value.name, value.tool_call_id]}
    if isinstance(value, list):
        return [encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: encode(v, f"{path}.{k}") for k, v in value.items()}
        return {"__dict__": [[encode(k, path), encode(v, f"{path}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, np.ndarray) and value.dtype != object:
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return {"__npscalar__": value.item(), "dtype": value.dtype.str}
    raise EnvError(f"cannot record a value of type {type(value).__name__} at {path}; record only JSON types, "
                   "tuples, Messages and numpy arrays or scalars (convert it in the env's info)")


def decode(value: Any) -> Any:
    """Inverse of `encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__message__" in value:
        return Message(*value["__message__"])
    if "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if "__npscalar__" in value:
        return np.dtype(value["dtype"]).type(value["__npscalar__"])
    if "__dict__" in value:
        return {decode(k): decode(v) for k, v in value["__dict__"]}
    return {k: decode(v) for k, v in value.items()}


def _env_name(env: Env) -> str:
    return getattr(env, "recorded_env", None) or f"{type(env).__module__}:{type(env).__qualname__}"


class RecordingEnv(Env):
    """Play `env` as usual and write every reset and step, inputs and outputs, to `path`.

    The file is truncated when the wrapper is built and flushed after each event, so a run that
    crashes leaves a readable recording. Attributes the wrapper does not have (`task`,
    `scripted_action`, ...) are looked up on the wrapped env.

    Args:
        env: The environment to record.
        path: The JSONL file to write.

    Example:
        >>> env = RecordingEnv(make("gym-frozenlake-v0"), "episode.jsonl")
        >>> obs, info = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, info = env.step("<action>right</action>")
        >>> env.close()
    """

    def __init__(self, env: Env, path: str | Path):
        self.env = env
        self.path = Path(path)
        self.splits = env.splits
        self.observation_space, self.action_space = env.observation_space, env.action_space
        self._file: IO[str] | None = self.path.open("w", encoding="ascii")
        self._write({"event": "header", "format": FORMAT, "version": VERSION, "env": _env_name(env),
                     "splits": list(env.splits), "tool_schemas": encode(env.tool_schemas())})

    def __getattr__(self, name: str) -> Any:
        if name == "env":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)

    def _write(self, event: dict[str, Any]) -> None:
        if self._file is None:
            raise EnvError(f"the recording {self.path} is closed")
        self._file.write(json.dumps(event, ensure_ascii=True) + "\n")
        self._file.flush()

    def _error(self, call: str, inputs: dict[str, Any], exc: BaseException) -> None:
        self._write({"event": "error", "call": call, **inputs, "type": type(exc).__name__, "message": str(exc)})

    def tool_schemas(self) -> list[dict[str, Any]]:
        return self.env.tool_schemas()

    def _record_reset(self, inputs: dict[str, Any], result: tuple) -> tuple:
        obs, info = result
        self._write({"event": "reset", **inputs, "observation": encode(obs), "info": encode(info)})
        return result

    def _record_step(self, action: Any, result: tuple) -> tuple:
        obs, reward, terminated, truncated, info = result
        self._write({"event": "step", "action": encode(action), "observation": encode(obs), "reward": encode(reward),
                     "terminated": encode(terminated), "truncated": encode(truncated), "info": encode(info)})
        return result

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        inputs = {"seed": seed, "options": encode(options)}
        try:
            result = self.env.reset(seed=seed, options=options)
        except Exception as exc:
            self._error("reset", inputs, exc)
            raise
        return self._record_reset(inputs, result)

    def step(self, action: str):
        try:
            result = self.env.step(action)
        except Exception as exc:
            self._error("step", {"action": encode(action)}, exc)
            raise
        return self._record_step(action, result)

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        inputs = {"seed": seed, "options": encode(options)}
        try:
            result = await self.env.areset(seed=seed, options=options)
        except Exception as exc:
            self._error("reset", inputs, exc)
            raise
        return self._record_reset(inputs, result)

    async def astep(self, action: str):
        try:
            result = await self.env.astep(action)
        except Exception as exc:
            self._error("step", {"action": encode(action)}, exc)
            raise
        return self._record_step(action, result)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.env.close()


def read_recording(path: str | Path) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """(header, episodes) of a recording; each episode is its reset event and the events after it."""
    lines = Path(path).read_text(encoding="ascii").splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    if not events or events[0].get("event") != "header" or events[0].get("format") != FORMAT:
        raise EnvError(f"{path} is not an agentrl recording (no '{FORMAT}' header on its first line)")
    if events[0].get("version") != VERSION:
        raise EnvError(f"{path} is a version {events[0].get('version')} recording; "
                       f"this agentrl reads version {VERSION}")
    episodes: list[list[dict[str, Any]]] = []
    for event in events[1:]:
        if event.get("call") == "reset" or event["event"] == "reset":
            episodes.append([])
        if not episodes:
            raise EnvError(f"{path}: a {event['event']} event comes before any reset")
        episodes[-1].append(event)
    return events[0], episodes


def _first_difference(expected: str, got: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return (f"they differ from character {i}: recorded {expected[max(0, i - 20): i + 40]!r}, "
            f"got {got[max(0, i - 20): i + 40]!r} (lengths {len(expected)} and {len(got)})")


class ReplayEnv(Env):
    """Serve a recording back: same calls in, the recorded results out; no env, no tools.

    Episodes replay in recorded order, one per `reset`. A call that differs from the recording
    (another seed, options or action) raises `ReplayDivergence`; a call the env raised on when it
    was recorded raises `EnvError` with the recorded message.

    Args:
        path: A file written by `RecordingEnv`.

    Example:
        >>> env = ReplayEnv("episode.jsonl")
        >>> obs, info = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, info = env.step("<action>right</action>")
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self.episodes = read_recording(self.path)
        self.recorded_env = self.header["env"]
        self.splits = tuple(self.header["splits"])
        self._episode = -1
        self._events: list[dict[str, Any]] = []
        self._turn = 0
        self._done = True

    def tool_schemas(self) -> list[dict[str, Any]]:
        return decode(self.header["tool_schemas"])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._episode += 1
        if self._episode >= len(self.episodes):
            raise ReplayDivergence(f"{self.path} holds {len(self.episodes)} episode(s); reset() number "
                                   f"{self._episode + 1} was not recorded")
        self._events, self._turn = self.episodes[self._episode], 1
        event = self._events[0]
        if event["seed"] != seed or decode(event["options"]) != options:
            raise ReplayDivergence(f"episode {self._episode} of {self.path} was reset with seed={event['seed']} "
                                   f"options={decode(event['options'])}, not seed={seed} options={options}")
        self._raise_if_error(event)
        self._done = False
        return decode(event["observation"]), decode(event["info"])

    def step(self, action: str):
        if self._done:
            raise EnvError("step() called on a finished episode; call reset() first")
        where = f"step {self._turn} of episode {self._episode} in {self.path}"
        if self._turn >= len(self._events):
            raise ReplayDivergence(f"{where} was not recorded: the recording of this episode ends after "
                                   f"{self._turn - 1} step(s)")
        event = self._events[self._turn]
        expected = decode(event["action"])
        if expected != action:
            detail = (_first_difference(expected, action) if isinstance(expected, str) and isinstance(action, str)
                      else f"recorded {expected!r}, got {action!r}")
            raise ReplayDivergence(f"{where}: the action differs from the recorded one; {detail}")
        self._turn += 1
        self._raise_if_error(event)
        result = tuple(decode(event[k]) for k in ("observation", "reward", "terminated", "truncated", "info"))
        self._done = bool(result[2] or result[3])
        return result

    def _raise_if_error(self, event: dict[str, Any]) -> None:
        if event["event"] == "error":
            self._done = True
            raise EnvError(f"(replayed) {event['call']}() raised {event['type']}: {event['message']}")

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        return self.reset(seed=seed, options=options)

    async def astep(self, action: str):
        return self.step(action)
