"""`word-guess-v0`: find a secret word, given its letters shuffled, with a `guess` tool.

Each guess is scored letter by letter (`G` right place, `Y` in the word elsewhere, `.` absent).
The `guess` tool is a method of the env that works on the episode's state through its
`ToolContext`: a right guess earns 1 and ends the episode, each wrong one costs 0.1. Answering
without a right guess earns nothing.

Splits: a word belongs to `test` iff a hash of it falls in one bucket of four, so the splits
never share a word; a task is a (word, shuffle) pair drawn from (split, seed).
"""

from __future__ import annotations

import hashlib
import json
import random

from agentrl.envs import Task, ToolEnv
from agentrl.tools.context import ToolContext
from agentrl.tools.core import ToolPolicy, env_tool
from agentrl_word_guess.tools import spell

WORDS = (
    "apple", "brick", "cloud", "dance", "eagle", "flame", "grape", "house", "input", "jelly", "knife", "lemon",
    "mango", "night", "ocean", "piano", "queen", "river", "stone", "tiger", "umbra", "vivid", "water", "xenon",
    "yacht", "zebra", "amber", "bloom", "cabin", "delta", "ember", "frost", "giant", "honey", "ivory", "joker",
    "koala", "lunar", "maple", "noble", "orbit", "pearl", "quilt", "robin", "sugar", "toast", "urban", "vapor",
    "wheat", "youth", "alarm", "bacon", "candy", "drum", "event", "fable", "glove", "habit", "index", "juice",
)
WRONG_GUESS = -0.1
SYSTEM_PROMPT = "Find the secret word: call guess, then answer with the word."


def _is_test(word: str) -> bool:
    return hashlib.sha256(word.encode()).digest()[0] % 4 == 0


def feedback(guess: str, secret: str) -> str:
    """One mark per letter of `guess`: G (right place), Y (elsewhere in the word), . (absent)."""
    return "".join("G" if i < len(secret) and c == secret[i] else "Y" if c in secret else "."
                   for i, c in enumerate(guess))


class WordGuessEnv(ToolEnv):
    """Guess a secret word from its shuffled letters.

    Args:
        max_guesses: Guesses allowed per episode; past them the episode ends with no reward.
    """

    splits = ("train", "test")

    def __init__(self, max_guesses: int = 3):
        super().__init__([spell], system_prompt=SYSTEM_PROMPT, max_calls_per_turn=2)
        self.max_guesses = max_guesses

    def sample_task(self, split: str, seed: int) -> Task:
        rng = random.Random(f"word-guess:{split}:{seed}")
        words = [w for w in WORDS if _is_test(w) == (split == "test")]
        word = rng.choice(words)
        letters = list(word)
        rng.shuffle(letters)
        shuffled = "".join(letters)
        return Task(id=f"{split}-{seed}", prompt=f"The secret word has the letters {shuffled}. Find it.",
                    answer=word, split=split, metadata={"shuffled": shuffled})

    def new_state(self, task: Task) -> dict:
        return {"secret": task.answer, "guesses": []}

    @env_tool(policy=ToolPolicy(timeout_s=1.0, max_output_chars=200))
    def guess(self, word: str, ctx: ToolContext) -> str:
        """Guess the secret word; each letter is marked G (right place), Y (elsewhere) or . (absent).

        Args:
            word: Your guess.
        """
        state = ctx.state
        state["guesses"].append(word)
        if word.strip().lower() == state["secret"]:
            ctx.reward(1.0, "found")
            ctx.end("found")
            return "correct"
        ctx.reward(WRONG_GUESS, "wrong guess")
        if len(state["guesses"]) >= self.max_guesses:
            ctx.end("out of guesses")
        return feedback(word.strip().lower()[:40], state["secret"])

    def score(self, task: Task, answer: str) -> float:
        # Answering is not guessing: the reward comes from the guess tool.
        return 0.0

    def scripted_action(self, rng: random.Random, tool_use_prob: float = 1.0,
                        last_tool_output: str | None = None) -> str:
        """The demonstrator: guesses the word with probability `tool_use_prob`, else its shuffled letters."""
        assert self.task is not None, "call reset() first"
        word = self.task.answer if rng.random() < tool_use_prob else self.task.metadata["shuffled"]
        return "<tool_call>" + json.dumps({"name": "guess", "arguments": {"word": word}}) + "</tool_call>"
