"""`agentrl eval` on real tiny models: a planted difference found, a model against itself not; a
checkpoint, a run and its final export give the same episodes; several envs on one engine; the
results files and the TensorBoard event files (read back with TensorBoard's own reader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from agentrl.cli import app
from agentrl.config import load_config
from agentrl.driver.evaluation import EvalSettings, evaluate_policy
from agentrl.driver.policy_source import resolve_policy
from agentrl.envs.core import Task
from agentrl.envs.registration import ENVS, register
from agentrl_calculator.env import CalculatorEnv

ROOT = Path(__file__).resolve().parents[2]
ANY = "test-any-number-v0"


class AnyNumberEnv(CalculatorEnv):
    """calculator-v0's tasks, where any answer that states a number scores 1.

    A model that ends its turns (the end-of-turn token) gets its answer scored; one that rambles to
    the token limit does not. The two fixture models differ exactly there: `stopping_model_dir` was
    warm-started until it ends its turns, `tiny_model_dir` for 3 steps only.
    """

    def score(self, task: Task, answer: str) -> float:
        return 1.0 if self.answer_key(task, answer) is not None else 0.0


if ANY not in ENVS:
    register(ANY, AnyNumberEnv)


def _eval(*args: str) -> str:
    result = CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def _doc(prefix: Path) -> dict:
    return json.loads(prefix.with_name(prefix.name + ".json").read_text())


def test_compare_finds_a_planted_difference(stopping_model_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "planted"
    text = _eval(str(ROOT / "examples/calculator.yaml"), f"env.id={ANY}", "--compare", stopping_model_dir,
                 tiny_model_dir, "--k", "2", "--tasks", "16", "--out", str(out))
    doc = _doc(out)
    a, b = (m["envs"][ANY]["means"]["success_rate"]["value"] for m in doc["models"])
    diff = doc["compare"][ANY]["success_rate"]
    assert diff["diff"] == pytest.approx(a - b) and a - b > 0.3, (a, b)
    assert diff["significant"] and diff["ci"][0] > 0
    assert "A - B on test-any-number-v0" in text and "yes" in text
    # Same tasks, same sampling seeds: episode i of A and of B played the same task with the same seed.
    eps = [[(e["task"], e["sample"]) for e in doc["episodes"] if e["model"] == m] for m in (0, 1)]
    assert eps[0] == eps[1] and len(eps[0]) == 32
    md = out.with_name(out.name + ".md").read_text()
    assert "## Paired comparison (A - B, same tasks and sampling seeds)" in md and "| yes |" in md


def test_a_model_against_itself_differs_nowhere(stopping_model_dir, tmp_path):
    out = tmp_path / "self"
    _eval(str(ROOT / "examples/calculator.yaml"), "--compare", stopping_model_dir, stopping_model_dir,
          "--k", "2", "--tasks", "8", "--out", str(out))
    doc = _doc(out)
    first = [e for e in doc["episodes"] if e["model"] == 0]
    second = [e for e in doc["episodes"] if e["model"] == 1]
    assert [{**e, "model": 1} for e in first] == second  # played again, episode for episode the same
    diffs = doc["compare"]["calculator-v0"]
    assert diffs and all(d["diff"] == 0 and not d["significant"] for d in diffs.values())


def _train(model_dir: str, run: Path) -> None:
    result = CliRunner().invoke(app, [
        "train", str(ROOT / "examples/calculator.yaml"), f"model.path={model_dir}", "train.steps=2",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "train.checkpoint_every=1",
        f"env.id={ANY}", "optim.lr=0.01", "optim.warmup_steps=0", "eval.num_tasks=0", f"run_dir={run}"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output


def test_checkpoint_run_and_final_export_are_one_policy(stopping_model_dir, tmp_path):
    run = tmp_path / "run"
    _train(stopping_model_dir, run)
    cfg = load_config(run / "config.json")
    s = EvalSettings(envs=(ANY,), split="test", num_tasks=6, k=2, temperature=1.0, seed=5)
    ckpt = resolve_policy(run / "checkpoints" / "step-000002")
    assert ckpt.model_dir == stopping_model_dir and ckpt.step == 2  # the base model, with the checkpoint's weights
    from_ckpt = evaluate_policy(cfg, ckpt, s)
    from_final = evaluate_policy(cfg, resolve_policy(run / "final"), s)
    from_base = evaluate_policy(cfg, resolve_policy(stopping_model_dir), s)
    assert from_ckpt == from_final
    assert from_ckpt != from_base  # the weights were loaded: its rewards differ within groups, lr 0.01 moved it
    # The run directory means its final policy; the CLI takes it alone, with the run's own config.
    out = tmp_path / "from-run"
    _eval(str(run), "--tasks", "6", "--k", "2", "eval.seed=5", "--out", str(out))
    doc = _doc(out)
    assert doc["models"][0]["name"] == "run/final" and doc["models"][0]["step"] == 2
    assert [e["final_text"] for e in doc["episodes"]] == [o.final_text for o in from_final[ANY]]
    # Training and eval event files, both read back by TensorBoard's own reader.
    train_events = EventAccumulator(str(run / "tensorboard"))
    train_events.Reload()
    assert [e.step for e in train_events.Scalars("reward_mean")] == [1, 2]
    events = EventAccumulator(str(out.parent / "tensorboard" / "run-final"))
    events.Reload()
    success = events.Scalars(f"eval/{ANY}/success_rate")
    summary = doc["models"][0]["envs"][ANY]
    assert [e.step for e in success] == [2]
    assert success[0].value == pytest.approx(summary["means"]["success_rate"]["value"], rel=1e-6)
    assert events.Scalars(f"eval/{ANY}/totals/episodes")[0].value == 12


def test_several_envs_share_one_engine(stopping_model_dir):
    cfg = load_config(ROOT / "examples/calculator.yaml", [f"model.path={stopping_model_dir}"])
    both = EvalSettings(envs=("calculator-v0", ANY), split="test", num_tasks=4, k=2, temperature=1.0, seed=9)
    played = evaluate_policy(cfg, resolve_policy(stopping_model_dir), both)
    assert set(played) == {"calculator-v0", ANY} and all(len(v) == 8 for v in played.values())
    alone = evaluate_policy(cfg, resolve_policy(stopping_model_dir), EvalSettings(
        envs=("calculator-v0",), split="test", num_tasks=4, k=2, temperature=1.0, seed=9))
    assert played["calculator-v0"] == alone["calculator-v0"]
    # Same tasks and seeds in both envs: the episodes play alike, but only ANY scores any number.
    assert sum(o.success for o in played[ANY]) >= sum(o.success for o in played["calculator-v0"])


def test_a_bare_model_directory_with_an_env(tiny_model_dir, tmp_path):
    out = tmp_path / "bare"
    text = _eval(tiny_model_dir, "--env", "calculator-v0", "--tasks", "3", "--k", "2", "rollout.max_total_tokens=256",
                 "--out", str(out))
    doc = _doc(out)
    assert doc["models"][0]["model_dir"] == tiny_model_dir and doc["models"][0]["step"] is None
    assert doc["settings"]["envs"] == ["calculator-v0"] and len(doc["episodes"]) == 6
    assert "on calculator-v0/test (3 tasks, k=2)" in text
