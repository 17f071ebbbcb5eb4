"""Text renderings of Gymnasium's toy-text games, registered as `gym-<game>-v0`.

`GymTextEnv` plays any Discrete-action env with numbered actions and a generic rendering; a
model does much better with named actions, a drawn grid and the rules spelled out, which is what
these subclasses add. Two games also get a task generator so that their splits can be disjoint:
FrozenLake draws a random map per task (the stock map is a single task), and CliffWalking a random
start cell (the stock start is fixed).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from agentrl.envs.gym_adapter import GymTextEnv
from agentrl.errors import EnvError

_GRID_NOTE = "Rows are numbered from the top and columns from the left, both from 0."


def _grid(rows: list[list[str]]) -> str:
    return "\n".join(" ".join(row) for row in rows)


class FrozenLakeTextEnv(GymTextEnv):
    """FrozenLake: walk from S to G over frozen tiles without falling into a hole.

    Args:
        size: Side of the square map.
        is_slippery: Moves may slide sideways (Gymnasium's default); off here, so a plan works.
        random_map: Draw a new valid map per task (needed for disjoint splits); False plays
            Gymnasium's stock map of this size (4 or 8), one task only.
        frozen_prob: Probability that a tile of a random map is frozen.
        **kwargs: Passed to `GymTextEnv`.
    """

    gym_id = "FrozenLake-v1"
    action_names = ("left", "down", "right", "up")
    tool_name, tool_argument = "move", "direction"

    def __init__(self, size: int = 4, is_slippery: bool = False, random_map: bool = True, frozen_prob: float = 0.8,
                 **kwargs: Any):
        self.size, self.random_map, self.frozen_prob = size, random_map, frozen_prob
        self.is_slippery = is_slippery
        if not random_map and size not in (4, 8):
            raise EnvError(f"Gymnasium's stock FrozenLake maps are 4x4 and 8x8, not {size}x{size}; "
                           "use random_map=True for other sizes")
        if not random_map:
            kwargs.setdefault("map_name", f"{size}x{size}")
        super().__init__(is_slippery=is_slippery, **kwargs)

    def build_inner(self, gym_seed: int) -> gym.Env:
        if not self.random_map:
            return super().build_inner(gym_seed)
        desc = generate_random_map(size=self.size, p=self.frozen_prob, seed=gym_seed)
        return gym.make(self.gym_id, disable_env_checker=True, desc=desc, **self.gym_kwargs)

    def rules(self) -> str:
        slip = (" The ice is slippery: a move may slide you sideways instead." if self.is_slippery else "")
        return ("You are crossing a frozen lake drawn as a grid: S is the start, F frozen ice (safe), H a hole, "
                "G the goal, A marks you. Reach G without stepping into a hole. Each move goes one tile left, down, "
                f"right or up; moving off the grid leaves you in place.{slip} Reaching G gives reward 1. {_GRID_NOTE}")

    def render_state(self, obs: Any) -> str:
        u = self.inner.unwrapped
        row, col = divmod(int(obs), int(u.ncol))
        rows = [[c.decode() for c in line] for line in u.desc]
        rows[row][col] = "A"
        return f"You (A) are at row {row}, column {col}.\n{_grid(rows)}"

    def describe_end(self, reward: float, terminated: bool) -> str:
        if not terminated:
            return "The turn limit is reached; the episode is over."
        return "You reached the goal!" if reward > 0 else "You fell into a hole. The episode is over."


class CliffWalkingTextEnv(GymTextEnv):
    """CliffWalking: reach G along a cliff edge; a step onto the cliff costs -100 and sends you to S.

    Args:
        random_start: Start each task on a random safe cell (needed for disjoint splits); False
            always starts at S, one task only.
        **kwargs: Passed to `GymTextEnv` (and `is_slippery` to Gymnasium).
    """

    gym_id = "CliffWalking-v1"
    action_names = ("up", "right", "down", "left")
    tool_name, tool_argument = "move", "direction"
    invalid_action_reward = -1.0  # a step's cost: an unreadable reply must not beat moving

    def __init__(self, random_start: bool = True, **kwargs: Any):
        self.random_start = random_start
        super().__init__(**kwargs)

    def build_inner(self, gym_seed: int) -> gym.Env:
        if self.inner is not None:
            return self.inner
        inner = super().build_inner(gym_seed)
        u = inner.unwrapped
        if self.random_start:
            safe = ~u._cliff.ravel()
            safe[np.ravel_multi_index((3, 11), u.shape)] = False  # not on the goal
            u.initial_state_distrib = safe / safe.sum()
        return inner

    def rules(self) -> str:
        return ("You walk on a grid along a cliff: S is the start, C the cliff, G the goal, A marks you. Reach G. "
                "Each step costs -1; stepping onto C costs -100 and sends you back to S. Moving off the grid "
                f"leaves you in place. {_GRID_NOTE}")

    def render_state(self, obs: Any) -> str:
        u = self.inner.unwrapped
        nrow, ncol = u.shape
        rows = [["C" if u._cliff[r, c] else "." for c in range(ncol)] for r in range(nrow)]
        rows[nrow - 1][0], rows[nrow - 1][ncol - 1] = "S", "G"
        row, col = divmod(int(obs), ncol)
        rows[row][col] = "A"
        return f"You (A) are at row {row}, column {col}.\n{_grid(rows)}"

    def describe_end(self, reward: float, terminated: bool) -> str:
        return "You reached the goal!" if terminated else "The turn limit is reached; the episode is over."


class TaxiTextEnv(GymTextEnv):
    """Taxi: pick a passenger up at one lettered stand and drop them off at another."""

    gym_id = "Taxi-v4"
    action_names = ("south", "north", "east", "west", "pickup", "dropoff")
    invalid_action_reward = -1.0  # a move's cost: an unreadable reply must not beat driving
    _STANDS = "RGYB"

    def rules(self) -> str:
        return ("You drive a taxi (T) on the 5x5 map below; '|' is a wall that blocks moving east or west, ':' is "
                "open road. The stands are R, G, Y and B. Drive to the passenger, pick them up, drive to their "
                "destination and drop them off. south moves down a row, north up, east right, west left. A correct "
                "drop-off gives +20; every other action costs -1, and an illegal pickup or drop-off -10. "
                f"{_GRID_NOTE}")

    def render_state(self, obs: Any) -> str:
        u = self.inner.unwrapped
        taxi_row, taxi_col, passenger, destination = u.decode(int(obs))
        rows = [[c.decode() for c in line] for line in u.desc]
        rows[1 + taxi_row][2 * taxi_col + 1] = "T"
        where = "in the taxi" if passenger == 4 else f"waiting at {self._STANDS[passenger]}"
        return (f"Taxi (T) at row {taxi_row}, column {taxi_col}. Passenger: {where}. "
                f"Destination: {self._STANDS[destination]}.\n" + "\n".join("".join(r) for r in rows))

    def describe_end(self, reward: float, terminated: bool) -> str:
        return "Passenger delivered!" if terminated else "The turn limit is reached; the episode is over."


def _cards(hand: list[int]) -> str:
    return ", ".join("A" if c == 1 else str(c) for c in hand)


class BlackjackTextEnv(GymTextEnv):
    """Blackjack against a dealer who draws to 17 (Sutton & Barto's rules by default)."""

    gym_id = "Blackjack-v1"
    action_names = ("stick", "hit")
    # A lost hand's reward: playing loses on average, so a free invalid reply (0) taught RL to stop playing.
    invalid_action_reward = -1.0

    def rules(self) -> str:
        return ("You play one hand of Blackjack. Cards 2-10 count their value, face cards 10, an ace 1 or 11. "
                "hit draws a card; stick ends your turn, then the dealer draws until reaching 17. Going over 21 "
                "loses. Closest to 21 wins: reward +1 for a win, -1 for a loss, 0 for a draw.")

    def render_state(self, obs: Any) -> str:
        total, shown, usable_ace = (int(x) for x in obs)
        u = self.inner.unwrapped
        ace = " (an ace counts as 11)" if usable_ace else ""
        return (f"Your cards: {_cards(u.player)} (total {total}{ace}). "
                f"The dealer shows: {'A' if shown == 1 else shown}.")

    def describe_end(self, reward: float, terminated: bool) -> str:
        if not terminated:
            return "The turn limit is reached; the episode is over."
        dealer = f"The dealer's cards: {_cards(self.inner.unwrapped.dealer)}."
        outcome = "You win." if reward > 0 else ("You lose." if reward < 0 else "It is a draw.")
        return f"{dealer} {outcome}"

    def expert_action(self) -> int | None:
        """Hit below 17, else stick (a simple rule that beats random play by far)."""
        total = int(self.inner.unwrapped._get_obs()[0])
        return 1 if total < 17 else 0
