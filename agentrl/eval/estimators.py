"""The numbers an evaluation reports, as pure functions: pass@k, maj@k and bootstrap intervals.

pass@k is the unbiased combinatorial estimator: with n samples of a task of which c are correct,
the chance that k samples drawn without replacement include a correct one is
1 - C(n-c, k) / C(n, k). It is computed per task and then averaged over tasks (never pooled over
samples, and never weighted by turns), so one correct sample in four gives pass@4 = 1.0 and
pass@1 = 0.25.

maj@k is the chance that a majority vote over a task's samples picks a correct answer. Only
samples whose env gave an answer key vote (see `Env` in docs/evaluation.md); a tie between
answers counts as a uniform random pick among them, so the value is the share of tied top answers
that are correct.

Confidence intervals are percentile bootstraps over tasks (resampling tasks with replacement,
seeded), so a task's samples move together; `paired_bootstrap_ci` takes per-task differences of two
models on the same tasks.

Letters: T tasks, B bootstrap resamples.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task: 1 - C(n-c, k) / C(n, k).

    Args:
        n: Samples of the task (n >= k).
        c: Correct samples among them.
        k: Samples a user would draw.

    Example:
        >>> pass_at_k(4, 1, 4), pass_at_k(4, 1, 1)
        (1.0, 0.25)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    if k == 1:  # the same number as 1 - (n-c)/n, rounded once: equal to the success rate bit for bit
        return c / n
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, one rounding


def majority_correct(answers: Sequence[Hashable | None], correct: Sequence[bool]) -> float:
    """maj@n of one task: the chance that a vote over its samples' answers picks a correct one.

    Args:
        answers: Each sample's answer key; None for a sample without one (it does not vote).
        correct: Whether each sample was correct.

    An answer counts as correct by the share of its samples that were (1 or 0 when the env's keys
    decide correctness, as they should). Ties are broken uniformly at random, in expectation.

    Example:
        >>> majority_correct(["7", "7", "9", None], [True, True, False, False])
        1.0
        >>> majority_correct(["7", "9"], [True, False])   # a tie: half the time right
        0.5
    """
    votes: dict[Hashable, list[bool]] = defaultdict(list)
    for answer, ok in zip(answers, correct, strict=True):
        if answer is not None:
            votes[answer].append(bool(ok))
    if not votes:
        return 0.0
    top = max(len(v) for v in votes.values())
    tied = [v for v in votes.values() if len(v) == top]
    return sum(sum(v) / len(v) for v in tied) / len(tied)


def consistent_keys(answers: Sequence[Hashable | None], correct: Sequence[bool]) -> bool:
    """Whether every answer key of a task goes with one correctness (maj@k assumes it)."""
    seen: dict[Hashable, bool] = {}
    for answer, ok in zip(answers, correct, strict=True):
        if answer is not None and seen.setdefault(answer, bool(ok)) != bool(ok):
            return False
    return True


def resample_indices(num_tasks: int, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    """[B, T] task indices drawn with replacement: one row per bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_tasks, size=(resamples, num_tasks))


def bootstrap_ci(values: Sequence[float], seed: int, resamples: int = RESAMPLES,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-task `values` [T], resampling tasks.

    All-equal values give the degenerate interval (v, v); an empty list gives (nan, nan).

    Example:
        >>> bootstrap_ci([1.0, 1.0, 1.0], seed=0)
        (1.0, 1.0)
    """
    v = np.asarray(values, dtype=np.float64)  # [T]
    if v.size == 0:
        return (math.nan, math.nan)
    if v.min() == v.max():  # every resample's mean is that value (summing would round it in the last bit)
        return (float(v[0]), float(v[0]))
    means = v[resample_indices(v.size, seed, resamples)].mean(axis=1)  # [B]
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], seed: int, resamples: int = RESAMPLES,
                        level: float = LEVEL) -> tuple[float, float]:
    """Interval of mean(a - b) over tasks, resampling tasks (each task keeps its pair together).

    Args:
        a: [T] per-task values of model A.
        b: [T] the same tasks' values of model B.
    """
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_.shape != b_.shape:
        raise ValueError(f"paired values need the same tasks: {a_.shape} vs {b_.shape}")
    return bootstrap_ci(a_ - b_, seed, resamples, level)


def significant(ci: tuple[float, float]) -> bool:
    """Whether an interval of a difference excludes 0 (both bounds on one side of it)."""
    lo, hi = ci
    return bool(lo > 0 or hi < 0)


def k_values(k: int) -> list[int]:
    """The k of the pass@k columns for k samples per task: 1, 2, 4, ... below k, and k itself."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return out + [k]
