"""The tiny-model recipe's demonstrations: many-turn games are played past four turns, and cut at the model's positions."""

from __future__ import annotations

import random

import pytest

from agentrl.envs.registration import make
from agentrl.recipes.tiny_model import scripted_episode, text_corpus, train_tokenizer
from agentrl.rollout.chat import ChatRenderer


@pytest.fixture(scope="module")
def frozenlake():
    env = make("gym-frozenlake-v0", max_turns=12)
    tokenizer = train_tokenizer(text_corpus(env, 30, seed=0), vocab_size=512)
    yield env, ChatRenderer(tokenizer, env.tool_schemas())
    env.close()


def _assistant_turns(messages) -> int:
    return sum(m.role == "assistant" for m in messages)


def _tile(env) -> bytes:
    """The map tile the walker stands on now (b"G" at the goal)."""
    u = env.inner.unwrapped
    return u.desc.ravel()[int(u.s)]


def test_demonstrations_reach_the_goal_when_given_the_turns(frozenlake):
    env, renderer = frozenlake
    # The expert alone (tool_use_prob 1) walks the shortest path; from S at (0, 0) to G at (3, 3)
    # of a 4x4 map that is at least 3 + 3 = 6 moves, so four turns never end at the goal.
    for seed in range(5):
        _, _, cut = scripted_episode(env, renderer, seed, random.Random(seed), tool_use_prob=1.0, max_turns=4)
        assert _assistant_turns(cut) == 4 and _tile(env) != b"G"
        _, _, whole = scripted_episode(env, renderer, seed, random.Random(seed), tool_use_prob=1.0, max_turns=12)
        assert 6 <= _assistant_turns(whole) < 12 and _tile(env) == b"G"


def test_demonstrations_are_cut_at_max_tokens(frozenlake):
    env, renderer = frozenlake
    ids, mask, _ = scripted_episode(env, renderer, 0, random.Random(0), tool_use_prob=1.0, max_turns=12)
    cut_ids, cut_mask, _ = scripted_episode(env, renderer, 0, random.Random(0), tool_use_prob=1.0, max_turns=12,
                                            max_tokens=len(ids) - 7)
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    assert (cut_ids, cut_mask) == (ids[:len(ids) - 7], mask[:len(ids) - 7])
