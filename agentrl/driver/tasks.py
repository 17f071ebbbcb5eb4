"""Multi-task runs: several environments mixed in every step, reported one by one.

A config's `envs: [{id, weight, kwargs, train_split, name}]` lists them. Each task group of a step
is drawn from one env, with probability proportional to its weight (a pure function of the seed,
the step and the group, so `--resume` replays the same mixture). Groups never span two envs, so
GRPO's statistics are always taken within one env's groups; with `algorithm.normalize_per_env`
each env's advantages are then scaled to unit root mean square over its trained tokens, so an env
with large rewards does not drown the others' gradient. Metrics are reported overall and per env
(`env/<name>/reward_mean`, ...), and evaluation plays every env's held-out split.

All envs share one engine and one tokenizer; each has its own env pool and chat renderer (their
tools differ). `MixedRolloutSide` routes each `EpisodeSpec` to its env by `spec.env`. A run with one
env never goes through here beyond `train_specs`/`eval_specs`, which then build what it always did.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from agentrl.config import AlgorithmConfig, Config, EnvConfig
from agentrl.driver.failures import FailurePolicy
from agentrl.driver.metrics import rollout_metrics
from agentrl.driver.preflight import build_env
from agentrl.driver.rollout_side import RolloutSide, load_renderer
from agentrl.envs.registration import ENVS, make
from agentrl.errors import ConfigError
from agentrl.rollout.agent_loop import EnvPool, EpisodeSpec
from agentrl.rollout.trajectory import Trajectory
from agentrl.trainer.algos.advantages import scale_per_task
from agentrl.trainer.batch import TrainBatch

#: The per-env metrics (`env/<name>/<key>`), from `rollout_metrics` over that env's sound episodes.
PER_ENV_KEYS = ("episodes", "reward_mean", "success_rate", "turns_mean", "response_tokens_mean", "tool_calls_mean",
                "tool_errors")


def is_mixed(cfg: Config) -> bool:
    return len(cfg.envs) > 1


def env_names(cfg: Config) -> list[str]:
    return [e.key for e in cfg.envs] if is_mixed(cfg) else [cfg.env.id]


def for_env(cfg: Config, env: EnvConfig) -> Config:
    """`cfg` with `env` as its only environment (what one env's rollout side runs on)."""
    return cfg.model_copy(update={"env": env, "envs": (env,)})


def train_specs(cfg: Config, step: int, rnd: int, seeds: Sequence[int]) -> list[EpisodeSpec]:
    """The episodes of round `rnd` of a step: `samples_per_prompt` per task seed, each task's env drawn
    by weight from a stream seeded by the run's seed, the step and the round."""
    n, group_base = cfg.rollout.samples_per_prompt, rnd * cfg.rollout.prompts_per_step
    if not is_mixed(cfg):
        return [EpisodeSpec(seed=s, split=cfg.env.train_split, group_id=group_base + g) for g, s in enumerate(seeds)
                for _ in range(n)]
    rng = random.Random(f"agentrl-envs:{cfg.train.seed}:{step}:{rnd}")
    picked = rng.choices(cfg.envs, weights=[e.weight for e in cfg.envs], k=len(seeds))
    return [EpisodeSpec(seed=s, split=e.train_split, group_id=group_base + g, env=e.key)
            for g, (s, e) in enumerate(zip(seeds, picked)) for _ in range(n)]


def eval_specs(cfg: Config, split: str, num_tasks: int) -> list[EpisodeSpec]:
    """Tasks 0..num_tasks-1 of `split`, of every env (one episode each; group ids distinct across envs)."""
    if not is_mixed(cfg):
        return [EpisodeSpec(seed=i, split=split, group_id=i) for i in range(num_tasks)]
    return [EpisodeSpec(seed=i, split=split, group_id=k * num_tasks + i, env=e.key)
            for k, e in enumerate(cfg.envs) for i in range(num_tasks)]


def run_failure_policy(cfg: Config) -> FailurePolicy:
    """The failure policy of the run: one for all its envs (they must agree where the config leaves it open)."""
    if not is_mixed(cfg):
        return FailurePolicy.for_env(cfg.failures, cfg.env.id)
    policies = {e.key: FailurePolicy.for_env(cfg.failures, e.id) for e in cfg.envs}
    first_key, first = next(iter(policies.items()))
    for key, policy in policies.items():
        if dict(policy.actions) != dict(first.actions):
            differ = sorted(c for c in first.actions if first.actions[c] != policy.actions[c])
            raise ConfigError(f"envs {first_key!r} and {key!r} ask for different failure policies for {differ} (their "
                              f"classes' failure_policy); set failures.policy.<class> for those so one policy holds")
    return first


def per_env_metrics(sound: Sequence[Trajectory], cfg: Config) -> dict[str, float]:
    """`env/<name>/<key>` for each env of a multi-task run (nothing for one env)."""
    if not is_mixed(cfg):
        return {}
    out: dict[str, float] = {}
    for name in env_names(cfg):
        m = rollout_metrics([t for t in sound if t.env_id == name], 0.0)
        out |= {f"env/{name}/{k}": m[k] for k in PER_ENV_KEYS}
    return out


def scale_advantages_per_env(batch: TrainBatch, trajectories: Sequence[Trajectory], cfg: Config) -> TrainBatch:
    """The batch with each env's advantages scaled to unit RMS over its trained tokens (multi-task runs
    with `algorithm.normalize_per_env`; unchanged otherwise). Rows follow `trajectories`."""
    algo: AlgorithmConfig = cfg.algorithm
    if not is_mixed(cfg) or not algo.normalize_per_env:
        return batch
    index = {name: k for k, name in enumerate(env_names(cfg))}
    env_ids = torch.tensor([index.get(t.env_id, len(index)) for t in trajectories], dtype=torch.long)  # [B]
    return batch.with_(advantages=scale_per_task(batch.advantages, batch.mask, env_ids))


def open_rollout_side(cfg: Config, model_path: str | None = None, splits: Sequence[tuple[str, str]] = (),
                      server_logs: str | None = None) -> RolloutSide | MixedRolloutSide:
    """The in-process rollout side of `cfg`: one `RolloutSide`, or for several envs a `MixedRolloutSide`
    (one side per env on one engine). Arguments as `RolloutSide.open`."""
    if len(cfg.envs) > 1:
        return MixedRolloutSide.open(cfg, model_path, splits, server_logs)
    return RolloutSide.open(cfg, model_path, splits, server_logs)


@dataclass
class MixedRolloutSide:
    """The rollout side of a multi-task run: one `RolloutSide` per env, all on the first one's engine.

    It has `RolloutSide`'s interface; `play` sends each spec to the side of `spec.env` and returns
    the trajectories in order, each with `env_id` set to its env's name.
    """

    cfg: Config
    sides: Mapping[str, Any]  # name -> RolloutSide

    @classmethod
    def open(cls, cfg: Config, model_path: str | None = None,
             splits: Sequence[tuple[str, str]] = (), server_logs: str | None = None) -> MixedRolloutSide:
        """Check every env (its failure policy, that it builds, its splits' prompts), then load the model once."""
        run_failure_policy(cfg)
        envs = list(cfg.envs)
        probes = {}
        try:
            for e in envs[1:]:
                ENVS.spec(e.id)
                probes[e.key] = build_env(e.id, e.kwargs)
            first = RolloutSide.open(for_env(cfg, envs[0]), model_path, _splits_of(envs[0], 0, splits), server_logs)
        except BaseException:
            for probe in probes.values():
                probe.close()
            raise
        sides: dict[str, Any] = {envs[0].key: first}
        mixed = cls(cfg, sides)
        try:
            field = "--model" if model_path else "model.path"
            for k, e in enumerate(envs[1:], start=1):
                sub = for_env(cfg, e)
                probe = probes.pop(e.key)
                try:
                    tokenizer, renderer = load_renderer(sub, first.path, field, probe, _splits_of(e, k, splits))
                except BaseException:
                    probe.close()
                    raise
                pool = EnvPool(lambda e=e: make(e.id, **e.kwargs))
                pool.give(probe)
                sides[e.key] = RolloutSide(sub, first.path, tokenizer, first.engine, pool, renderer)
        except BaseException:
            for probe in probes.values():
                probe.close()
            mixed.close()
            raise
        return mixed

    @property
    def first(self) -> Any:
        return next(iter(self.sides.values()))

    def __getattr__(self, name: str) -> Any:  # path, tokenizer, engine, pool, renderer, sampling, limits, ...
        if name in ("cfg", "sides"):
            raise AttributeError(name)
        return getattr(self.first, name)

    def play(self, specs: list[EpisodeSpec], temperature: float, seed: int | None = None) -> list[Trajectory]:
        """Play `specs`, env by env on the shared engine; one trajectory each, in order.

        Each spec keeps its sampling stream (`index`: its place in `specs` unless set), so the
        mixture's episodes sample as they would in one list.
        """
        out: list[Trajectory | None] = [None] * len(specs)
        for name, side in self.sides.items():
            mine = [i for i, s in enumerate(specs) if s.env == name]
            if not mine:
                continue
            sub = [replace(specs[i], index=specs[i].index if specs[i].index is not None else i) for i in mine]
            for i, t in zip(mine, side.play(sub, temperature, seed)):
                out[i] = replace(t, env_id=name)
        unknown = sorted({s.env for s, t in zip(specs, out) if t is None})
        if unknown:
            raise ConfigError(f"episodes name envs {unknown} that this run does not have ({', '.join(self.sides)})")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Close every env pool; the first side closes the shared engine too."""
        sides = list(self.sides.values())
        for side in sides[1:]:
            side.pool.close()
        sides[0].close()


def _splits_of(env: EnvConfig, k: int, splits: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The run's splits as env `k` plays them: its own train split where the run names env.train_split."""
    return [(env.train_split, f"envs[{k}].train_split") if where == "env.train_split" else (split, where)
            for split, where in splits]
