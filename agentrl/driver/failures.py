"""Failed episodes: retried, dropped or masked by class, never trained on, every decision counted.

An episode the infrastructure broke (`Trajectory.failure`, one of `FAILURE_CLASSES`) is not a
zero reward the policy earned. Each failure class has an action (`failures.policy` in the config,
else the env class's `failure_policy`, else `FAILURE_DEFAULTS`):

* `retry`: play the same spec again (same task seed, group and sampling seed, on a fresh env) up
  to `failures.max_retries` times; a replay that succeeds is what a first try would have been.
  Still failing after that, the episode gets `failures.after_retries`.
* `drop`: leave the episode out; the rest of its group trains.
* `drop_group`: leave its whole task group out (the group's statistics would otherwise be taken
  over the episodes that happened to avoid the failure).
* `keep_zero_loss`: keep it in the batch for the record, with no gradient and outside its
  group's statistics (see `agentrl.driver.batch.to_batch`).

A step (an evaluation) goes on when at least `failures.min_group_fraction` of its task groups
(tasks) *arrived*: not dropped, with at least one sound episode. Otherwise `RolloutError` stops the
run with the first failure texts. Every failed attempt and every decision is counted in the
step's metrics (`failures/<class>`, `failures/retried`, ...), and the texts are kept under
`error_samples`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from agentrl.config import FAILURE_DEFAULTS, FailuresConfig
from agentrl.driver.metrics import error_samples
from agentrl.errors import ConfigError, RolloutError, did_you_mean
from agentrl.rollout.agent_loop import EpisodeSpec
from agentrl.rollout.trajectory import FAILURE_CLASSES, Trajectory

ACTIONS = ("retry", "drop", "drop_group", "keep_zero_loss")

Play = Callable[[list[EpisodeSpec]], list[Trajectory]]


def _check_env_policy(env_cls: type, table: Any) -> dict[str, str]:
    """The env class's `failure_policy` as a plain dict, refused when it names an unknown class or action."""
    name = getattr(env_cls, "__name__", str(env_cls))
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name}.failure_policy must map failure classes to actions, got {type(table).__name__}")
    for failure, action in table.items():
        if failure not in FAILURE_CLASSES:
            raise ConfigError(f"{name}.failure_policy names the unknown failure class {failure!r}."
                              f"{did_you_mean(str(failure), FAILURE_CLASSES)} Known: {', '.join(FAILURE_CLASSES)}")
        if action not in ACTIONS:
            raise ConfigError(f"{name}.failure_policy[{failure!r}] is {action!r}; use one of {', '.join(ACTIONS)}")
    return dict(table)


@dataclass(frozen=True)
class FailurePolicy:
    """The failures section resolved for one env: an action for every failure class, and the bounds."""

    actions: Mapping[str, str]
    max_retries: int = 2
    after_retries: str = "drop"
    min_group_fraction: float = 0.5

    @classmethod
    def resolve(cls, cfg: FailuresConfig, env_cls: type | None = None) -> FailurePolicy:
        """Config first, then the env class's `failure_policy`, then `FAILURE_DEFAULTS`.

        Example:
            >>> FailurePolicy.resolve(FailuresConfig()).actions["env_error"]
            'drop_group'
        """
        from_env = _check_env_policy(env_cls, getattr(env_cls, "failure_policy", {})) if env_cls else {}
        set_here = cfg.policy.model_dump()
        actions = {c: set_here[c] or from_env.get(c) or FAILURE_DEFAULTS[c] for c in FAILURE_CLASSES}
        return cls(MappingProxyType(actions), cfg.max_retries, cfg.after_retries, cfg.min_group_fraction)

    @classmethod
    def for_env(cls, cfg: FailuresConfig, env_id: str) -> FailurePolicy:
        from agentrl.envs.registration import ENVS

        return cls.resolve(cfg, ENVS.get(env_id))

    def final_action(self, failure: str) -> str:
        """What happens to an episode of this class once no retry is left."""
        action = self.actions[failure]
        return self.after_retries if action == "retry" else action


@dataclass
class FailureCounts:
    """Every failed attempt of a step (or an evaluation) and every decision taken about one."""

    failed: list[Trajectory] = field(default_factory=list)
    retried: int = 0
    dropped: int = 0
    dropped_groups: int = 0
    kept_zero_loss: int = 0

    def record(self, trajectories: Sequence[Trajectory]) -> None:
        self.failed += [t for t in trajectories if t.failure is not None]

    def metrics(self) -> dict[str, Any]:
        """`failures/<class>` (failed attempts, retried ones included), the decisions, `episode_errors`
        (all failed attempts) and, when any failed, `error_samples` (their first distinct texts)."""
        by_class = Counter(t.failure for t in self.failed)
        out: dict[str, Any] = {f"failures/{c}": float(by_class[c]) for c in FAILURE_CLASSES}
        out.update({"failures/retried": float(self.retried), "failures/dropped": float(self.dropped),
                    "failures/dropped_groups": float(self.dropped_groups),
                    "failures/kept_zero_loss": float(self.kept_zero_loss), "episode_errors": float(len(self.failed))})
        samples = error_samples(self.failed)
        if samples:
            out["error_samples"] = samples
        return out


def play_with_retries(play: Play, specs: Sequence[EpisodeSpec], policy: FailurePolicy,
                      counts: FailureCounts) -> list[Trajectory]:
    """Play `specs`, then replay the failed ones whose class says `retry`, up to `policy.max_retries`
    rounds; one trajectory per spec, in order (the last attempt of each).

    Each spec gets its `index` (its place in `specs`) before the first play, so a replay samples
    with the seed its first try had.
    """
    specs = [s if s.index is not None else replace(s, index=i) for i, s in enumerate(specs)]
    final = list(play(specs))
    counts.record(final)
    for _ in range(policy.max_retries):
        redo = [i for i, t in enumerate(final) if t.failure is not None and policy.actions[t.failure] == "retry"]
        if not redo:
            break
        again = play([specs[i] for i in redo])
        counts.retried += len(redo)
        counts.record(again)
        for i, t in zip(redo, again):
            final[i] = t
    return final


def settle(final: Sequence[Trajectory], policy: FailurePolicy, counts: FailureCounts) -> list[Trajectory]:
    """The trajectories that go on to the batch, in order: the sound ones and the failed ones kept
    with zero loss, less every group a failure dropped. Counts the decisions in `counts`."""
    dropped_groups: set[int] = set()
    kept_failed: set[int] = set()
    for i, t in enumerate(final):
        if t.failure is None:
            continue
        action = policy.final_action(t.failure)
        if action == "drop_group":
            dropped_groups.add(t.group_id)
        elif action == "keep_zero_loss":
            kept_failed.add(i)
        else:
            counts.dropped += 1
    counts.dropped_groups += len(dropped_groups)
    kept = [t for i, t in enumerate(final)
            if t.group_id not in dropped_groups and (t.failure is None or i in kept_failed)]
    counts.kept_zero_loss += sum(t.failure is not None for t in kept)
    return kept


def check_arrival(final: Sequence[Trajectory], kept: Sequence[Trajectory], min_fraction: float, where: str,
                  unit: str = "task groups") -> None:
    """Raise `RolloutError` when fewer than `min_fraction` of the groups of `final` arrived in `kept`
    (at least one sound episode there), with the first failure texts.

    Args:
        final: Every spec's last attempt (a step's round, or an evaluation).
        kept: What `settle` kept of them.
        min_fraction: failures.min_group_fraction; 0 never raises.
        where: What the batch was ("step 3", "evaluation on split 'test'"), for the message.
        unit: What a group is called there ("task groups", "tasks").
    """
    groups = {t.group_id for t in final}
    arrived = {t.group_id for t in kept if t.failure is None}
    if not groups or len(arrived) >= min_fraction * len(groups):
        return
    failed = [t for t in final if t.failure is not None]
    first = " | ".join(error_samples(failed))
    classes = ", ".join(f"{c} {n}" for c, n in Counter(t.failure for t in failed).most_common())
    env_id = final[0].env_id or "ENV_ID"
    raise RolloutError(
        f"{where}: {len(failed)} of {len(final)} episodes failed ({classes}) and only {len(arrived)} of {len(groups)} "
        f"{unit} arrived (fewer than failures.min_group_fraction={min_fraction:g}), so there is too little sound "
        f"data to learn from or to score; first failures: {first}. Fix what fails (`agentrl check-env {env_id}` runs "
        "the env's contract checks), or see failures.policy in docs/training.md")
