"""An evaluation's episodes, and what they add up to: per-task means with intervals, totals, comparisons.

Every number in `summarize`'s `means` is a mean over tasks of a per-task value (a task's pass@k,
or the mean over its samples of a per-episode quantity), with a bootstrap interval over tasks;
every number in `totals` is a count over all episodes. When every task has the same number of
samples, the mean over tasks of per-task means equals the plain mean per episode.

Only episodes that ended sound are scored (an infrastructure failure is not the policy's zero);
their count per task is that task's n. pass@j is reported over the tasks with n >= j.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentrl.eval.estimators import (
    bootstrap_ci,
    consistent_keys,
    k_values,
    majority_correct,
    paired_bootstrap_ci,
    pass_at_k,
    significant,
)

# Per-episode quantities averaged per task (name in the results -> attribute of EpisodeOutcome).
EPISODE_MEANS: dict[str, Callable[[EpisodeOutcome], float]] = {
    "reward_mean": lambda o: o.reward,
    "turns_mean": lambda o: float(o.turns),
    "tool_calls_mean": lambda o: float(o.tool_calls),
    "tool_errors_mean": lambda o: float(sum(o.tool_errors.values())),
    "response_tokens_mean": lambda o: float(o.response_tokens),
    "tokens_mean": lambda o: float(o.tokens),
}


@dataclass(frozen=True)
class EpisodeOutcome:
    """What one evaluated episode came to (one line of the results' `episodes`).

    `task` is the task's seed in its split, `sample` which of its k samples this is, `seed` the
    sampling seed the episode's first turn used. `failure`/`error` are set when the
    infrastructure ended it (it is then not scored).
    """

    env_id: str
    split: str
    task: int
    sample: int
    reward: float
    success: bool
    answer: str | None = None
    turns: int = 0
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)
    truncation: str | None = None
    response_tokens: int = 0
    tokens: int = 0
    failure: str | None = None
    error: str | None = None
    final_text: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpisodeOutcome:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def by_task(outcomes: Sequence[EpisodeOutcome]) -> dict[int, list[EpisodeOutcome]]:
    """Sound episodes grouped by task, in task order (tasks with none are left out)."""
    tasks: dict[int, list[EpisodeOutcome]] = defaultdict(list)
    for o in outcomes:
        if o.failure is None:
            tasks[o.task].append(o)
    return dict(sorted(tasks.items()))


def task_values(outcomes: Sequence[EpisodeOutcome], k: int) -> dict[str, dict[int, float]]:
    """metric -> task -> that task's value: `success_rate`, `pass@j` (tasks with n >= j), `maj@k`
    (when any episode has an answer key), and the `EPISODE_MEANS`."""
    tasks = by_task(outcomes)
    out: dict[str, dict[int, float]] = defaultdict(dict)
    voted = any(o.answer is not None for o in outcomes)
    for task, eps in tasks.items():
        n, c = len(eps), sum(o.success for o in eps)
        out["success_rate"][task] = c / n
        for j in k_values(k):
            if n >= j:
                out[f"pass@{j}"][task] = pass_at_k(n, c, j)
        if voted:
            out[f"maj@{k}"][task] = majority_correct([o.answer for o in eps], [o.success for o in eps])
        for name, value in EPISODE_MEANS.items():
            out[name][task] = sum(value(o) for o in eps) / n
    return dict(out)


def totals(outcomes: Sequence[EpisodeOutcome]) -> dict[str, float]:
    """Counts over every episode: played, scored, tool errors by kind, truncations by reason, failures by class."""
    sound = [o for o in outcomes if o.failure is None]
    out: dict[str, float] = {"episodes": float(len(outcomes)), "scored_episodes": float(len(sound)),
                             "successes": float(sum(o.success for o in sound))}
    errors: Counter[str] = Counter()
    for o in sound:
        errors.update(o.tool_errors)
    out["tool_errors"] = float(sum(errors.values()))
    out |= {f"tool_errors/{kind}": float(n) for kind, n in sorted(errors.items())}
    out |= {f"truncated/{r}": float(n) for r, n in sorted(Counter(o.truncation for o in sound if o.truncation).items())}
    out |= {f"failures/{c}": float(n) for c, n in sorted(Counter(o.failure for o in outcomes if o.failure).items())}
    return out


def _interval(values: dict[int, float], seed: int) -> dict[str, Any]:
    v = list(values.values())
    lo, hi = bootstrap_ci(v, seed)
    return {"value": sum(v) / len(v) if v else float("nan"), "ci": [lo, hi], "tasks": len(v)}


def summarize(outcomes: Sequence[EpisodeOutcome], k: int, seed: int) -> dict[str, Any]:
    """One env's results: `means` (metric -> value, 95% interval over tasks, tasks counted) and `totals`.

    Args:
        outcomes: Every episode of the env, failed ones included.
        k: Samples per task that were asked for.
        seed: Seeds the bootstrap (the same resamples for every metric).
    """
    values = task_values(outcomes, k)
    means = {name: _interval(per_task, seed) for name, per_task in values.items()}
    out: dict[str, Any] = {"tasks": len(by_task(outcomes)), "means": means, "totals": totals(outcomes)}
    maj = f"maj@{k}"
    if maj in values:
        out["maj_keys_consistent"] = all(consistent_keys([o.answer for o in eps], [o.success for o in eps])
                                         for eps in by_task(outcomes).values())
    return out


def compare(a: Sequence[EpisodeOutcome], b: Sequence[EpisodeOutcome], k: int, seed: int) -> dict[str, Any]:
    """Paired differences A - B per metric over the tasks both scored, with a paired bootstrap interval.

    Returns metric -> {"a", "b", "diff", "ci", "significant", "tasks"}; `significant` says the 95%
    interval of the difference excludes 0.
    """
    va, vb = task_values(a, k), task_values(b, k)
    out: dict[str, Any] = {}
    for name in va:
        if name not in vb:
            continue
        common = sorted(set(va[name]) & set(vb[name]))
        if not common:
            continue
        xa, xb = [va[name][t] for t in common], [vb[name][t] for t in common]
        ci = paired_bootstrap_ci(xa, xb, seed)
        n = len(common)
        out[name] = {"a": sum(xa) / n, "b": sum(xb) / n, "diff": (sum(xa) - sum(xb)) / n, "ci": list(ci),
                     "significant": significant(ci), "tasks": n}
    return out
