"""Metrics sinks: `agentrl train` writes TensorBoard event files that TensorBoard itself reads back
with the same numbers as metrics.jsonl; a resumed run replaces the steps it repeats; wandb is never
imported unless configured, and refused at start, naming the extra, when configured but missing.

Logging to wandb itself is not tested here: it needs the wandb package and its servers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from agentrl.cli import app
from agentrl.config import load_config
from agentrl.driver.sinks import MetricsWriter, TensorBoardSink, check_sinks, plotted
from agentrl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_tokens_per_turn=16",
         "rollout.max_turns=2", "rollout.max_total_tokens=128", "train.checkpoint_every=1", "eval.num_tasks=2"]


def _train(model_dir: str, run: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", str(ROOT / "examples/calculator.yaml"), f"model.path={model_dir}",
                                      *SMALL, f"run_dir={run}", *extra], env={"COLUMNS": "250"})
    return result.exit_code, result.output


def _scalars(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_train_writes_event_files_tensorboard_reads_back(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now fail: it must not happen
    run = tmp_path / "run"
    code, out = _train(tiny_model_dir, run, "train.steps=2")
    assert code == 0, out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    acc = _scalars(run / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for key in ("reward_mean", "success_rate", "loss", "time/step", "time/rollout/engine", "time/rollout/env",
                "time/rollout/idle", "time/trainer/update", "time/trainer/idle", "time/trainer/checkpoint",
                "tokens_per_s/rollout/generated", "tokens_per_s/trainer/trained", "staleness/0", "staleness/max"):
        assert key in tags, key
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-6)  # float32 in TB
    # Each evaluation at its place on the step axis: before training at 0, after it at the last step.
    assert [e.step for e in acc.Scalars("eval/success_rate")] == [0, 2]
    assert {"eval/reward_mean", "eval/time/rollout/episodes"} <= tags
    assert not any(t.startswith(("error_samples", "event", "step")) for t in tags)
    for r in steps:
        # Synchronous steps: every trained token was sampled by the policy being updated.
        assert r["staleness/0"] == r["tokens/trainer/trained"] > 0 and r["staleness/max"] == 0
        for role, phases in (("rollout", ("episodes", "weight_sync")),
                             ("trainer", ("score", "update", "weight_sync", "checkpoint"))):
            total = sum(r[f"time/{role}/{p}"] for p in phases) + r[f"time/{role}/idle"]
            assert total == pytest.approx(r["time/step"], abs=1e-6)
        assert r["time/rollout/engine"] + r["time/rollout/env"] == pytest.approx(r["time/rollout/episodes"])
        assert r["time/trainer/checkpoint"] > 0  # train.checkpoint_every=1: every step saves
    # The console: the configured keys, then the time line with the same numbers, rounded.
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("step    1  "))
    assert "reward_mean=" in lines[first] and "nonfinite_steps=0" in lines[first]
    timing = lines[first + 1].strip()
    assert timing.startswith(f"time {steps[0]['time/step']:.2f}s: rollout {steps[0]['time/rollout/episodes']:.2f}s "
                             f"(engine {steps[0]['time/rollout/engine']:.2f} env {steps[0]['time/rollout/env']:.2f})")
    assert f"idle: rollout {steps[0]['time/rollout/idle']:.2f}s trainer" in timing and "staleness max 0" in timing
    summary = json.loads((run / "summary.json").read_text())
    assert {"reward_mean", "success_rate", "tool_calls_mean", "episodes"} <= set(summary["after"])


def test_a_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    first = TensorBoardSink(tmp_path)
    for step in (1, 2, 3):  # killed after step 3; its last checkpoint was step 1
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path, start_step=1)
    for step in (2, 3, 4):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()
    loss = _scalars(tmp_path).Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]


def test_turning_tensorboard_off_writes_no_event_files(tiny_model_dir, tmp_path):
    code, out = _train(tiny_model_dir, tmp_path / "run", "train.steps=1", "eval.num_tasks=0",
                       "metrics.tensorboard=false")
    assert code == 0, out
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_wandb_configured_but_missing_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this machine has
    code, out = _train(tiny_model_dir, tmp_path / "run", "train.steps=1", "metrics.wandb_project=calc")
    assert code == 2, out
    assert "metrics.wandb_project='calc' but wandb is not installed" in out and "pip install 'agentrl[wandb]'" in out
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_tensorboard_missing_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config(None, ["model.path=m", "env.id=calculator-v0"])
    with pytest.raises(ConfigError, match="pip install tensorboard, or set metrics.tensorboard=false"):
        check_sinks(cfg.metrics)
    check_sinks(load_config(None, ["model.path=m", "env.id=calculator-v0", "metrics.tensorboard=false"]).metrics)


def test_wandb_entity_needs_a_project():
    with pytest.raises(ConfigError, match="metrics.wandb_entity is set but metrics.wandb_project is not"):
        load_config(None, ["model.path=m", "env.id=calculator-v0", "metrics.wandb_entity=team"])


def test_what_is_plotted_and_where():
    step = {"step": 4, "loss": 0.5, "error_samples": ["1x EnvError: b"], "nonfinite": False}
    assert plotted(step, last_step=3) == (4, {"loss": 0.5})  # texts and flags are not scalars
    assert plotted({"event": "eval_after", "success_rate": 0.25}, last_step=4) == (4, {"eval/success_rate": 0.25})
    assert plotted({"event": "checkpoint_skipped", "step": 3, "reason": "hash"}, last_step=4) is None


def test_metrics_writer_keeps_error_texts_and_nulls_non_finite_numbers(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "loss": float("nan"), "error_samples": ["1x EnvError: b"]})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None,
                                                                   "error_samples": ["1x EnvError: b"]}
