"""The `agentrl` command as a user runs it (a real subprocess of the installed console script), and
the run-directory and episode-error promises of `agentrl train`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from agentrl.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _agentrl(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("agentrl") or str(Path(sys.executable).parent / "agentrl")
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_envs_lists_the_calculator():
    out = _agentrl("envs")
    assert out.returncode == 0, out.stderr
    assert "calculator-v0" in out.stdout


def test_train_reports_bad_config_clearly(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: nowhere}\nenv: {id: calculater-v0}\ntrain: {stesp: 1}\n")
    out = _agentrl("train", str(cfg))
    assert out.returncode == 2
    assert "Did you mean 'steps'" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_train_and_eval_end_to_end(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    out = _agentrl("train", str(ROOT / "examples/calculator.yaml"), f"model.path={tiny_model_dir}",
                   "train.steps=1", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                   "eval.num_tasks=4", f"run_dir={run}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "step    1" in out.stdout and "held-out success" in out.stdout
    assert "how to read a step: *_mean = mean per episode" in out.stdout  # the legend, once
    assert out.stdout.count("how to read a step") == 1
    # The barely trained model earns no reward: the step is flagged, with what the model wrote.
    assert "no learning signal: all 2 task group(s) had equal rewards" in out.stdout.replace("\n", " ")
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"before", "after", "last_step", "meaning"}
    assert summary["meaning"]["reward_mean"] == "mean per sound episode"
    assert summary["meaning"]["episodes"] == "total over the step (or the evaluation)"
    assert (run / "final" / "config.json").is_file()
    out = _agentrl("eval", str(ROOT / "examples/calculator.yaml"), "eval.num_tasks=4", "--model", str(run / "final"),
                   "--k", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    results = run / "eval" / "run-final-test-k2.json"  # a run's policy: its results go into the run
    assert str(results) in out.stdout.replace("\n", "") and results.with_suffix(".md").is_file()
    summary = json.loads(results.read_text())["models"][0]["envs"]["calculator-v0"]
    assert 0.0 <= summary["means"]["success_rate"]["value"] <= 1.0 and summary["totals"]["episodes"] == 8


def test_unknown_env_suggests_the_right_id(tiny_model_dir, tmp_path):
    out = _agentrl("eval", str(ROOT / "examples/calculator.yaml"), f"model.path={tiny_model_dir}",
                   "env.id=calculater-v0", "eval.num_tasks=1")
    assert out.returncode == 2
    assert "Did you mean 'calculator-v0'" in out.stdout


# The run-directory and episode-error promises, through the real app in process (typer's CliRunner):
# each needs several runs, and a fresh interpreter per run would triple the time.
_spec = importlib.util.spec_from_file_location("agentrl_test_run_cli_hostile", ROOT / "tests" / "run_cli_hostile.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))
SMALL = ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_tokens_per_turn=16",
         "rollout.max_turns=1", "rollout.max_total_tokens=128", "train.checkpoint_every=1"]


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_into_run_dir_needs_overwrite_and_replaces_the_first(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    # quickstart.sh's shape: the config, --overwrite, then the user's overrides
    args = ["train", ROOT / "examples/calculator.yaml", "--overwrite", f"model.path={tiny_model_dir}", *SMALL,
            "train.steps=1", "eval.num_tasks=2", f"run_dir={run}"]
    code, out = _invoke(*args)
    assert code == 0, out
    first = (run / "final" / "model.safetensors").stat().st_mtime_ns
    code, out = _invoke(*[a for a in args if a != "--overwrite"])
    assert code == 2 and "already holds a run (checkpoint step-000001)" in out, out
    code, out = _invoke(*args)
    assert code == 0, out
    assert [r.get("event", "step") for r in _records(run)] == ["eval_before", "step", "eval_after"]  # one run only
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns != first


def test_episode_errors_reach_the_console_and_metrics_and_are_not_trained_on(stopping_model_dir, tmp_path):
    run = tmp_path / "run"
    code, out = _invoke("train", ROOT / "examples/calculator.yaml", f"model.path={stopping_model_dir}",
                        "env.id=hostile-flaky-v0", *SMALL, "rollout.prompts_per_step=4", "train.steps=3",
                        "eval.num_tasks=0", f"run_dir={run}")
    assert code == 0, out  # one task in four fails: above failures.min_group_fraction, the run goes on
    assert "episode(s) failed (not trained on)" in out and "TimeoutError: scorer timed out on task" in out, out
    assert "failures: dropped_groups=" in out and " env_error=" in out, out  # the decision and the class
    steps = [r for r in _records(run) if "step" in r]
    assert sum(r["episode_errors"] for r in steps) > 0
    for r in steps:  # an env error drops its task group (2 episodes) by default
        assert r["trained_episodes"] == 8 - 2 * r["failures/dropped_groups"]
        assert r["failures/env_error"] == r["episode_errors"]
        assert bool(r.get("error_samples")) == bool(r["episode_errors"])


def test_a_run_that_fails_after_its_first_step_keeps_its_files_and_the_error(tiny_model_dir, tmp_path):
    from agentrl.driver.collect import task_seeds

    run = tmp_path / "run"
    step2 = task_seeds(1, 2, 0)  # the tasks of step 2 (train.seed 0, 2 prompts per step)
    code, out = _invoke("train", ROOT / "examples/calculator.yaml", f"model.path={tiny_model_dir}",
                        "env.id=hostile-seeds-v0", f"env.kwargs.fail_seeds={step2}", *SMALL, "train.steps=3",
                        "eval.num_tasks=0", f"run_dir={run}")
    assert code == 2, out
    error = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and "step 2: 4 of 4 episodes failed" in error[0], out
    assert "ConnectionError: task server dropped the request" in error[0]
    last = _records(run)[-1]
    assert last["event"] == "error" and last["message"] == error[0].removeprefix("error: ")
    assert (run / "checkpoints" / "step-000001").is_dir()


def test_an_unexpected_exception_is_one_line_with_exit_1_and_the_traceback_on_request():
    import typer

    from agentrl.cli import _errors_reported

    bug = typer.Typer()

    @bug.command()
    def crash() -> None:
        with _errors_reported():
            {}["missing key"]

    result = CliRunner().invoke(bug, [], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == ["error: internal error KeyError: 'missing key' (a bug in agentrl: rerun with AGENTRL_TRACEBACK=1 "
                     "for the traceback and report it)"]
    result = CliRunner().invoke(bug, [], env={"AGENTRL_TRACEBACK": "1"})
    assert isinstance(result.exception, KeyError)  # raised as is, so Python prints the traceback
