"""Which episodes a step plays and keeps, and the held-out evaluation: the rollout side's part of a run.

Everything a step plays is a function of (config, step): task seeds come from a fixed shuffled
stream sliced by step, sampling seeds from the step and the episode index, so `--resume`
repeats an uninterrupted run exactly. Episodes the infrastructure broke are retried, dropped or
kept with zero loss by their failure class (`failures.py`), never trained on.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from agentrl.driver.failures import FailureCounts, check_arrival, play_with_retries, settle
from agentrl.driver.metrics import rollout_metrics
from agentrl.driver.rollout_side import RolloutSide
from agentrl.driver.tasks import eval_specs, per_env_metrics, run_failure_policy, train_specs
from agentrl.rollout.engine_meter import EngineUse
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.algos import filter_uniform_groups


def task_seeds(step: int, prompts_per_step: int, seed: int, round: int = 0) -> list[int]:
    """The data order: a fixed shuffled stream of training-task seeds, sliced by step (and refill round)."""
    rng = random.Random(seed * 7919 + step if round == 0 else ((seed * 7919 + step) * 31 + round) * 17)
    return [rng.randrange(2**31 - 1) for _ in range(prompts_per_step)]


def collect(rollout: RolloutSide, step: int) -> tuple[list[Trajectory], dict[str, Any]]:
    """One step's episodes to train on (sound ones, and failed ones kept with zero loss).

    Failed episodes are settled by `failures.policy` (retried, dropped, their group dropped, or
    kept with zero loss); when fewer than failures.min_group_fraction of a round's groups arrived,
    `RolloutError` stops the run. With dynamic sampling, groups whose rewards are all equal are
    dropped and more tasks are played (up to `max_sampling_rounds` rounds) until `prompts_per_step`
    groups remain.
    """
    cfg = rollout.cfg
    r, a = cfg.rollout, cfg.algorithm
    policy = run_failure_policy(cfg)
    counts = FailureCounts()
    t0, used = time.perf_counter(), rollout.engine.use()
    sound: list[Trajectory] = []  # every sound episode played, for the reward metrics
    kept: list[Trajectory] = []
    rounds = a.max_sampling_rounds if a.dynamic_sampling else 1
    for rnd in range(rounds):
        specs = train_specs(cfg, step, rnd, task_seeds(step, r.prompts_per_step, cfg.train.seed, rnd))  # envs mixed
        seed = (cfg.train.seed * 100_003 + step) * 101 + rnd
        final = play_with_retries(lambda s: rollout.play(s, r.temperature, seed=seed), specs, policy, counts)
        batch = settle(final, policy, counts)
        check_arrival(final, batch, policy.min_group_fraction, f"step {step + 1}")
        sound += [t for t in final if t.failure is None]
        if not a.dynamic_sampling:
            kept = batch
            break
        kept += _varied_groups(batch)
        if len({t.group_id for t in kept}) >= r.prompts_per_step:
            break
    kept = _first_groups(kept, r.prompts_per_step)
    metrics = _played_metrics(sound, counts, time.perf_counter() - t0, rollout.engine.use() - used)
    metrics |= per_env_metrics(sound, cfg)
    metrics.update(sampling_rounds=float(rnd + 1), kept_groups=float(len({t.group_id for t in kept})),
                   trained_episodes=float(sum(t.failure is None for t in kept)))
    return kept, metrics


def _varied_groups(batch: list[Trajectory]) -> list[Trajectory]:
    """The rows of the groups whose sound episodes' rewards differ (DAPO dynamic sampling)."""
    sound = [t for t in batch if t.failure is None]
    keep = filter_uniform_groups(torch.tensor([t.reward for t in sound]), torch.tensor([t.group_id for t in sound]))
    varied = {t.group_id for t, k in zip(sound, keep.tolist()) if k}
    return [t for t in batch if t.group_id in varied]


def _first_groups(rows: list[Trajectory], n: int) -> list[Trajectory]:
    first = set(list(dict.fromkeys(t.group_id for t in rows))[:n])
    return [t for t in rows if t.group_id in first]


def evaluate(rollout: RolloutSide, split: str, num_tasks: int, temperature: float, seed: int) -> dict[str, Any]:
    """Success rate on tasks 0..num_tasks-1 of a held-out split (one episode each; of every env of a
    multi-task run, with `env/<name>/*` metrics per env besides the overall ones).

    Failed episodes are retried by `failures.policy` like training ones; the rest are not scored
    (`scored_tasks` says how many were, `failures/*` why the others were not), and their first
    distinct texts go under `error_samples`. Raises `RolloutError` when fewer than
    failures.min_group_fraction of the tasks were scored.
    """
    policy = run_failure_policy(rollout.cfg)
    counts = FailureCounts()
    t0, used = time.perf_counter(), rollout.engine.use()
    specs = eval_specs(rollout.cfg, split, num_tasks)  # of every env, in a multi-task run
    final = play_with_retries(lambda s: rollout.play(s, temperature, seed), specs, policy, counts)
    check_arrival(final, settle(final, policy, counts), policy.min_group_fraction,
                  f"evaluation on split {split!r}", unit="tasks")
    sound = [t for t in final if t.failure is None]
    metrics = _played_metrics(sound, counts, time.perf_counter() - t0, rollout.engine.use() - used)
    return {**metrics, **per_env_metrics(sound, rollout.cfg), "scored_tasks": float(len(sound))}


def _played_metrics(sound: list[Trajectory], counts: FailureCounts, seconds: float, use: EngineUse) -> dict[str, Any]:
    """Rewards and lengths over the sound episodes (a failure's zero is not the policy's); `episodes`
    counts every episode played, failed attempts included; then the failure counts and texts."""
    metrics = {**rollout_metrics(sound, seconds, use), **counts.metrics()}
    metrics["episodes"] = float(len(sound) + len(counts.failed))
    return metrics
