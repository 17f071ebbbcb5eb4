"""The console lines of a step: the chosen keys, the time split of any roles present, and failure
counts (of any class) only when there are some."""

from __future__ import annotations

from agentrl.driver.console import ConsoleSink, problem_line, step_lines

STEP = {"step": 3, "reward_mean": 0.41666, "success_rate": 0.5, "loss": 0.0123, "error_samples": ["1x E: x"],
        "time/step": 2.31, "time/rollout/episodes": 1.2, "time/rollout/engine": 0.9, "time/rollout/env": 0.3,
        "time/rollout/weight_sync": 0.01, "time/rollout/idle": 1.1, "time/trainer/score": 0.05,
        "time/trainer/update": 0.4, "time/trainer/weight_sync": 0.01, "time/trainer/checkpoint": 0.0,
        "time/trainer/idle": 1.85, "tokens_per_s/rollout/generated": 850.4, "tokens_per_s/trainer/trained": 2400.0,
        "staleness/0": 100.0, "staleness/1": 20.0, "staleness/max": 1.0, "staleness/mean": 0.1667,
        "failures/engine_timeout": 2.0, "failures/env_error": 0.0, "tool_errors": 3.0, "tool_errors/parse": 3.0}


def test_a_step_is_two_lines_and_a_third_for_failures():
    lines = step_lines(3, STEP, ["reward_mean", "success_rate", "missing", "error_samples", "loss"])
    assert lines == [
        "step    3  reward_mean=0.417  success_rate=0.5  loss=0.0123",  # absent and non-numeric keys skipped
        "           time 2.31s: rollout 1.20s (engine 0.90 env 0.30) score 0.05s update 0.40s sync 0.01s ckpt 0.00s"
        " | idle: rollout 1.10s trainer 1.85s | tok/s: generated 850 trained 2400 | staleness max 1 mean 0.17",
        "           failures: engine_timeout=2 | tool errors: parse=3",  # the zero count is left out
    ]


def test_failure_classes_are_shown_whatever_their_names_and_only_when_non_zero():
    assert problem_line({"failures/sandbox_oom": 1.0, "failures/weird-class": 4.0}) == \
        "failures: sandbox_oom=1 weird-class=4"
    assert problem_line({"failures/env_error": 0.0, "tool_errors/parse": 0.0, "tool_errors": 0.0}) == ""
    assert len(step_lines(1, {"loss": 1.0, "failures/env_error": 0.0}, ["loss"])) == 1


def test_roles_reported_by_workers_show_their_idle_time():
    m = {"time/step": 1.0, "time/rollout.0/episodes": 0.9, "time/rollout.0/idle": 0.1, "time/rollout.1/idle": 0.4}
    assert step_lines(1, m, [])[1].endswith("time 1.00s | idle: rollout.0 0.10s rollout.1 0.40s")


def test_console_sink_prints_steps_and_leaves_events_alone():
    printed: list[str] = []
    sink = ConsoleSink(printed.append, ["loss"])
    sink.write({"event": "eval_before", "success_rate": 0.5})
    sink.write({"step": 2, "loss": 0.25})
    sink.close()
    assert printed == ["step    2  loss=0.25"]


def test_a_step_without_learning_signal_says_so_with_what_the_model_wrote():
    m = {"reward_mean": 0.0, "reward_groups": 16.0, "uniform_reward_groups": 16.0,
         "no_signal_sample": "every reward was 0 within its group; task train-3 ended (max_turns) with: 'hi'"}
    lines = step_lines(2, m, ["reward_mean"])
    assert lines[-1] == ("           no learning signal: all 16 task group(s) had equal rewards, so every advantage "
                         "is 0 and this update learns nothing; every reward was 0 within its group; task train-3 "
                         "ended (max_turns) with: 'hi'")
    assert len(step_lines(2, {**m, "no_signal_sample": None}, ["reward_mean"])) == 1
