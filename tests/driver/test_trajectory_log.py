"""The saved sample of a step's episodes (what the report's viewer shows) and the no-learning-signal check,
on real episodes: the calculator env, the tiny model's tokenizer and chat template, the real agent loop."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
import torch

from agentrl.config import load_config
from agentrl.driver.trajectory_log import TrajectoryLog, episode_view, learning_signal, sample_rows
from agentrl.envs import make
from agentrl.rollout.agent_loop import EpisodeLimits, EpisodeSpec, run_episode
from agentrl.rollout.chat import ChatRenderer
from agentrl.rollout.engine import Generation, SamplingParams
from agentrl.trainer.batch import TrainBatch


class TurnsEngine:
    """An Engine whose turns are given texts (encoded + end of turn), each token with logprob -0.25."""

    def __init__(self, renderer: ChatRenderer, turns: list[str]):
        self.renderer, self.turns = renderer, list(turns)

    async def generate(self, prompt_ids, sampling):
        ids = self.renderer.assistant_ids(self.turns.pop(0))
        return Generation(tuple(ids), tuple(-0.25 for _ in ids), "stop")

    def update_weights(self, state_dict, version): ...
    def sleep(self): ...
    def wake(self): ...
    def abort(self): ...


def _call(expr: str) -> str:
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "</tool_call>"


@pytest.fixture()
def played(tokenizer):
    """A real three-turn calculator episode: a broken call, a good call, the right answer."""
    env = make("calculator-v0")
    renderer = ChatRenderer(tokenizer, env.tool_schemas())
    env.reset(seed=3, options={"split": "test"})
    expr, answer = env.task.metadata["expression"], env.task.answer
    turns = ["<tool_call>{broken", _call(expr), f"The answer is {answer}."]
    traj, _ = asyncio.run(run_episode(TurnsEngine(renderer, turns), env, renderer, SamplingParams(),
                                      EpisodeLimits(4, 2048), EpisodeSpec(seed=3, split="test"), env_id="calculator-v0"))
    return traj, env, turns, answer


def test_episode_view_turn_by_turn(played, tokenizer):
    traj, env, turns, answer = played
    assert traj.answer == answer  # the env's answer key, for maj@k
    view = episode_view(traj, tokenizer, env.parse, advantage=0.5)
    kinds = [s["kind"] for s in view["segments"]]
    assert kinds == ["prompt", "model", "observation", "model", "observation", "model"]
    prompt, first, obs1, second, obs2, last = view["segments"]
    assert env.task.prompt in prompt["text"]
    assert prompt["text"].startswith("<|im_start|>system")  # as the chat template rendered it
    # The model's tokens, each with its logprob and loss mask, decode to what it wrote.
    assert "".join(t[0] for t in second["tokens"]).startswith(turns[1])
    assert all(t[1] == -0.25 and t[2] == 1 for s in (first, second, last) for t in s["tokens"])
    assert sum(len(s["tokens"]) for s in (first, second, last)) == sum(traj.loss_mask)
    # The env's parser reads the calls back; the unreadable one is an issue; typed tool errors are marked.
    assert second["calls"] == [{"name": "calculator", "arguments": {"expression": env.task.metadata["expression"]}}]
    assert first["calls"] == [] and first["issues"]
    assert obs1["errors"] == ["parse"] and obs2["errors"] == [] and env.task.answer in obs2["text"]
    assert [first["reward"], second["reward"], last["reward"]] == [0.0, 0.0, 1.0]
    assert view["reward"] == 1.0 and view["advantage"] == 0.5 and view["tool_errors"] == {"parse": 1}
    # Prompt, turns and observations together are the whole episode, token for token.
    text = prompt["text"] + "".join("".join(t[0] for t in s["tokens"]) if s["kind"] == "model" else s["text"]
                                    for s in view["segments"][1:])
    assert text == tokenizer.decode(list(traj.token_ids), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)


def test_learning_signal_flags_a_step_of_equal_rewards_with_what_the_model_wrote(played, tokenizer):
    traj = played[0]
    varied = [replace(traj, group_id=g, reward=r) for g, r in ((0, 1.0), (0, 0.0), (1, 1.0), (1, 1.0))]
    out = learning_signal(varied, tokenizer)
    assert out == {"reward_groups": 2.0, "uniform_reward_groups": 1.0}  # group 0 still teaches something
    flat = [replace(traj, group_id=g, reward=0.0) for g in (0, 0, 1, 1)]
    out = learning_signal(flat, tokenizer)
    assert out["uniform_reward_groups"] == out["reward_groups"] == 2.0
    assert "every reward was 0 within its group" in out["no_signal_sample"]
    assert f"The answer is {played[3]}." in out["no_signal_sample"]  # the last turn, as the model wrote it
    # A failed episode is not the policy's: it neither counts nor breaks the equality.
    failed = replace(traj, group_id=0, reward=0.0, failure="env_error", error="boom")
    assert learning_signal(flat + [failed], tokenizer)["reward_groups"] == 2.0


def test_trajectory_log_writes_the_sample_of_a_step(played, tokenizer, tmp_path, tiny_model_dir):
    traj = played[0]
    episodes = [replace(traj, group_id=g // 2, reward=float(g % 2)) for g in range(6)]
    rows = [list(t.token_ids) for t in episodes]
    batch = TrainBatch.from_rows(rows, [t.loss_mask for t in episodes], [t.rollout_logprobs for t in episodes],
                                 [t.weight_versions for t in episodes], [t.reward for t in episodes],
                                 [t.group_id for t in episodes])
    batch = batch.with_(advantages=batch.mask * torch.tensor([-1.0, 1.0] * 3)[:, None])
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "env.id=calculator-v0", "metrics.save_trajectories=4"])
    log = TrajectoryLog.open(cfg, tmp_path, tokenizer)
    path = log.write(7, episodes, batch)
    assert path == tmp_path / "trajectories" / "step-000007.jsonl"
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["row"] for e in saved] == sample_rows(6, 4) == [0, 1, 3, 4]
    assert [e["advantage"] for e in saved] == [-1.0, 1.0, 1.0, -1.0] and all(e["step"] == 7 for e in saved)
    assert all(e["trained"] and e["segments"][1]["calls"] == [] for e in saved)
    off = load_config(None, [f"model.path={tiny_model_dir}", "env.id=calculator-v0", "metrics.save_trajectories=0"])
    assert TrajectoryLog.open(off, tmp_path, tokenizer) is None
