"""pass@k, maj@k and the bootstrap intervals against hand-computed values and slow references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from agentrl.eval.estimators import (
    bootstrap_ci,
    consistent_keys,
    k_values,
    majority_correct,
    paired_bootstrap_ci,
    pass_at_k,
    significant,
)


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_computed():
    # One correct sample in four: every draw of 4 holds it; a draw of 1 finds it 1 time in 4;
    # a draw of 2 misses it only when both come from the 3 wrong ones: 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == 0.5
    # The biased form 1 - (1 - c/n)^k, which some frameworks report, would give 0.684 here.
    assert pass_at_k(4, 1, 4) != pytest.approx(1 - (1 - 1 / 4) ** 4)
    for k in (1, 2, 3, 4):
        assert pass_at_k(4, 4, k) == 1.0  # all correct
        assert pass_at_k(4, 0, k) == 0.0  # none correct
    # 3 of 10 correct, k = 5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12.
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12, abs=1e-15)


def test_pass_at_k_matches_enumeration_of_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_exact_for_many_samples():
    # Large n: the exact integer ratio, no overflow, and the closed form 1 - prod(1 - k/i).
    n, c, k = 1000, 3, 100
    reference = 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    assert pass_at_k(n, c, k) == pytest.approx(reference, rel=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_majority_vote_hand_computed():
    # "7" has two votes, "9" one: the vote picks 7, which is correct.
    assert majority_correct(["7", "7", "9", None], [True, True, False, False]) == 1.0
    # The wrong answer wins the vote even though one sample was right.
    assert majority_correct(["5", "5", "9"], [False, False, True]) == 0.0
    # A three-way tie with one correct answer: right one time in three.
    assert majority_correct(["1", "2", "3"], [True, False, False]) == pytest.approx(1 / 3)
    # No sample stated an answer: nothing to vote for.
    assert majority_correct([None, None], [False, False]) == 0.0
    # All correct and none correct.
    assert majority_correct(["4"] * 4, [True] * 4) == 1.0
    assert majority_correct(["4", "5", "5", "6"], [False] * 4) == 0.0


def test_answer_keys_must_score_alike():
    assert consistent_keys(["7", "7", None], [True, True, False])
    assert not consistent_keys(["7", "7"], [True, False])
    # Such a key counts by its share of correct samples: "7" wins with 2 votes, half of them correct.
    assert majority_correct(["7", "7", "9"], [True, False, False]) == 0.5


def test_bootstrap_interval_hand_computed():
    assert bootstrap_ci([1.0] * 5, seed=0) == (1.0, 1.0)  # all correct
    assert bootstrap_ci([0.0] * 5, seed=0) == (0.0, 0.0)  # none correct
    # Two tasks, 0 and 1: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], seed=0, resamples=20_000) == (0.0, 1.0)
    # Four tasks, one solved: a resample holds X ~ Binomial(4, 1/4) copies of it. P(X = 0) = 81/256
    # > 2.5%, so the lower bound is 0; P(X <= 2) = 243/256 = 0.949 < 97.5% < P(X <= 3) = 255/256,
    # so the upper bound is 3/4.
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0], seed=1, resamples=20_000) == (0.0, 0.75)


def test_bootstrap_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(7)
    values = rng.random(50)
    lo, hi = bootstrap_ci(values, seed=3)
    assert (lo, hi) == bootstrap_ci(values, seed=3)
    assert lo < values.mean() < hi
    # The percentile interval of a mean is about mean +- 1.96 standard errors.
    se = values.std(ddof=0) / math.sqrt(values.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert math.isnan(bootstrap_ci([], seed=0)[0])


def test_paired_interval_finds_a_planted_difference_and_not_a_null_one():
    a = [1.0] * 15 + [0.0] * 5
    b = [0.0] * 15 + [0.0] * 5
    ci = paired_bootstrap_ci(a, b, seed=0)
    assert ci[0] > 0 and significant(ci)
    same = paired_bootstrap_ci(a, a, seed=0)
    assert same == (0.0, 0.0) and not significant(same)
    # Pairing matters: tasks differ wildly, but A beats B on each by exactly 0.1.
    rng = np.random.default_rng(0)
    base = rng.random(30)
    assert paired_bootstrap_ci(base + 0.1, base, seed=0) == pytest.approx((0.1, 0.1))
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap_ci([1.0], [1.0, 0.0], seed=0)


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(10) == [1, 2, 4, 8, 10]
