"""Tests of agentrl/driver/batch.py: rewards land where they happened, on real multi-turn episodes."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from agentrl.driver.batch import RewardShaping, to_batch
from agentrl.envs import make
from agentrl.rollout.agent_loop import EpisodeLimits, EpisodeSpec, run_episode
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import Generation, SamplingParams
from agentrl.rollout.trajectory import Trajectory


class ScriptedEngine:
    """An Engine that 'samples' fixed turns (their encoded text and the end-of-turn token)."""

    def __init__(self, renderer: ChatRenderer, turns: list[str], cut_last: bool = False):
        self.renderer, self.turns, self.cut_last = renderer, list(turns), cut_last

    async def generate(self, prompt_ids, sampling):
        ids = self.renderer.assistant_ids(self.turns.pop(0))
        cut = self.cut_last and not self.turns
        ids = ids[:2] if cut else ids  # the last turn ran out of tokens
        return Generation(tuple(ids), tuple(-0.5 for _ in ids), "length" if cut else "stop", weight_version=0)

    def update_weights(self, state_dict, version): ...
    def sleep(self): ...
    def wake(self): ...
    def abort(self): ...


def _play(tokenizer, env_id: str, turns: list[str], seed: int = 0, cut_last: bool = False) -> Trajectory:
    env = make(env_id)
    renderer = ChatRenderer(tokenizer, env.tool_schemas())
    engine = ScriptedEngine(renderer, turns, cut_last)
    traj, _ = asyncio.run(run_episode(engine, env, renderer, SamplingParams(), EpisodeLimits(len(turns), 8192),
                                      EpisodeSpec(seed=seed)))
    assert traj.failure is None, traj.error
    return traj


def _expected_rows(traj: Trajectory, turn_rewards: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token layout by hand: column j is token j + 1, so turn k's tokens [s, e) are columns s-1..e-2
    and its reward sits in column e-2 (the column of its last token)."""
    T = len(traj.token_ids)
    rewards, turns = torch.zeros(T), torch.full((T,), -1)
    for k, (s, e) in enumerate(traj.turn_spans):
        turns[s - 1:e - 1] = k
        if k < len(turn_rewards):
            rewards[e - 2] = turn_rewards[k]
    return rewards, turns


def test_each_steps_reward_lands_on_the_last_token_of_its_turn(tokenizer):
    # CliffWalking from a random safe start: every move costs -1, a step onto the cliff -100.
    traj = _play(tokenizer, "gym-cliffwalking-v0", ["<action>up</action>", "<action>left</action>",
                                                    "<action>down</action>", "<action>down</action>"], seed=5)
    assert traj.num_turns == 4 and len(traj.turn_rewards) == 4 and all(r < 0 for r in traj.turn_rewards)
    batch = to_batch([traj])
    rewards, turns = _expected_rows(traj, list(traj.turn_rewards))
    assert torch.equal(batch.token_rewards[0], rewards)
    assert torch.equal(batch.turn_index[0], turns)
    assert torch.equal(batch.turn_index[0] >= 0, batch.mask[0] > 0)  # turns cover the model's tokens only
    assert float(batch.token_rewards.sum()) == pytest.approx(traj.reward) and float(batch.scores[0]) == traj.reward


def test_a_turn_cut_short_has_tokens_but_no_reward(tokenizer):
    traj = _play(tokenizer, "gym-cliffwalking-v0", ["<action>up</action>", "<action>right</action>"], seed=5,
                 cut_last=True)
    assert traj.num_turns == 2 and len(traj.turn_rewards) == 1 and traj.truncation == "max_tokens_per_turn"
    batch = to_batch([traj])
    rewards, turns = _expected_rows(traj, list(traj.turn_rewards))
    assert torch.equal(batch.token_rewards[0], rewards) and torch.equal(batch.turn_index[0], turns)
    assert int((batch.turn_index[0] == 1).sum()) == 2
    # A truncation penalty lands on the last token the model wrote (the cut turn's second, column e - 2).
    cut = to_batch([traj], RewardShaping(truncation_penalty=2.0))
    _, end = traj.turn_spans[1]
    assert float(cut.token_rewards[0, end - 2]) == -2.0
    assert torch.equal(cut.token_rewards[0, :end - 2], batch.token_rewards[0, :end - 2])
    assert float(cut.scores[0]) == traj.reward - 2.0 and float(batch.scores[0]) == traj.reward


def _call(expr) -> str:
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "</tool_call>"


def test_tool_error_penalty_lands_on_the_turn_that_made_the_error(tokenizer):
    env = make("calculator-v0")
    env.reset(seed=3, options={"split": "train"})
    expr, answer = env.task.metadata["expression"], env.task.answer
    traj = _play(tokenizer, "calculator-v0", ["<tool_call>{broken", _call(expr), f"The answer is {answer}."], seed=3)
    assert traj.turn_tool_errors == ({"parse": 1}, {}, {}) and traj.reward == 1.0
    plain = to_batch([traj])
    penalised = to_batch([traj], RewardShaping(tool_error_penalty=0.25, tool_error_kinds=("parse",)))
    # Turn 0 made one parse error: 0 - 0.25; turn 2 answered: 1.0; the score is 1.0 - 0.25.
    rewards, _ = _expected_rows(traj, [-0.25, 0.0, 1.0])
    assert torch.equal(penalised.token_rewards[0], rewards)
    assert float(penalised.scores[0]) == 0.75 and float(plain.scores[0]) == 1.0
    assert torch.equal(plain.token_rewards[0], _expected_rows(traj, [0.0, 0.0, 1.0])[0])
    # Kinds not named are not penalised, and an episode that ended in time pays no truncation penalty.
    other = to_batch([traj], RewardShaping(tool_error_penalty=0.25, tool_error_kinds=("invalid_arguments",)))
    assert torch.equal(other.token_rewards, plain.token_rewards)
    assert torch.equal(to_batch([traj], RewardShaping(truncation_penalty=5.0)).token_rewards, plain.token_rewards)


def test_failed_trajectory_has_no_rewards_and_no_turns():
    failed = Trajectory(token_ids=(1, 2, 3, 4), loss_mask=(0, 1, 1, 0), rollout_logprobs=(0.0,) * 4,
                        weight_versions=(-1, 0, 0, -1), prompt_length=1, turn_spans=((1, 3),), turn_rewards=(2.0,),
                        reward=0.0, env_id="x", task_id="t", split="train", seed=0, group_id=0, num_turns=1,
                        error="boom", failure="env_error", turn_tool_errors=({"parse": 3},))
    batch = to_batch([failed], RewardShaping(1.0, ("parse",), truncation_penalty=1.0))
    assert batch.token_rewards.abs().sum() == 0 and (batch.turn_index == -1).all() and batch.mask.sum() == 0
    assert float(batch.scores[0]) == 0.0


def test_trajectory_refuses_more_rewards_than_turns():
    with pytest.raises(ValueError, match="2 turn rewards for 1 turns"):
        Trajectory(token_ids=(1, 2), loss_mask=(0, 1), rollout_logprobs=(0.0, 0.0), weight_versions=(-1, 0),
                   prompt_length=1, turn_spans=((1, 2),), turn_rewards=(1.0, 2.0), reward=3.0, env_id="x",
                   task_id="t", split="train", seed=0, group_id=0, num_turns=1)
