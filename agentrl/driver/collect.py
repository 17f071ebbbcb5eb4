"""Which episodes a step plays and keeps, and the held-out evaluation: the rollout side's part of a run.

Everything a step plays is a function of (config, step): task seeds come from a fixed shuffled
stream sliced by step, sampling seeds from the step and the episode index, so `--resume`
repeats an uninterrupted run exactly.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from agentrl.driver.metrics import check_episode_errors, error_samples, rollout_metrics
from agentrl.driver.rollout_side import RolloutSide
from agentrl.rollout.agent_loop import EpisodeSpec
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.algos import filter_uniform_groups


def task_seeds(step: int, prompts_per_step: int, seed: int, round: int = 0) -> list[int]:
    """The data order: a fixed shuffled stream of training-task seeds, sliced by step (and refill round)."""
    rng = random.Random(seed * 7919 + step if round == 0 else ((seed * 7919 + step) * 31 + round) * 17)
    return [rng.randrange(2**31 - 1) for _ in range(prompts_per_step)]


def collect(rollout: RolloutSide, step: int) -> tuple[list[Trajectory], dict[str, Any]]:
    """One step's episodes to train on. Failed episodes (`Trajectory.error`) are dropped: an env or
    engine failure is not the policy's doing, so it must not be trained as a zero reward; when more
    than rollout.max_error_fraction of a round failed, `RolloutError` stops the run. With dynamic
    sampling, groups whose rewards are all equal are dropped and more tasks are played (up to
    `max_sampling_rounds` rounds) until `prompts_per_step` groups remain."""
    cfg = rollout.cfg
    r, a = cfg.rollout, cfg.algorithm
    t0, used = time.perf_counter(), rollout.engine.use()
    played: list[Trajectory] = []
    kept: list[Trajectory] = []
    rounds = a.max_sampling_rounds if a.dynamic_sampling else 1
    for rnd in range(rounds):
        specs = [EpisodeSpec(seed=seed, split=cfg.env.train_split, group_id=rnd * r.prompts_per_step + g)
                 for g, seed in enumerate(task_seeds(step, r.prompts_per_step, cfg.train.seed, rnd))
                 for _ in range(r.samples_per_prompt)]
        trajs = rollout.play(specs, r.temperature, seed=(cfg.train.seed * 100_003 + step) * 101 + rnd)
        check_episode_errors(trajs, r.max_error_fraction, f"step {step + 1}")
        played += trajs
        sound = [t for t in trajs if t.error is None]
        if not a.dynamic_sampling:
            kept = sound
            break
        keep = filter_uniform_groups(torch.tensor([t.reward for t in sound]), torch.tensor([t.group_id for t in sound]))
        kept += [t for t, k in zip(sound, keep.tolist()) if k]
        if len(kept) >= r.prompts_per_step * r.samples_per_prompt:
            break
    metrics = with_errors(rollout_metrics(played, time.perf_counter() - t0, rollout.engine.use() - used), played)
    kept = kept[: r.prompts_per_step * r.samples_per_prompt]
    metrics.update(sampling_rounds=float(rnd + 1), kept_groups=float(len({t.group_id for t in kept})),
                   trained_episodes=float(len(kept)))
    return kept, metrics


def evaluate(rollout: RolloutSide, split: str, num_tasks: int, temperature: float, seed: int) -> dict[str, Any]:
    """Success rate on tasks 0..num_tasks-1 of a held-out split (one episode each), with the first
    distinct episode-error texts under `error_samples`; raises `RolloutError` when more than
    rollout.max_error_fraction of the episodes failed (a failed episode is not a policy failure)."""
    t0, used = time.perf_counter(), rollout.engine.use()
    trajs = rollout.play([EpisodeSpec(seed=i, split=split, group_id=i) for i in range(num_tasks)], temperature, seed)
    check_episode_errors(trajs, rollout.cfg.rollout.max_error_fraction, f"evaluation on split {split!r}")
    return with_errors(rollout_metrics(trajs, time.perf_counter() - t0, rollout.engine.use() - used), trajs)


def with_errors(metrics: dict[str, Any], trajectories: list[Trajectory]) -> dict[str, Any]:
    samples = error_samples(trajectories)
    return {**metrics, "error_samples": samples} if samples else metrics
