"""The step's time split: each role's phases plus its idle time add up to the step's wall time."""

from __future__ import annotations

import time

import pytest

from agentrl.driver.timing import PHASES, StepClock, split_times


def test_split_times_by_hand():
    busy = {"rollout": {"episodes": 3.0, "weight_sync": 0.5},
            "trainer": {"score": 0.25, "update": 2.0, "weight_sync": 0.5, "checkpoint": 1.0}}
    # step 5 s: the rollout role was busy 3 + 0.5, idle 1.5; the trainer 0.25 + 2 + 0.5 + 1 = 3.75, idle 1.25.
    assert split_times(5.0, busy) == {
        "time/step": 5.0, "time/rollout/episodes": 3.0, "time/rollout/weight_sync": 0.5, "time/rollout/idle": 1.5,
        "time/trainer/score": 0.25, "time/trainer/update": 2.0, "time/trainer/weight_sync": 0.5,
        "time/trainer/checkpoint": 1.0, "time/trainer/idle": 1.25}


def test_split_times_takes_any_roles_and_never_reports_negative_idle():
    # Workers of one role reporting apart (rollout.0, rollout.1) are roles of their own.
    out = split_times(2.0, {"rollout.0": {"episodes": 1.5}, "rollout.1": {"episodes": 2.0000001}})
    assert out == {"time/step": 2.0, "time/rollout.0/episodes": 1.5, "time/rollout.0/idle": 0.5,
                   "time/rollout.1/episodes": 2.0000001, "time/rollout.1/idle": 0.0}


def test_step_clock_times_phases_and_every_role_adds_up_to_the_step():
    clock = StepClock()
    clock.add("episodes", 0.0, "rollout")
    with clock.phase("update", "trainer"):
        time.sleep(0.05)
    with pytest.raises(ValueError), clock.phase("weight_sync", "trainer", "rollout"):
        time.sleep(0.02)
        raise ValueError("a failing phase is still timed")
    time.sleep(0.01)  # neither role's phase: idle for both
    m = clock.metrics()
    assert set(m) == {"time/step"} | {f"time/{role}/{p}" for role, ps in PHASES.items() for p in (*ps, "idle")}
    assert m["time/trainer/update"] >= 0.05 and m["time/trainer/weight_sync"] >= 0.02
    assert m["time/rollout/weight_sync"] == m["time/trainer/weight_sync"]  # one interval, both roles
    assert m["time/trainer/checkpoint"] == 0.0 and m["time/trainer/idle"] >= 0.01
    assert m["time/rollout/idle"] >= m["time/trainer/update"]  # the engine waited through the update
    for role, phases in PHASES.items():
        total = sum(m[f"time/{role}/{p}"] for p in phases) + m[f"time/{role}/idle"]
        assert total == pytest.approx(m["time/step"], abs=1e-9)
