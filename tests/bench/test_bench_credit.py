"""bench/credit.py on CPU: the step-cost CliffWalking it registers, and one short run per estimator that
feeds the summary table and the SVG curves."""

from __future__ import annotations

import importlib.util
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "credit.py"
_spec = importlib.util.spec_from_file_location("bench_credit", _PATH)
bench = sys.modules["bench_credit"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_an_unreadable_reply_costs_a_step():
    env = bench.StepCostCliffWalking()
    env.reset(seed=3)
    _, reward, terminated, _, info = env.step("no idea")
    assert info["invalid_action"] and reward == -1.0 and not terminated
    _, reward, _, _, info = env.step("<action>up</action>")
    assert not info["invalid_action"] and reward in (-1.0, -100.0)


def test_short_runs_fill_the_table_and_the_curves(tiny_model_dir, tmp_path):
    bench.ensure_env()
    runs = [bench.run_one(tiny_model_dir, tmp_path, method, seed=0, steps=1, eval_tasks=4)
            for method in ("grpo", "gae")]
    assert all(len(r["train_return"]) == 1 and r["eval_return"] <= 0 for r in runs)  # every step costs
    assert all(0.0 <= r["eval_cut_share"] <= 1.0 and 0.0 <= r["eval_goal_rate"] <= 1.0 for r in runs)
    assert all(r["eval_tasks"] == 4 for r in runs)
    table = bench.summary_table(runs, last=1)
    assert "| `grpo` |" in table and "| `gae` |" in table and "turn_rloo" not in table
    svg = ET.fromstring(bench.svg_curves(runs))
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 2
