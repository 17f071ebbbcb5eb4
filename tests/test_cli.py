"""The `agentrl` command as a user runs it (a real subprocess of the installed console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"before", "after"}
    assert (run / "final" / "config.json").is_file()
    out = _agentrl("eval", str(ROOT / "examples/calculator.yaml"), "eval.num_tasks=4", "--model", str(run / "final"))
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= metrics["success_rate"] <= 1.0


def test_unknown_env_suggests_the_right_id(tiny_model_dir, tmp_path):
    out = _agentrl("eval", str(ROOT / "examples/calculator.yaml"), f"model.path={tiny_model_dir}",
                   "env.id=calculater-v0", "eval.num_tasks=1")
    assert out.returncode == 2
    assert "Did you mean 'calculator-v0'" in out.stdout
