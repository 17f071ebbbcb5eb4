"""An evaluation's episodes summed up: per-task means, totals, comparisons, and the Markdown summary."""

from __future__ import annotations

import pytest

from agentrl.eval.markdown import markdown_summary
from agentrl.eval.results import EpisodeOutcome, compare, summarize, task_values, totals


def _ep(task: int, sample: int, success: bool, answer: str | None = None, **kw) -> EpisodeOutcome:
    return EpisodeOutcome(env_id="calculator-v0", split="test", task=task, sample=sample, reward=float(success),
                          success=success, answer=answer, **kw)


def _four_tasks() -> list[EpisodeOutcome]:
    """Task 0: one of four correct. Task 1: all four. Task 2: none. Task 3: three sound, one failed."""
    return [
        _ep(0, 0, True, "7", turns=2, tool_calls=1), _ep(0, 1, False, "5"), _ep(0, 2, False, "5"),
        _ep(0, 3, False, None, truncation="max_turns"),
        *[_ep(1, j, True, "12", turns=2, tool_calls=1) for j in range(4)],
        *[_ep(2, j, False, "3", tool_errors={"parse": 1}) for j in range(4)],
        _ep(3, 0, True, "9"), _ep(3, 1, True, "9"), _ep(3, 2, False, "8"),
        _ep(3, 3, False, failure="engine_error", error="EngineError: boom"),
    ]


def test_per_task_values_by_hand():
    v = task_values(_four_tasks(), k=4)
    assert v["pass@1"] == {0: 0.25, 1: 1.0, 2: 0.0, 3: pytest.approx(2 / 3)}
    # pass@2 of task 0: 1 - C(3,2)/C(4,2) = 0.5; of task 3 (n = 3, c = 2): 1 - C(1,2)/C(3,2) = 1.
    assert v["pass@2"] == {0: 0.5, 1: 1.0, 2: 0.0, 3: 1.0}
    # pass@4 needs four sound samples: task 3 has three, so it is left out.
    assert v["pass@4"] == {0: 1.0, 1: 1.0, 2: 0.0}
    # Votes: task 0 picks "5" (wrong), task 1 "12", task 2 "3" (wrong), task 3 "9" (right).
    assert v["maj@4"] == {0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0}
    assert v["turns_mean"][0] == (2 + 0 + 0 + 0) / 4 and v["tool_errors_mean"][2] == 1.0


def test_summary_means_intervals_and_totals():
    s = summarize(_four_tasks(), k=4, seed=0)
    assert s["tasks"] == 4
    means = s["means"]
    assert means["pass@1"]["value"] == pytest.approx((0.25 + 1 + 0 + 2 / 3) / 4)
    assert means["pass@4"]["value"] == pytest.approx(2 / 3) and means["pass@4"]["tasks"] == 3
    assert means["maj@4"]["value"] == 0.5
    for m in means.values():
        lo, hi = m["ci"]
        assert lo <= m["value"] <= hi
    assert means["success_rate"] == means["pass@1"]
    t = s["totals"]
    assert t["episodes"] == 16 and t["scored_episodes"] == 15 and t["successes"] == 7
    assert t["tool_errors/parse"] == 4 and t["truncated/max_turns"] == 1 and t["failures/engine_error"] == 1
    assert s["maj_keys_consistent"] is True


def test_all_and_none_correct():
    every = summarize([_ep(t, j, True) for t in range(5) for j in range(3)], k=3, seed=0)
    for name in ("success_rate", "pass@1", "pass@2", "pass@3"):
        assert every["means"][name]["value"] == 1.0 and every["means"][name]["ci"] == [1.0, 1.0]
    assert "maj@3" not in every["means"]  # no env answer keys: answers are not comparable, no maj@k
    none = summarize([_ep(t, j, False) for t in range(5) for j in range(3)], k=3, seed=0)
    for name in ("success_rate", "pass@1", "pass@3"):
        assert none["means"][name]["value"] == 0.0 and none["means"][name]["ci"] == [0.0, 0.0]


def test_compare_pairs_tasks():
    a = [_ep(t, j, t < 8) for t in range(10) for j in range(2)]
    b = [_ep(t, j, False) for t in range(10) for j in range(2)]
    diff = compare(a, b, k=2, seed=0)
    assert diff["success_rate"]["diff"] == pytest.approx(0.8) and diff["success_rate"]["significant"]
    assert diff["success_rate"]["ci"][0] > 0
    same = compare(a, a, k=2, seed=0)
    assert all(d["diff"] == 0 and d["ci"] == [0.0, 0.0] and not d["significant"] for d in same.values())
    # Only tasks scored by both are paired: B's task 9 failed on every sample.
    b_lost = [o if o.task != 9 else _ep(9, o.sample, False, failure="env_error", error="x") for o in b]
    assert compare(a, b_lost, k=2, seed=0)["success_rate"]["tasks"] == 9


def test_totals_count_failed_attempts_apart():
    t = totals([_ep(0, 0, True), _ep(0, 1, False, failure="episode_deadline", error="late")])
    assert t == {"episodes": 2.0, "scored_episodes": 1.0, "successes": 1.0, "tool_errors": 0.0,
                 "failures/episode_deadline": 1.0}


def test_markdown_summary_says_what_each_number_is():
    s = summarize(_four_tasks(), k=4, seed=0)
    doc = {"settings": {"envs": ["calculator-v0"], "split": "test", "num_tasks": 4, "k": 4, "temperature": 1.0,
                        "seed": 1234, "resamples": 2000, "level": 0.95},
           "models": [{"name": "run/final", "given": "runs/run", "step": 20, "envs": {"calculator-v0": s}}]}
    md = markdown_summary(doc)
    assert "## run/final (step 20)" in md and "### calculator-v0" in md
    assert "| pass@4 (unbiased) | 0.667 |" in md and "| 3 |" in md
    assert "| tool calls (mean per episode) |" in md and "| total over all episodes | count |" in md
    assert "| failures/engine_error | 1 |" in md
    assert "Means are over tasks" in md and "Totals count every episode" in md
