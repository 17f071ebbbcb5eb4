"""`ToolContext`: what a tool may read and change of the episode that called it.

A tool that works on per-episode state (the secret word of a guessing game, a board, a scratch
directory) declares one parameter annotated `ToolContext`. That parameter is left out of the
tool's JSON schema, so the model never sees or fills it; the executor passes the calling episode's
context in. Through it the tool reads the task and the env's per-episode `state`, gives
tool-level rewards or penalties (`reward`), and may end the episode (`end`).

Why a context argument rather than attributes of the env: a call that passed its timeout is
abandoned, not killed, and may return after its episode ended and the env was reset for the next
one. Each episode gets a fresh context; once its episode is over the context is closed, so a late
call changes only the old episode's state object, and its `reward`/`end` are ignored (and logged).

Example:
    >>> @tool
    ... def guess(word: str, ctx: ToolContext) -> str:
    ...     '''Guess the secret word.
    ...
    ...     Args:
    ...         word: Your guess.
    ...     '''
    ...     if word == ctx.state["secret"]:
    ...         ctx.reward(1.0, "solved")
    ...         ctx.end("solved")
    ...         return "correct"
    ...     ctx.reward(-0.1, "wrong guess")
    ...     return "wrong"
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolReward:
    """One reward (or penalty, when negative) a tool gave through `ToolContext.reward`."""

    amount: float
    reason: str = ""


class ToolContext:
    """The calling episode, as its tools see it.

    Attributes:
        task: The episode's task (an `agentrl.envs.Task` for a `ToolEnv`).
        state: The env's per-episode state, made by `ToolEnv.new_state(task)` at every reset
            (a fresh `dict` by default). Tools read and change it freely: the calls of one turn
            that take a context run one after another, in the order the model wrote them.
    """

    def __init__(self, task: Any = None, state: Any = None):
        self.task = task
        self.state = {} if state is None else state
        self._lock = threading.Lock()  # sync tools run on their own threads
        self._rewards: list[ToolReward] = []
        self._ended: str | None = None
        self._closed = False
        self._problem: str | None = None

    @property
    def closed(self) -> bool:
        """True once the episode is over (ended, or its env reset or closed)."""
        return self._closed

    @property
    def ended(self) -> str | None:
        """The reason given to `end`, or None while the episode goes on."""
        return self._ended

    def reward(self, amount: float, reason: str = "") -> None:
        """Add `amount` (negative for a penalty) to the reward of the current turn.

        Raises:
            ValueError: `amount` is not a finite number (the episode then fails as an env error:
                a NaN reward would poison the batch's advantages).
        """
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not math.isfinite(amount):
            self._problem = f"ToolContext.reward got {amount!r}; rewards must be finite numbers"
            raise ValueError(self._problem)
        with self._lock:
            if self._closed:
                logger.warning("a tool gave the reward %r (%s) after its episode was over; it is ignored", amount,
                               reason[:80])
                return
            self._rewards.append(ToolReward(float(amount), str(reason)))

    def end(self, reason: str = "") -> None:
        """End the episode after this turn (the env returns terminated=True)."""
        with self._lock:
            if self._closed:
                logger.warning("a tool ended an episode that was already over (%s); it is ignored", reason[:80])
                return
            self._ended = str(reason) or "ended by a tool"

    # -- for the env that owns the context ----------------------------------------------------
    def take_rewards(self) -> list[ToolReward]:
        """The rewards given since the last call (the env calls it once per turn)."""
        with self._lock:
            out, self._rewards = self._rewards, []
        return out

    def take_problem(self) -> str | None:
        """The text of a bad `reward` call since the last call, if any."""
        out, self._problem = self._problem, None
        return out

    def close(self) -> None:
        """Mark the episode over: later `reward`/`end` calls (from an abandoned call) are ignored."""
        with self._lock:
            self._closed = True
